"""Tokenisation throughput of `fastcram data prepare`: MB of UTF-8 text per second, for 1..N workers.

Runs the whole stream phase (read + decompress, tokenise, filter, write shards; order "stream", so no
ordering pass) on the built-in corpus with a 32768-word tokenizer trained once beforehand (not timed), plus
the two encoders alone on one core: the tokenizer's own, and fastcram's DocumentEncoder that the prepare
uses. Reports wall-clock MB/s, MB/s per worker, and MB per CPU-second (CPU time of the main process and its
workers), which moves less than wall time when the machine is shared.
The load average is printed with every row: compare runs only at similar load.

    .venv/bin/python bench/bench_tokenize.py --workers 1 2 --repeats 3 [--read] [--json results.json]

--read adds the main process's reading rate per input format (.txt.xz, .jsonl, .jsonl.zst, .parquet): with
N workers the prepare is bounded by it.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Only light imports at the top: the spawned workers import this script again (fastcram.data.loader would bring torch).
from fastcram.config import DataConfig  # noqa: E402
from fastcram.data.builtin import builtin_corpus_path  # noqa: E402
from fastcram.data.prepare import PrepareOptions, prepare  # noqa: E402
from fastcram.data.sources import Input, _plain_documents  # noqa: E402
from fastcram.data.tokenizer import DocumentEncoder, load_tokenizer, train_tokenizer  # noqa: E402


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load() -> float:
    return os.getloadavg()[0]


def encoder_only(tok_path: str, docs: list[str], cached: bool, warm: bool = False) -> dict:
    """An encoder alone on one thread, no reading, filtering or writing: the tokenizer's own batch encoder, or
    fastcram's DocumentEncoder (each distinct word encoded once). The DocumentEncoder starts cold, or `warm`
    from an untimed first pass over the same documents: every word known, the limit a large corpus nears."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tok_path)
    if cached:
        encode = DocumentEncoder(tok)
        case = f"DocumentEncoder only, 1 thread, {'warm: second pass' if warm else 'cold'}"
        if warm:
            for i in range(0, len(docs), 256):
                encode(docs[i:i + 256])
    else:
        bare = getattr(tok, "encode_batch_fast", tok.encode_batch)
        encode, case = (lambda batch: bare(batch, add_special_tokens=False)), "tokenizer's encoder only, 1 thread"
    mb = sum(len(d.encode()) for d in docs) / 1e6
    la, t0, c0 = load(), time.perf_counter(), time.process_time()
    for i in range(0, len(docs), 256):
        encode(docs[i:i + 256])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"case": case, "workers": 1, "text_mb": mb, "wall_s": wall, "cpu_s": cpu,
            "mb_s": mb / wall, "mb_s_per_worker": mb / wall, "mb_per_cpu_s": mb / cpu, "load_before": la,
            "load_after": load()}


def prepare_run(tok_path: str, workers: int, tmp: str) -> dict:
    out = tempfile.mkdtemp(dir=tmp)
    os.rmdir(out)
    la, t0, c0 = load(), time.perf_counter(), cpu_seconds()
    m = prepare([builtin_corpus_path()], out, DataConfig(), tokenizer_path=tok_path, progress=False,
                options=PrepareOptions(workers=workers, order="stream"))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    mb = m["filter"]["bytes"] / 1e6
    return {"case": f"prepare, {workers} worker(s)", "workers": workers, "text_mb": mb, "wall_s": wall, "cpu_s": cpu,
            "mb_s": mb / wall, "mb_s_per_worker": mb / wall / workers, "mb_per_cpu_s": mb / cpu,
            "tokens": m["filter"]["kept_tokens"], "load_before": la, "load_after": load()}


def read_only(spec: str, text_mb: float) -> dict:
    """The main process's share: reading one input into documents (decompress, parse), nothing else. With N
    workers a prepare cannot go faster than this."""
    la, t0, c0 = load(), time.perf_counter(), time.process_time()
    for _ in Input(spec, DataConfig().doc_chars).documents():
        pass
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"case": f"reading {os.path.basename(spec)} only", "workers": 0, "text_mb": text_mb, "wall_s": wall,
            "cpu_s": cpu, "mb_s": text_mb / wall, "mb_s_per_worker": float("nan"), "mb_per_cpu_s": text_mb / cpu,
            "load_before": la, "load_after": load()}


def input_formats(docs: list[str], folder: str) -> list[str]:
    """The built-in corpus's documents as .jsonl, and as .jsonl.zst and .parquet when those extras exist."""
    lines = "".join(json.dumps({"text": t}) + "\n" for t in docs)
    paths = [os.path.join(folder, "corpus.jsonl")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(lines)
    try:
        import zstandard
        paths.append(os.path.join(folder, "corpus.jsonl.zst"))
        with open(paths[-1], "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(lines.encode()))
    except ImportError:
        print("zstandard missing: no .zst row", file=sys.stderr)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        paths.append(os.path.join(folder, "corpus.parquet"))
        pq.write_table(pa.table({"text": docs}), paths[-1], row_group_size=200)
    except ImportError:
        print("pyarrow missing: no .parquet row", file=sys.stderr)
    return paths


def median_row(rows: list[dict]) -> dict:
    best = dict(rows[0])
    for k in ("wall_s", "cpu_s", "mb_s", "mb_s_per_worker", "mb_per_cpu_s", "load_before", "load_after"):
        best[k] = statistics.median(r[k] for r in rows)
    best["repeats"] = len(rows)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one on the corpus, untimed)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--read", action="store_true", help="also time reading alone, per input format")
    args = ap.parse_args()

    with lzma.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        docs = list(_plain_documents(f, DataConfig().doc_chars))
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = args.tokenizer or os.path.join(tmp, "tokenizer.json")
        if not args.tokenizer:
            print(f"training a {args.vocab_size}-word tokenizer on the built-in corpus (not timed)", file=sys.stderr)
            train_tokenizer(docs, args.vocab_size, out_path=tok_path)
        rows = [median_row([encoder_only(tok_path, docs, *how) for _ in range(args.repeats)])
                for how in ((False,), (True, False), (True, True))]
        for w in args.workers:
            rows.append(median_row([prepare_run(tok_path, w, tmp) for _ in range(args.repeats)]))
        if args.read:
            mb = sum(len(d.encode()) for d in docs) / 1e6
            for spec in [builtin_corpus_path()] + input_formats(docs, tmp):
                rows.append(median_row([read_only(spec, mb) for _ in range(args.repeats)]))

    print(f"\n{platform.node()}: {os.cpu_count()} logical CPUs, python {platform.python_version()}; "
          f"medians of {args.repeats}")
    print("| case | text MB | wall s | MB/s | MB/s per worker | MB per CPU-s | load avg (1 min) before/after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['text_mb']:.1f} | {r['wall_s']:.2f} | {r['mb_s']:.2f} | {r['mb_s_per_worker']:.2f} "
              f"| {r['mb_per_cpu_s']:.2f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host_cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
