"""`fastcram data prepare`: documents -> token shards, in parallel, restartable, in bounded memory.

Four phases, each resumable from its last complete file:
0. tokenizer: the given tokenizer is copied in, or one is trained (deterministically: tokenizer.py) on the
   first --tokenizer-sample-docs documents.
1. stream: the mixed document stream is cut into chunks of about `chunk_chars` characters. Worker processes
   tokenise a chunk (tokenizer.DocumentEncoder: each distinct word is encoded once), apply the compression
   filter and join the kept documents with <sep>. The main process takes the results in chunk order (so 1
   and N workers write the same bytes) and cuts the joined stream into shards of whole blocks as they fill.
2. scatter (order shuffle or curriculum): every block of a stream shard goes to a bucket file chosen by its
   key (curriculum: seq_len - number of "." tokens; shuffle: one key) and a seeded random sub-bucket; each
   key gets ceil(blocks / shard_blocks) sub-buckets, so a bucket holds about one shard. The stream shard is
   then deleted.
3. gather: the buckets in key order, each permuted in memory by a seeded draw, are cut into the final shards.
   Random sub-bucket + in-bucket permutation is a uniform shuffle (within a key), never holding more than
   one bucket.

A journal (prepare-state.json, written atomically first and then after every shard) records what is complete;
a rerun with the same inputs and settings skips it (re-reading, not re-tokenising, the documents before the
resume point) and writes byte-identical output. manifest.json is written last, atomically, and the journal
removed: a folder without a manifest is recognisably unfinished. Memory: the main process holds one shard
buffer, at most workers + 2 chunks in flight and, while ordering, one shard and one bucket; a worker holds
one chunk and at most DocumentEncoder.max_entries remembered words. A single document is held whole.

Held-out split: whole documents are set aside before tokenising, never written to the training shards: each
document is held out when a hash of its index in the document stream (with a fixed seed, not --seed: another
shuffle keeps the held-out set) falls under --holdout-docs's rate (1% by default), until the cap (1000
documents by default; counted before the compression filter, like --max-documents) is reached. The held-out
documents are joined with <sep> like the training stream and appended to holdout-00000.bin in stream order
(after their chunk's training shards, so a resume truncates it back to the journal's length); the manifest
records the rule, the counts and the file, cut to whole blocks.

Files: a prepare writes only into a new or empty folder, or one holding its own journal; it deletes only files
with the names it gives its own (shard-, stream-, bucket-, holdout-NNNNN.bin, its JSON files, their temp
files), and a journal naming anything else, or anything outside the folder, is refused before anything is
touched.

This module does not import torch, so `data prepare` and its worker processes start light.
"""
from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain, islice
from typing import Iterator

import numpy as np

from ..config import DataConfig
from ..errors import UserError
from ..files import WriteError, atomic_write_bytes, atomic_write_json, inside, sha256_file, writing
from .sources import Input, ReadError, mix_documents, mix_fraction
from .tokenizer import (DocumentEncoder, load_tokenizer, save_tokenizer, special_ids, tokenizer_hash,
                        train_tokenizer, why_not_separable)

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
JOURNAL = "prepare-state.json"
FORMAT_VERSION = 3  # 2: text that spells a special token is encoded as text; 3: a held-out split
HOLDOUT_FILE = "holdout-00000.bin"
HOLDOUT_RATE = 0.01  # the default share of documents held out ...
HOLDOUT_MAX_DOCS = 1000  # ... and the default cap
HOLDOUT_SEED = 0  # of the held-out draw: fixed (not --seed), so a reshuffle keeps the same held-out documents
# The names of the files a prepare writes (and of their temp files): the only ones it ever deletes
_SHARD_NAME = re.compile(r"(?:shard|stream)-\d{5,}\.bin")
_OWN_FILE = re.compile(r"(?:(?:shard|stream|bucket|holdout)-\d{5,}\.bin|prepare-state\.json|tokenizer\.json"
                       r"|manifest\.json)(?:\.tmp\d+)?")
_JOURNAL_TEMP = re.compile(r"prepare-state\.json\.tmp\d+")
ORDERS = ("shuffle", "curriculum", "stream")
_PARALLELISM = "TOKENIZERS_PARALLELISM"


@dataclass
class PrepareOptions:
    weights: list[float] | None = None  # per input: its share of the characters; the mix ends with the first exhausted
    workers: int | None = None  # tokenising processes (None: all cores)
    max_documents: int | None = None  # read at most this many documents (counted before the filter)
    max_tokens: int | None = None  # stop once the joined token stream holds this many tokens
    tokenizer_sample_docs: int | None = None  # train the tokenizer on the first N documents (None: all)
    order: str = "shuffle"  # "shuffle" (seeded), "curriculum" (most "." tokens first, ties shuffled), "stream"
    seed: int = 0  # for the shuffle
    text_field: str = "text"  # JSONL key / Parquet or dataset column holding the text
    chunk_chars: int = 1 << 20  # characters per tokenisation task; fixes the resume points, so it is fingerprinted
    holdout_rate: float = HOLDOUT_RATE  # each document is held out when its seeded draw is below this (0: none)
    holdout_max_docs: int | None = HOLDOUT_MAX_DOCS  # ... until this many are (None: no cap); before the filter

    def check(self, n_inputs: int) -> None:
        if self.order not in ORDERS:
            raise UserError(f"--order {self.order!r}: choose one of {', '.join(ORDERS)}")
        if self.weights is not None:
            if len(self.weights) != n_inputs:
                raise UserError(f"--weights gives {len(self.weights)} weight(s) for {n_inputs} input(s); give "
                                f"one per --input, in the same order")
            if not all(w > 0 and math.isfinite(w) for w in self.weights):
                raise UserError(f"--weights {' '.join(map(str, self.weights))}: every weight must be positive")
        if not 0 <= self.holdout_rate < 1:
            raise UserError(f"--holdout-docs: the held-out share must be at least 0 and below 1, got "
                            f"{self.holdout_rate}")
        for name in ("workers", "max_documents", "max_tokens", "tokenizer_sample_docs", "chunk_chars",
                     "holdout_max_docs"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")


@dataclass
class Stats:
    kept_docs: int = 0
    dropped_docs: int = 0
    kept_tokens: int = 0
    dropped_tokens: int = 0
    chars: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents tokenised
    holdout_docs: int = 0  # of the kept documents, those in the held-out split (kept_* count them too)
    holdout_tokens: int = 0  # their tokens, <sep> included

    def add(self, other: "Stats") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- files

def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _data_files(out_dir: str) -> list[str]:
    """What a prepare writes besides the tokenizer and the manifest: shards, stream shards, buckets, the journal,
    temp files; found by their exact names (in a folder that holds a prepare's journal or was empty)."""
    return [f for f in os.listdir(out_dir) if _OWN_FILE.fullmatch(f) and f not in (TOKENIZER_FILE, MANIFEST)]


def _claim_folder(out_dir: str, tokenizer_path: str | None) -> tuple[dict | None, list[str]]:
    """(journal state of the unfinished prepare in out_dir or None, the folders created now, deepest first). Any
    other folder must be empty (or hold only the --tokenizer file): fastcram never writes into, or deletes from,
    a folder of the user's."""
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise UserError(f"{out_dir} already holds a prepared corpus ({MANIFEST}); choose another --out "
                        f"or delete it first")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file, not a folder; choose a new or empty folder")
    state = Journal.load(out_dir)
    if state is not None:
        return state, []
    if not os.path.isdir(out_dir):
        made, folder = [], os.path.abspath(out_dir)
        while not os.path.exists(folder):  # out_dir and the parents it needs, so a failure removes them all
            made.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(out_dir)
        except OSError as e:
            raise UserError(f"--out {out_dir}: cannot create the folder ({e.strerror})") from None
        return None, made
    given = os.path.realpath(tokenizer_path) if tokenizer_path else None
    others = sorted(f for f in os.listdir(out_dir) if not _JOURNAL_TEMP.fullmatch(f)
                    and os.path.realpath(os.path.join(out_dir, f)) != given)
    if others:
        raise UserError(f"--out {out_dir} is not empty ({len(others)} entr{'y' if len(others) == 1 else 'ies'}, "
                        f"e.g. {others[0]}) and is not an unfinished fastcram prepare; fastcram writes only into a "
                        f"new or empty folder: choose another --out")
    for f in os.listdir(out_dir):  # a journal write killed before the first journal existed
        if _JOURNAL_TEMP.fullmatch(f):
            _remove(os.path.join(out_dir, f))
    return None, []


# ---------------------------------------------------------------- tokenising a chunk

class ChunkEncoder:
    """Tokenises a list of documents, drops the ones that compress badly and joins the rest with <sep>: the
    training documents into one stream, the held-out ones into another."""

    def __init__(self, tok, sep: int, threshold: float):
        self.encode = DocumentEncoder(tok)
        self.sep, self.threshold = np.array([sep], dtype=np.uint16), threshold

    def __call__(self, docs: list[str], held: np.ndarray | None = None):
        """held [n_docs] bool: the held-out documents. -> (uint16 ids of the kept training documents, each
        followed by <sep>; their tokens per document incl. <sep>, 0 when dropped or held out; Stats; the same
        ids of the kept held-out documents)."""
        parts: list[np.ndarray] = []
        held_parts: list[np.ndarray] = []
        lens = np.zeros(len(docs), dtype=np.int64)
        st = Stats()
        for i, (doc, ids) in enumerate(zip(docs, self.encode(docs))):
            n, chars = len(ids), max(len(doc), 1)
            st.chars += len(doc)
            st.bytes += len(doc.encode("utf-8"))
            if n == 0 or n / chars >= self.threshold:  # compresses badly: mostly noise
                st.dropped_docs += 1
                st.dropped_tokens += n
                continue
            st.kept_docs += 1
            st.kept_tokens += n
            if held is not None and held[i]:
                st.holdout_docs += 1
                st.holdout_tokens += n + 1
                held_parts += (ids, self.sep)
            else:
                parts += (ids, self.sep)
                lens[i] = n + 1
        return _joined(parts), lens, st, _joined(held_parts)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


_worker_encoder: ChunkEncoder | None = None


def _init_worker(tok_json: str, sep: int, threshold: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole group; the parent stops the pool
    os.environ[_PARALLELISM] = "false"  # one core per worker: the processes are the parallelism
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    from tokenizers import Tokenizer

    global _worker_encoder
    _worker_encoder = ChunkEncoder(Tokenizer.from_str(tok_json), sep, threshold)


def _exit_with_parent(parent: int) -> None:
    """A pool worker waits on a queue whose write end it holds itself, so it would outlive a killed parent."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode_in_worker(docs: list[str], held: np.ndarray | None):
    return _worker_encoder(docs, held)


@contextlib.contextmanager
def _serial_tokenizers():
    """The encoder on one thread, so that 1 worker means one core (tokenizers reads this variable per call)."""
    old = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = old


@dataclass
class Chunk:
    index: int
    first_doc: int  # index in the document stream of texts[0]
    texts: list[str] | None
    sources: np.ndarray  # [n_docs] input index of each document
    chars: np.ndarray  # [n_docs] characters of each document
    held: np.ndarray | None = None  # [n_docs] bool: held out (set by mark_holdout)
    held_before: int = 0  # documents held out before this chunk


def holdout_draw(seed: int, first: int, n: int) -> np.ndarray:
    """[n] uniform numbers in [0, 1) for the documents first..first+n-1 of the stream: splitmix64 of the
    document index mixed with the seed, a pure function of (seed, index), so the held-out set does not depend
    on chunking, workers or resumes."""
    mask = (1 << 64) - 1
    seed_mix = _splitmix64(np.array([seed & mask], dtype=np.uint64))
    z = _splitmix64(np.arange(first, first + n, dtype=np.uint64) ^ seed_mix)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash wants
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mark_holdout(chunks: Iterator[Chunk], opts: "PrepareOptions", held_before: int) -> Iterator[Chunk]:
    """Each chunk with its held-out documents marked: a draw under opts.holdout_rate, until
    opts.holdout_max_docs documents are held out (held_before of them before the first chunk given)."""
    count = held_before
    for ch in chunks:
        n = len(ch.sources)
        held = (holdout_draw(HOLDOUT_SEED, ch.first_doc, n) < opts.holdout_rate if opts.holdout_rate > 0
                else np.zeros(n, dtype=bool))
        if opts.holdout_max_docs is not None:
            held[np.flatnonzero(held)[max(opts.holdout_max_docs - count, 0):]] = False
        ch.held, ch.held_before = held, count
        count += int(held.sum())
        yield ch


def make_chunks(docs: Iterator[tuple[int, str]], chunk_chars: int, max_documents: int | None,
                start: int = 0) -> Iterator[Chunk]:
    """Consecutive documents grouped into chunks of >= chunk_chars characters (the last one smaller). Chunks
    before `start` are formed (so numbering never changes) but not yielded."""
    if max_documents is not None:
        docs = islice(docs, max_documents)
    index, first, texts, srcs, lens = 0, 0, [], [], []
    size = 0
    for n, (src, text) in enumerate(docs):
        if index >= start:
            texts.append(text)
        srcs.append(src)
        lens.append(len(text))
        size += len(text)
        if size >= chunk_chars:
            if index >= start:
                yield Chunk(index, first, texts, np.array(srcs, dtype=np.int64), np.array(lens, dtype=np.int64))
            index, first, texts, srcs, lens, size = index + 1, n + 1, [], [], [], 0
    if srcs and index >= start:
        yield Chunk(index, first, texts, np.array(srcs, dtype=np.int64), np.array(lens, dtype=np.int64))


def tokenised(chunks: Iterator[Chunk], tok, sep: int, threshold: float, workers: int):
    """(chunk, encoder result) in chunk order. Workers run in separate processes (spawned: the parent may hold
    threads); at most workers + 2 chunks are in flight. One worker, or one chunk in all, runs in-process."""
    head = list(islice(chunks, 2))
    if workers <= 1 or len(head) < 2:
        encoder = ChunkEncoder(tok, sep, threshold)
        with _serial_tokenizers():
            for ch in chain(head, chunks):
                yield ch, encoder(ch.texts, ch.held)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(tok.to_str(), sep, threshold))
    pending: deque = deque()
    try:
        for ch in chain(head, chunks):
            pending.append((ch, pool.submit(_encode_in_worker, ch.texts, ch.held)))
            ch.texts = None  # the pool holds them until done
            if len(pending) >= workers + 2:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- writing shards

def _shard_entry(out_dir: str, name: str, blocks: int, seq_len: int) -> dict:
    return {"file": name, "blocks": blocks, "bytes": blocks * seq_len * 2, "sha256": sha256_file(os.path.join(out_dir, name))}


class StreamWriter:
    """Cuts the joined token stream into shards of whole blocks, each written atomically as it fills."""

    def __init__(self, out_dir: str, prefix: str, seq_len: int, shard_blocks: int, dot: int | None, index: int):
        self.out_dir, self.prefix, self.seq_len, self.dot = out_dir, prefix, seq_len, dot
        self.buf = np.empty(shard_blocks * seq_len, dtype=np.uint16)
        self.fill = 0
        self.index = index  # number of the next shard

    def add(self, ids: np.ndarray) -> Iterator[tuple[int, dict]]:
        """Append ids; yields (tokens of ids consumed, shard entry) for every shard completed."""
        used = 0
        while used < len(ids):
            take = min(len(ids) - used, len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + take] = ids[used:used + take]
            self.fill += take
            used += take
            if self.fill == len(self.buf):
                yield used, self._write()

    def close(self) -> dict | None:
        """The last, shorter shard; the tail that does not fill a block is dropped (no padding)."""
        return self._write() if self.fill >= self.seq_len else None

    def _write(self) -> dict:
        blocks = self.fill // self.seq_len
        data = self.buf[:blocks * self.seq_len]
        name = f"{self.prefix}-{self.index:05d}.bin"
        atomic_write_bytes(os.path.join(self.out_dir, name), data.tobytes())
        entry = _shard_entry(self.out_dir, name, blocks, self.seq_len)
        if self.dot is not None:  # the curriculum's key histogram, so scattering needs no counting pass
            dots = (data.reshape(blocks, self.seq_len) == self.dot).sum(axis=1)
            entry["dots"] = np.bincount(dots, minlength=self.seq_len + 1)
        self.index += 1
        self.fill = 0
        return entry


# ---------------------------------------------------------------- the journal

def _after_journal(journal: dict) -> None:
    """Called after every journal write; tests replace it to interrupt a prepare at a known point."""


class Journal:
    def __init__(self, out_dir: str, state: dict):
        self.path = os.path.join(out_dir, JOURNAL)
        self.state = state

    @staticmethod
    def load(out_dir: str) -> dict | None:
        """The journal of an unfinished prepare in out_dir, or None; every file it names is checked to be one of
        the prepare's own, inside out_dir, before anything acts on it."""
        path = os.path.join(out_dir, JOURNAL)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                state = json.load(f)
            names = [s["file"] for phase in ("stream", "gather") for s in (state.get(phase) or {}).get("shards", [])]
        except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is unreadable ({e}); delete {out_dir} and prepare again") from None
        for name in names:
            try:
                inside(out_dir, name)
                if not _SHARD_NAME.fullmatch(name):
                    raise ValueError(f"{name!r} is not the name of a shard it writes")
            except ValueError as e:
                raise UserError(f"{path} names a file that is not this prepare's ({e}); fastcram deletes only "
                                f"files it wrote: delete {out_dir} and prepare again") from None
        links = sorted(f for f in os.listdir(out_dir) if _OWN_FILE.fullmatch(f)
                       and os.path.islink(os.path.join(out_dir, f)))
        if links:  # appending to or truncating a bucket would act on whatever the link points at
            raise UserError(f"{os.path.join(out_dir, links[0])} is a link, not a file this prepare wrote; delete "
                            f"{out_dir} and prepare again")
        return state

    def save(self) -> None:
        atomic_write_json(self.path, self.state)
        _after_journal(self.state)


def _fresh_state(fingerprint: dict) -> dict:
    return {"version": FORMAT_VERSION, "fingerprint": fingerprint, "tokenizer_hash": None, "phase": "tokenizer",
            "stream": {"shards": [], "done": False,
                       "resume": {"chunk": 0, "skip_tokens": 0, "tokens_before": 0, "stats": asdict(Stats()),
                                  "inputs": None, "holdout_docs": 0, "holdout_tokens": 0}},
            "scatter": None, "gather": None}


# ---------------------------------------------------------------- progress

class ProgressLine:
    """Documents, tokens, MB/s of text and, where the size is known, percent done and ETA; on stderr."""

    def __init__(self, on: bool):
        self.on = on
        self.tty = on and sys.stderr.isatty()
        self.interval = 0.5 if self.tty else 30.0
        self.t0 = self.last = time.monotonic()
        self.b0 = None
        self.f0 = None
        self.shown = False

    def update(self, docs: int, tokens: int, text_bytes: int, fraction: float | None, force: bool = False) -> None:
        now = time.monotonic()
        if self.b0 is None:  # rates count from the first chunk of this run (a resume skips text first)
            self.t0, self.b0, self.f0 = now, text_bytes, fraction
        if not self.on or (not force and now - self.last < self.interval):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        msg = f"  {docs:,} docs, {tokens / 1e6:,.1f}M tokens, {(text_bytes - self.b0) / 1e6 / dt:.1f} MB/s"
        if fraction is not None:
            msg += f", {100 * fraction:.1f}%"
            gained = fraction - (self.f0 or 0.0)
            if gained > 0 and fraction < 1:
                msg += f", ETA {_duration(dt * (1 - fraction) / gained)}"
        print(("\r" + msg.ljust(78)) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)
        self.shown = True

    def end(self) -> None:
        if self.tty and self.shown:
            print(file=sys.stderr, flush=True)
        self.shown = False


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _say(on: bool, msg: str) -> None:
    if on:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the phases

@dataclass
class _Run:
    out_dir: str
    cfg: DataConfig
    opts: PrepareOptions
    inputs: list[Input]
    journal: Journal
    tok: object
    sep: int
    dot: int | None
    progress: bool
    workers: int = 1


def _stream_phase(run: _Run) -> None:
    st = run.journal.state["stream"]
    res = st["resume"]
    cfg, opts = run.cfg, run.opts
    stats = Stats(**res["stats"])
    # per input: documents read, documents kept, tokens kept (incl. <sep>), characters read
    per_input = np.array(res["inputs"] or [[0, 0, 0, 0]] * len(run.inputs), dtype=np.int64)
    prefix = "shard" if opts.order == "stream" else "stream"
    writer = StreamWriter(run.out_dir, prefix, cfg.seq_len, cfg.shard_blocks, run.dot if opts.order == "curriculum"
                          else None, len(st["shards"]))
    if res["chunk"] > 0:
        _say(run.progress, f"resuming after {len(st['shards'])} complete shard(s): re-reading the documents "
                           f"before chunk {res['chunk']} without tokenising them")
    bar = ProgressLine(run.progress)
    pos = res["tokens_before"]  # stream position of the current chunk's first token
    held_path = os.path.join(run.out_dir, HOLDOUT_FILE)
    held_len, held_docs = res["holdout_tokens"], res["holdout_docs"]
    _truncate(held_path, held_len * 2, run.out_dir)  # appends after the last journal entry are undone
    docs = mix_documents(run.inputs, opts.weights)
    chunks = mark_holdout(make_chunks(docs, opts.chunk_chars, opts.max_documents, start=res["chunk"]), opts,
                          held_docs)
    results = tokenised(chunks, run.tok, run.sep, cfg.compression_threshold, run.workers)
    with contextlib.closing(results):  # stops the pool at once when a limit ends the stream early
        for chunk, (ids, lens, cst, held_ids) in results:
            before = {"chunk": chunk.index, "tokens_before": pos, "stats": asdict(stats),
                      "inputs": per_input.tolist(), "holdout_docs": chunk.held_before, "holdout_tokens": held_len}
            stats.add(cst)
            _count_inputs(per_input, chunk, lens)
            skip = res["skip_tokens"] if chunk.index == res["chunk"] else 0
            end = len(ids) if opts.max_tokens is None else min(len(ids), opts.max_tokens - pos)
            for used, entry in writer.add(ids[skip:end]):
                _add_shard(st, entry)
                st["resume"] = {**before, "skip_tokens": skip + used}
                run.journal.save()
            if len(held_ids):  # after the chunk's journal entries, which record the length before it
                with open(held_path, "ab") as f:
                    f.write(held_ids.tobytes())
                held_len += len(held_ids)
            held_docs = chunk.held_before + int(chunk.held.sum())
            pos += len(ids)
            n_docs = chunk.first_doc + len(chunk.sources)
            bar.update(n_docs, min(pos, opts.max_tokens or pos), stats.bytes, _fraction(run, pos, n_docs))
            if opts.max_tokens is not None and pos >= opts.max_tokens:
                break
    bar.end()
    last = writer.close()
    if last is not None:
        _add_shard(st, last)
    st["done"] = True
    st["stats"] = asdict(stats)
    st["inputs_final"] = per_input.tolist()
    st["holdout_final"] = {"selected_docs": held_docs, "tokens": held_len}
    if not st["shards"]:
        raise UserError(f"the input ({', '.join(i.spec for i in run.inputs)}) yields no complete {cfg.seq_len}-token "
                        f"block after the compression filter (kept {stats.kept_docs} of "
                        f"{stats.kept_docs + stats.dropped_docs} documents"
                        + (f", {stats.holdout_docs} of them held out" if stats.holdout_docs else "") +
                        "); give more text, raise --compression-threshold" +
                        (" or hold out fewer documents (--holdout-docs)" if stats.holdout_docs else ""))
    run.journal.state["phase"] = "done" if opts.order == "stream" else "scatter"
    run.journal.save()


def _add_shard(st: dict, entry: dict) -> None:
    """A complete stream shard into the journal; "." counts are summed there (one histogram, not one a shard)."""
    dots = entry.pop("dots", None)
    if dots is not None:
        st["dots"] = (np.asarray(st.get("dots") or np.zeros_like(dots)) + dots).tolist()
    st["shards"].append(entry)


def _count_inputs(per_input: np.ndarray, chunk: Chunk, lens: np.ndarray) -> None:
    n = len(per_input)
    for col, w in enumerate((None, (lens > 0).astype(np.float64), lens.astype(np.float64),
                             chunk.chars.astype(np.float64))):
        per_input[:, col] += np.round(np.bincount(chunk.sources, weights=w, minlength=n)).astype(np.int64)


def _fraction(run: _Run, tokens: int, docs: int) -> float | None:
    known = [f for f in (mix_fraction(run.inputs, run.opts.weights is not None),
                         tokens / run.opts.max_tokens if run.opts.max_tokens else None,
                         docs / run.opts.max_documents if run.opts.max_documents else None) if f is not None]
    return min(max(known), 1.0) if known else None


def _bucket_plan(run: _Run) -> tuple[np.ndarray, np.ndarray]:
    """(sub-buckets per key, first bucket of each key). Keys: shuffle 0; curriculum seq_len - "." count."""
    S = run.cfg.shard_blocks
    stream = run.journal.state["stream"]
    shards = stream["shards"]
    if run.opts.order == "curriculum":
        hist = np.array(stream["dots"])[::-1]  # key k = seq_len - dots, ascending
    else:
        hist = np.array([sum(s["blocks"] for s in shards)])
    per_key = np.ceil(hist / S).astype(np.int64)  # 0 for keys no block has
    base = np.concatenate([[0], np.cumsum(per_key)[:-1]]).astype(np.int64)
    return per_key, base


def _bucket_path(run: _Run, b: int) -> str:
    return os.path.join(run.out_dir, f"bucket-{b:05d}.bin")


def _scatter_phase(run: _Run) -> None:
    state = run.journal.state
    L = run.cfg.seq_len
    per_key, base = _bucket_plan(run)
    n_buckets = int(per_key.sum())
    if state["scatter"] is None:
        state["scatter"] = {"next": 0, "bucket_blocks": [0] * n_buckets}
    sc = state["scatter"]
    counts = sc["bucket_blocks"]
    for b, n in enumerate(counts):  # appends after the last journal entry are undone
        _truncate(_bucket_path(run, b), n * L * 2, run.out_dir)
    shards = state["stream"]["shards"]
    for r in range(sc["next"]):
        _remove(os.path.join(run.out_dir, shards[r]["file"]))
    _say(run.progress, f"ordering ({run.opts.order}): {len(shards) - sc['next']} stream shard(s) into {n_buckets} "
                       f"bucket(s)")
    for r in range(sc["next"], len(shards)):
        path = os.path.join(run.out_dir, shards[r]["file"])
        blocks = np.fromfile(path, dtype=np.uint16).reshape(-1, L)  # [n, L], one shard
        keys = _keys(run, blocks)
        u = np.random.default_rng([run.opts.seed, 1, r]).random(len(blocks))
        bucket = base[keys] + (u * per_key[keys]).astype(np.int64)  # a uniform sub-bucket of the block's key
        order = np.argsort(bucket, kind="stable")
        ids, starts = np.unique(bucket[order], return_index=True)
        for b, lo, hi in zip(ids, starts, list(starts[1:]) + [len(order)]):
            bucket_path = _bucket_path(run, int(b))
            with writing(bucket_path), open(bucket_path, "ab") as f:  # a full disk: a WriteError naming it
                f.write(blocks[order[lo:hi]].tobytes())  # (the journal undoes a partial append on resume)
            counts[b] += int(hi - lo)
        sc["next"] = r + 1
        run.journal.save()
        os.remove(path)
    state["phase"] = "gather"
    run.journal.save()


def _truncate(path: str, size: int, out_dir: str) -> None:
    have = os.path.getsize(path) if os.path.exists(path) else 0
    if have < size:
        raise UserError(f"{path} is shorter than {JOURNAL} records ({have} < {size} bytes); the unfinished "
                        f"prepare in {out_dir} cannot resume: delete the folder and prepare again")
    if have > size:
        os.truncate(path, size)


def _keys(run: _Run, blocks: np.ndarray) -> np.ndarray:
    if run.opts.order == "curriculum":
        return run.cfg.seq_len - (blocks == run.dot).sum(axis=1)
    return np.zeros(len(blocks), dtype=np.int64)


def _gather_phase(run: _Run) -> None:
    state = run.journal.state
    L, S = run.cfg.seq_len, run.cfg.shard_blocks
    counts = np.array(state["scatter"]["bucket_blocks"], dtype=np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    total = int(ends[-1])
    if state["gather"] is None:
        state["gather"] = {"shards": []}
    done = state["gather"]["shards"]
    _remove_buckets(run, np.flatnonzero(ends <= len(done) * S))  # written out before an interruption
    cache: dict[int, np.ndarray] = {}
    _say(run.progress, f"ordering ({run.opts.order}): writing {math.ceil(total / S) - len(done)} shard(s)")
    for j in range(len(done), math.ceil(total / S)):
        lo, hi = j * S, min((j + 1) * S, total)
        out = np.empty((hi - lo, L), dtype=np.uint16)
        for b in np.flatnonzero((starts < hi) & (ends > lo) & (counts > 0)):
            blocks = _permuted_bucket(run, int(b), int(counts[b]), cache)
            a, z = max(lo, starts[b]), min(hi, ends[b])
            out[a - lo:z - lo] = blocks[a - starts[b]:z - starts[b]]
        name = f"shard-{j:05d}.bin"
        atomic_write_bytes(os.path.join(run.out_dir, name), out.tobytes())
        done.append(_shard_entry(run.out_dir, name, hi - lo, L))
        run.journal.save()
        _remove_buckets(run, np.flatnonzero(ends <= hi))  # fully written out
    state["phase"] = "done"
    run.journal.save()


def _remove_buckets(run: _Run, buckets: np.ndarray) -> None:
    for b in buckets:
        _remove(_bucket_path(run, int(b)))


def _permuted_bucket(run: _Run, b: int, n: int, cache: dict) -> np.ndarray:
    if b not in cache:
        cache.clear()  # buckets are visited in order: one is enough
        blocks = np.fromfile(_bucket_path(run, b), dtype=np.uint16).reshape(n, run.cfg.seq_len)
        cache[b] = blocks[np.random.default_rng([run.opts.seed, 2, b]).permutation(n)]
    return cache[b]


# ---------------------------------------------------------------- the whole prepare

def _fingerprint(inputs: list[Input], cfg: DataConfig, opts: PrepareOptions, tokenizer: str) -> dict:
    """Everything the output bytes depend on (not the number of workers)."""
    fp = {"inputs": [inp.fingerprint() for inp in inputs], "tokenizer": tokenizer,
          **{k: getattr(cfg, k) for k in ("seq_len", "shard_blocks", "doc_chars", "compression_threshold")},
          **{k: getattr(opts, k) for k in ("weights", "max_documents", "max_tokens", "order", "text_field",
                                           "chunk_chars")},
          "holdout": [opts.holdout_rate, opts.holdout_max_docs] if opts.holdout_rate > 0 else None}
    if opts.order != "stream":
        fp["seed"] = opts.seed
    return json.loads(json.dumps(fp))  # as the journal stores it (tuples become lists)


def _tokenizer_identity(tokenizer_path: str | None, cfg: DataConfig, opts: PrepareOptions):
    if tokenizer_path:
        try:
            tok = load_tokenizer(tokenizer_path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--tokenizer: {e}") from None
        return tok, f"given:{tokenizer_hash(tok)}"
    return None, f"trained:{cfg.vocab_size}:{opts.tokenizer_sample_docs}:{opts.max_documents}"


def _train(inputs: list[Input], cfg: DataConfig, opts: PrepareOptions, progress: bool):
    n = opts.tokenizer_sample_docs
    if opts.max_documents is not None:
        n = min(n or opts.max_documents, opts.max_documents)
    what = f"the first {n:,} documents" if n else "the whole corpus"
    _say(progress, f"training a WordPiece tokenizer (vocab {cfg.vocab_size}) on {what}")
    texts = (text for _, text in islice(mix_documents(inputs, opts.weights), n))
    tok = train_tokenizer(texts, cfg.vocab_size)
    if tok.get_vocab_size() < 8:
        raise UserError(f"the input ({', '.join(i.spec for i in inputs)}) holds no text to train a tokenizer on")
    return tok


def prepare(inputs: list[str], out_dir: str, cfg: DataConfig, tokenizer_path: str | None = None,
            progress: bool = True, options: PrepareOptions | None = None) -> dict:
    """Prepare a corpus into out_dir (tokenizer.json, shard-*.bin, manifest.json); returns the manifest.

    out_dir must be new or empty; a rerun with the same inputs and settings resumes an unfinished prepare there;
    a finished one is refused. The same command gives the same bytes (the manifest's creation time aside).
    """
    opts = options or PrepareOptions()
    opts.check(len(inputs))
    sources = [Input(spec, cfg.doc_chars, opts.text_field) for spec in inputs]
    given, identity = _tokenizer_identity(tokenizer_path, cfg, opts)
    fingerprint = _fingerprint(sources, cfg, opts, identity)
    state, created = _claim_folder(out_dir, tokenizer_path)
    if state is not None and state.get("version") != FORMAT_VERSION:
        raise UserError(f"{out_dir} holds an unfinished prepare of another fastcram version; delete the folder and "
                        f"prepare again")
    if state is not None and state.get("fingerprint") != fingerprint:
        changed = sorted(k for k in set(fingerprint) | set(state.get("fingerprint") or {})
                         if fingerprint.get(k) != (state.get("fingerprint") or {}).get(k))
        raise UserError(f"{out_dir} holds an unfinished prepare with other settings (differs in: "
                        f"{', '.join(changed)}); rerun it with the same inputs and flags to resume, or delete "
                        f"the folder")
    journal = Journal(out_dir, state or _fresh_state(fingerprint))
    if state is None:
        journal.save()  # the first file written: from now on the folder is a recognisable unfinished prepare
    tok_out = os.path.join(out_dir, TOKENIZER_FILE)
    given_in_place = given is not None and os.path.realpath(tokenizer_path) == os.path.realpath(tok_out)
    t0 = time.time()
    try:
        tok = _tokenizer_phase(journal, sources, cfg, opts, given, given_in_place, tok_out, progress)
        run = _Run(out_dir, cfg, opts, sources, journal, tok, special_ids(tok).sep, tok.token_to_id("."), progress,
                   workers=opts.workers or default_workers())
        _run_phases(run)
    except ReadError as e:
        raise ReadError(f"{e}; the output so far is kept: rerun the same command to resume") from None
    except WriteError as e:  # a full disk: what is written is complete and recorded in the journal
        raise WriteError(e.path, e.cause, f"{e}; the output so far is kept: rerun the same command to "
                                          f"resume") from None
    except UserError:
        for f in _data_files(out_dir):  # bad input: nothing half-written that looks valid
            _remove(os.path.join(out_dir, f))
        if not given_in_place:
            _remove(tok_out)
        for folder in created:  # deepest first; one the user filled meanwhile stays
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    except KeyboardInterrupt:
        _say(progress, f"\nprepare interrupted; {out_dir} is unfinished: rerun the same command to resume")
        raise
    manifest = _manifest(run, special_ids(tok), _holdout_section(run))
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    _remove(journal.path)
    st, ho = manifest["filter"], manifest["holdout"]
    _say(progress, f"prepared {manifest['total_blocks']} blocks of {cfg.seq_len} tokens in "
                   f"{len(manifest['shards'])} shard(s) ({st['kept_docs']} docs kept, {st['dropped_docs']} dropped "
                   f"by the filter, order {opts.order}); held out {ho['docs']} docs ({ho['blocks']} blocks) in "
                   f"{time.time() - t0:.0f}s -> {out_dir}")
    if ho["blocks"] == 0 and opts.holdout_rate > 0:
        _say(progress, f"note: the held-out documents fill no {cfg.seq_len}-token block: training will have no "
                       f"held-out loss; a larger --holdout-docs share or more text gives one")
    return manifest


def _tokenizer_phase(journal: Journal, sources: list[Input], cfg: DataConfig, opts: PrepareOptions, given,
                     given_in_place: bool, tok_out: str, progress: bool):
    """The tokenizer of this prepare: the given one or a trained one, written to tok_out in the first phase; read
    back (and checked against the journal) when a later phase resumes."""
    state = journal.state
    if state["phase"] == "tokenizer":
        tok = given if given is not None else _train(sources, cfg, opts, progress)
        if not given_in_place:
            save_tokenizer(tok, tok_out)
        state["tokenizer_hash"], state["phase"] = tokenizer_hash(tok), "stream"
        journal.save()
    elif given is not None:
        tok = given
    else:
        try:
            tok = load_tokenizer(tok_out)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"the unfinished prepare in {os.path.dirname(tok_out)} lost its tokenizer ({e}); "
                            f"delete the folder and prepare again") from None
    if tokenizer_hash(tok) != state["tokenizer_hash"]:
        raise UserError(f"{tok_out} changed since the unfinished prepare in {os.path.dirname(tok_out)} began; "
                        f"delete the folder and prepare again")
    try:
        special_ids(tok, source=tok_out)
    except ValueError as e:
        raise UserError(str(e)) from None
    if tok.get_vocab_size() > 65536:
        raise UserError(f"tokenizer vocabulary {tok.get_vocab_size()} does not fit uint16 shards (max 65536)")
    whole = why_not_separable(tok)
    if whole:
        _say(progress, f"note: {tok_out}: {whole}, so documents are encoded whole, without remembering words "
                       f"(exact, but several times slower)")
    if opts.order == "curriculum" and tok.token_to_id(".") is None:
        raise UserError(f"{tok_out} has no \".\" token, which --order curriculum counts; use another order")
    return tok


def _run_phases(run: _Run) -> None:
    state = run.journal.state
    if state["phase"] == "stream":
        _stream_phase(run)
    if state["phase"] == "scatter":
        _scatter_phase(run)
    if state["phase"] == "gather":
        _gather_phase(run)


def _holdout_section(run: _Run) -> dict:
    """The held-out split for the manifest: the rule, the counts, and holdout-00000.bin cut to whole blocks
    (idempotent, so a prepare killed after the cut finishes the same), or removed when it fills none."""
    opts, L = run.opts, run.cfg.seq_len
    final = run.journal.state["stream"]["holdout_final"]
    stats = run.journal.state["stream"]["stats"]
    blocks = final["tokens"] // L
    path = os.path.join(run.out_dir, HOLDOUT_FILE)
    shards = []
    if blocks:
        _truncate(path, blocks * L * 2, run.out_dir)
        shards.append(_shard_entry(run.out_dir, HOLDOUT_FILE, blocks, L))
    else:
        _remove(path)
    return {"rate": opts.holdout_rate, "max_docs": opts.holdout_max_docs,
            "seed": HOLDOUT_SEED if opts.holdout_rate > 0 else None, "selected_docs": final["selected_docs"],
            "docs": stats["holdout_docs"], "tokens": stats["holdout_tokens"], "blocks": blocks, "shards": shards}


def _manifest(run: _Run, ids, holdout: dict) -> dict:
    state, cfg, opts = run.journal.state, run.cfg, run.opts
    shards = state["stream"]["shards"] if opts.order == "stream" else state["gather"]["shards"]
    shards = [{k: s[k] for k in ("file", "blocks", "bytes", "sha256")} for s in shards]
    per_input = state["stream"]["inputs_final"]
    return {
        "format": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "vocab_size": run.tok.get_vocab_size(),
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_hash": state["tokenizer_hash"],
        "special_ids": ids.__dict__,
        "total_blocks": sum(s["blocks"] for s in shards),
        "shards": shards,
        "order": opts.order,
        "seed": opts.seed if opts.order != "stream" else None,
        "filter": {"threshold": cfg.compression_threshold,
                   **{k: v for k, v in state["stream"]["stats"].items() if not k.startswith("holdout_")}},
        "holdout": holdout,
        "limits": {"max_documents": opts.max_documents, "max_tokens": opts.max_tokens,
                   "tokenizer_sample_docs": opts.tokenizer_sample_docs},
        "inputs": [{"input": inp.spec, "weight": opts.weights[i] if opts.weights else None, "docs": row[0],
                    "kept_docs": row[1], "tokens": row[2], "chars": row[3]}
                   for i, (inp, row) in enumerate(zip(run.inputs, per_input))],
        "sources": [{"path": os.path.basename(f), "bytes": size} for inp in run.inputs
                    for f, size in zip(inp.files, inp.sizes)] + [{"path": i.spec} for i in run.inputs if not i.files],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
