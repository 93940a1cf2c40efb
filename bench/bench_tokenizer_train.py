"""Tokenizer training on the built-in corpus: fastcram's deterministic trainer against the tokenizers library's
WordPieceTrainer (what fastcram used before): seconds, distinct tokenizer.json files over the repeats, vocabulary
size and tokens per character of the whole corpus.

    .venv/bin/python bench/bench_tokenizer_train.py --vocab-size 32768 8192 --repeats 5
    .venv/bin/python bench/bench_tokenizer_train.py --vocab-size 32768 --memory

The two trainers alternate within a repeat, so a change in the machine's load hits both. Time is wall-clock
seconds of train_tokenizer on the documents already in memory (reading the corpus, about 0.3 s, is printed
apart); CPU seconds too (the library's trainer may use several threads).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizers import trainers  # noqa: E402

from fastcram.config import DataConfig  # noqa: E402
from fastcram.data.builtin import builtin_corpus_path  # noqa: E402
from fastcram.data.sources import iter_documents  # noqa: E402
from fastcram.data.tokenizer import SPECIAL_TOKENS, DocumentEncoder, _new_tokenizer, train_tokenizer  # noqa: E402

TRAINERS = ("tokenizers WordPieceTrainer", "fastcram train_tokenizer")


def upstream_train(docs: list[str], vocab_size: int):
    """fastcram's trainer before it had its own: the tokenizers library's WordPieceTrainer."""
    tok = _new_tokenizer()
    tok.train_from_iterator(docs, trainer=trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2, show_progress=False))
    return tok


def timed(fn, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def tokens_per_char(tok, docs: list[str]) -> float:
    encode = DocumentEncoder(tok)
    return sum(len(ids) for ids in encode(docs)) / sum(map(len, docs))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def memory(args) -> None:
    """Each trainer in a fresh process: peak RSS with the documents in memory, then after one training."""
    import subprocess

    print("| vocab | trainer | peak RSS before training MB | peak RSS after MB |\n|---|---|---|---|")
    for v in args.vocab_size:
        for i, name in enumerate(TRAINERS):
            out = subprocess.run([sys.executable, __file__, "--peak-of", str(i), "--vocab-size", str(v)],
                                 capture_output=True, text=True, check=True).stdout.split()
            print(f"| {v} | {name} | {out[0]} | {out[1]} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, nargs="+", default=[32768, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory", action="store_true", help="peak memory of each trainer (own process each)")
    ap.add_argument("--peak-of", type=int, help=argparse.SUPPRESS)  # one training, for --memory
    args = ap.parse_args()
    if args.memory:
        return memory(args)
    t0 = time.perf_counter()
    docs = list(iter_documents([builtin_corpus_path()], DataConfig().doc_chars))
    if args.peak_of is not None:
        before = peak_rss_mb()
        (upstream_train, train_tokenizer)[args.peak_of](docs, args.vocab_size[0])
        print(f"{before:.0f} {peak_rss_mb():.0f}")
        return
    print(f"built-in corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters, read in "
          f"{time.perf_counter() - t0:.2f} s; load average {os.getloadavg()[0]:.2f}")
    trainers_ = dict(zip(TRAINERS, (upstream_train, train_tokenizer)))
    print("| vocab | trainer | wall s median (min-max) | CPU s median | distinct tokenizer.json | vocabulary | "
          "tokens/char |")
    print("|---|---|---|---|---|---|---|")
    for v in args.vocab_size:
        runs = {name: [] for name in trainers_}
        for _ in range(args.repeats):
            for name, fn in trainers_.items():
                runs[name].append(timed(fn, docs, v))
        for name, rs in runs.items():
            wall, cpu = [r[1] for r in rs], [r[2] for r in rs]
            files = {hashlib.sha256(r[0].to_str(pretty=True).encode()).hexdigest() for r in rs}
            tok = rs[0][0]
            print(f"| {v} | {name} | {statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) | "
                  f"{statistics.median(cpu):.2f} | {len(files)} of {len(rs)} | {tok.get_vocab_size()} | "
                  f"{tokens_per_char(tok, docs):.5f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
