"""Corpus -> filtered documents -> token shards (uint16 memmap + manifest) -> packed blocks -> MLM batches.

Shards hold whole 128-token blocks: documents are tokenised, joined with <sep> and cut into blocks, with no
padding. The manifest is written last and atomically, so a folder without one is recognisably unfinished.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from .config import DataConfig
from .errors import UserError
from .tokenizer import (SpecialIds, load_tokenizer, special_ids, tokenizer_hash, train_tokenizer,
                        save_tokenizer)

TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".jsonl", ".jsonl.gz")
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


# ---------------------------------------------------------------- reading text

def find_text_files(paths: Iterable[str]) -> list[str]:
    """Expand files and folders (recursively, sorted) into the text files fastcram reads."""
    files = []
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"input path {p} does not exist; pass an existing file or folder with --input")
        if os.path.isdir(p):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(p) for f in names
                           if f.endswith(TEXT_SUFFIXES))
            if not found:
                raise UserError(f"folder {p} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
            files += found
        elif p.endswith(TEXT_SUFFIXES):
            files.append(p)
        else:
            raise UserError(f"{p} is not a supported text file; use one of {', '.join(TEXT_SUFFIXES)}")
    return files


def _open_text(path: str):
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="strict")


def _plain_documents(lines: Iterable[str], doc_chars: int) -> Iterator[str]:
    """Blank-line paragraphs grouped into documents of about doc_chars characters."""
    doc: list[str] = []
    size = 0
    for line in lines:
        line = line.strip()
        at_paragraph_end = not line
        if line:
            doc.append(line)
            size += len(line) + 1
        # Flush at a paragraph boundary once big enough; texts without blank lines flush at 2x.
        if size >= doc_chars and (at_paragraph_end or size >= 2 * doc_chars):
            yield " ".join(doc)
            doc, size = [], 0
    if doc:
        yield " ".join(doc)


def _jsonl_documents(lines: Iterable[str], path: str) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not a JSON object with a \"text\" field; fix or remove that line") from None
        if not isinstance(text, str):
            raise UserError(f"{path}:{n}: field \"text\" is not a string")
        if text.strip():
            yield text


def iter_documents(files: list[str], doc_chars: int) -> Iterator[str]:
    """All documents of all files, streamed. A file that is not UTF-8 stops the run, named."""
    for path in files:
        try:
            with _open_text(path) as f:
                if ".jsonl" in os.path.basename(path):
                    yield from _jsonl_documents(f, path)
                else:
                    yield from _plain_documents(f, doc_chars)
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                            f"or leave it out") from None
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise UserError(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------- writing shards

def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FilterStats:
    kept_docs: int = 0
    dropped_docs: int = 0
    kept_tokens: int = 0
    dropped_tokens: int = 0
    chars: int = 0


class ShardWriter:
    """Accumulates token ids and writes full shards of whole blocks, each atomically."""

    def __init__(self, out_dir: str, seq_len: int, shard_blocks: int):
        self.out_dir, self.seq_len, self.shard_blocks = out_dir, seq_len, shard_blocks
        self.buf = np.empty(shard_blocks * seq_len, dtype=np.uint16)
        self.fill = 0
        self.shards: list[dict] = []

    def add(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=np.uint16)
        while len(arr):
            take = min(len(arr), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + take] = arr[:take]
            self.fill += take
            arr = arr[take:]
            if self.fill == len(self.buf):
                self._write(self.fill)

    def _write(self, n_tokens: int) -> None:
        blocks = n_tokens // self.seq_len
        if blocks == 0:
            return
        name = f"shard-{len(self.shards):05d}.bin"
        path = os.path.join(self.out_dir, name)
        _atomic_write_bytes(path, self.buf[:blocks * self.seq_len].tobytes())
        self.shards.append({"file": name, "blocks": blocks, "bytes": blocks * self.seq_len * 2,
                            "sha256": _sha256(path)})
        self.fill = 0

    def close(self) -> None:
        self._write(self.fill)  # the tail that does not fill a block is dropped (no padding)

    def remove_written(self) -> None:
        for s in self.shards:
            try:
                os.remove(os.path.join(self.out_dir, s["file"]))
            except OSError:
                pass


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(inputs: list[str], out_dir: str, cfg: DataConfig, tokenizer_path: str | None = None,
            progress: bool = True) -> dict:
    """Prepare a corpus into out_dir (tokenizer.json, shard-*.bin, manifest.json); returns the manifest."""
    files = find_text_files(inputs)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise UserError(f"{out_dir} already holds a prepared corpus ({MANIFEST}); choose another --out "
                        f"or delete it first")
    os.makedirs(out_dir, exist_ok=True)
    tok_out = os.path.join(out_dir, TOKENIZER_FILE)
    if tokenizer_path:
        try:
            tok = load_tokenizer(tokenizer_path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--tokenizer: {e}") from None
        if os.path.abspath(tokenizer_path) != os.path.abspath(tok_out):
            save_tokenizer(tok, tok_out)
    else:
        _say(progress, f"training a WordPiece tokenizer (vocab {cfg.vocab_size}) on {len(files)} file(s)")
        tok = train_tokenizer(iter_documents(files, cfg.doc_chars), cfg.vocab_size)
        if tok.get_vocab_size() < 8:
            raise UserError(f"the input ({', '.join(inputs)}) holds no text to train a tokenizer on")
        save_tokenizer(tok, tok_out)
    ids = special_ids(tok, source=tok_out)
    if tok.get_vocab_size() > 65536:
        raise UserError(f"tokenizer vocabulary {tok.get_vocab_size()} does not fit uint16 shards (max 65536)")

    writer = ShardWriter(out_dir, cfg.seq_len, cfg.shard_blocks)
    stats = FilterStats()
    t0, last = time.time(), 0.0
    try:
        for batch in _batched(iter_documents(files, cfg.doc_chars), 512):
            for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False)):
                n_tok, n_chr = len(enc.ids), max(len(text), 1)
                stats.chars += n_chr
                if n_tok == 0 or n_tok / n_chr >= cfg.compression_threshold:  # compresses badly: noise
                    stats.dropped_docs += 1
                    stats.dropped_tokens += n_tok
                    continue
                stats.kept_docs += 1
                stats.kept_tokens += n_tok
                writer.add(enc.ids + [ids.sep])
            if progress and time.time() - last > 2:
                last = time.time()
                mb = stats.chars / 1e6
                _say(True, f"  {stats.kept_docs + stats.dropped_docs} docs, {stats.kept_tokens / 1e6:.1f}M tokens, "
                           f"{mb / max(last - t0, 1e-9):.1f} MB/s", end="\r")
        writer.close()
        total = sum(s["blocks"] for s in writer.shards)
        if total == 0:
            raise UserError(f"the input ({', '.join(inputs)}) yields no complete {cfg.seq_len}-token block after "
                            f"the compression filter (kept {stats.kept_docs} of "
                            f"{stats.kept_docs + stats.dropped_docs} documents); give more text or raise "
                            f"--compression-threshold")
    except BaseException:
        writer.remove_written()  # nothing half-written that looks valid
        raise
    manifest = {
        "format": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_hash": tokenizer_hash(tok),
        "special_ids": ids.__dict__,
        "total_blocks": total,
        "shards": writer.shards,
        "filter": {"threshold": cfg.compression_threshold, **stats.__dict__},
        "sources": [{"path": os.path.basename(f), "bytes": os.path.getsize(f)} for f in files],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    _say(progress, f"prepared {total} blocks of {cfg.seq_len} tokens in {len(writer.shards)} shard(s) "
                   f"({stats.kept_docs} docs kept, {stats.dropped_docs} dropped by the filter) "
                   f"in {time.time() - t0:.0f}s -> {out_dir}")
    return manifest


def _say(on: bool, msg: str, end: str = "\n") -> None:
    if on:
        print(msg, end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- reading shards

class BlockDataset:
    """The prepared blocks of a data folder, memory-mapped: [total_blocks, seq_len] uint16."""

    def __init__(self, data_dir: str):
        path = os.path.join(data_dir, MANIFEST)
        if not os.path.isfile(path):
            raise UserError(f"{data_dir} has no {MANIFEST}: not a prepared corpus (or an unfinished one); "
                            f"run `fastcram data prepare --out {data_dir}`")
        try:
            with open(path) as f:
                self.manifest = json.load(f)
            self.seq_len = int(self.manifest["seq_len"])
            shards = self.manifest["shards"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} is not a valid fastcram manifest ({e}); prepare the data again") from None
        self.dir = data_dir
        self.tokenizer_path = os.path.join(data_dir, self.manifest.get("tokenizer", TOKENIZER_FILE))
        try:
            tok = load_tokenizer(self.tokenizer_path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        if tokenizer_hash(tok) != self.manifest.get("tokenizer_hash"):
            raise UserError(f"{self.tokenizer_path} does not match the tokenizer the shards in {data_dir} were "
                            f"made with (hash differs); prepare the data again with this tokenizer")
        self.tokenizer = tok
        self.special = special_ids(tok, source=self.tokenizer_path)
        self.vocab_size = tok.get_vocab_size()
        self.shards = []
        for s in shards:
            f = os.path.join(data_dir, s["file"])
            if not os.path.isfile(f) or os.path.getsize(f) != s["bytes"]:
                raise UserError(f"shard {f} is missing or has the wrong size (manifest says {s['bytes']} bytes); "
                                f"prepare the data again")
            self.shards.append(np.memmap(f, dtype=np.uint16, mode="r", shape=(s["blocks"], self.seq_len)))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.total_blocks = int(self.starts[-1])

    def verify(self, sample: int | None = 2, seed: int | None = None) -> list[str]:
        """Check shard checksums against the manifest: `sample` random shards, or all when None.

        Sizes were already checked on open. Returns the files checked; a mismatch is a UserError naming it.
        """
        entries = self.manifest["shards"]
        if sample is not None and sample < len(entries):
            rng = np.random.default_rng(seed)
            entries = [entries[i] for i in sorted(rng.choice(len(entries), sample, replace=False))]
        for s in entries:
            path = os.path.join(self.dir, s["file"])
            if _sha256(path) != s["sha256"]:
                raise UserError(f"shard {path} is corrupt (its checksum differs from {MANIFEST}); prepare the data "
                                f"again or restore the file")
        return [s["file"] for s in entries]

    def __len__(self) -> int:
        return self.total_blocks

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Blocks at the given global indices: [len(indices), seq_len] uint16."""
        out = np.empty((len(indices), self.seq_len), dtype=np.uint16)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for j, (s, i) in enumerate(zip(shard_of, indices)):
            out[j] = self.shards[s][i - self.starts[s]]
        return out


@dataclass
class DataPosition:
    """Where the loader stands: the epoch and the index of the next block in that epoch's permutation."""
    epoch: int = 0
    cursor: int = 0


class BlockLoader:
    """Deterministic shuffled micro-batches of blocks, prefetched on a thread into (pinned) host memory.

    The order is a function of (seed, epoch) only, so a position restores exactly. A batch that would run
    past the end of an epoch starts the next epoch instead (each epoch drops its < micro_batch tail).
    """

    def __init__(self, data: BlockDataset, micro_batch: int, seed: int, position: DataPosition | None = None,
                 pin: bool = False, prefetch: int = 4):
        if micro_batch > len(data):
            raise UserError(f"--micro-batch {micro_batch} exceeds the {len(data)} blocks of {data.dir}; "
                            f"use a smaller micro-batch or more data")
        self.data, self.micro_batch, self.seed, self.pin = data, micro_batch, seed, pin
        self.position = position or DataPosition()  # of the next batch handed to the caller
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(DataPosition(**self.position.__dict__),),
                                        daemon=True)
        self._thread.start()

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def _produce(self, pos: DataPosition) -> None:
        order = self._order(pos.epoch)
        try:
            while not self._stop.is_set():
                if pos.cursor + self.micro_batch > len(order):
                    pos = DataPosition(pos.epoch + 1, 0)
                    order = self._order(pos.epoch)
                idx = order[pos.cursor:pos.cursor + self.micro_batch]
                batch = torch.from_numpy(self.data.gather(idx).astype(np.int64))  # [B, L]
                if self.pin:
                    batch = batch.pin_memory()
                pos = DataPosition(pos.epoch, pos.cursor + self.micro_batch)
                self._put((batch, pos))
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._put((e, None))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[torch.Tensor, float]:
        """The next micro-batch [B, L] int64 (host) and the seconds spent waiting for it."""
        t0 = time.perf_counter()
        batch, pos = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        self.position = pos
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# ---------------------------------------------------------------- masking

@dataclass
class MLMBatch:
    input_ids: torch.Tensor  # [B, L] int64, with the predicted positions replaced 80/10/10
    positions: torch.Tensor  # [B * m] int64, flat indices (row * L + col) of the predicted tokens
    labels: torch.Tensor  # [B * m] int64, the original tokens at those positions


def mask_batch(ids: torch.Tensor, cfg: DataConfig, special: SpecialIds, vocab_size: int,
               generator: torch.Generator) -> MLMBatch:
    """Choose exactly round(p * L) distinct positions per row; 80% <mask>, 10% random token, 10% unchanged.

    Runs on ids' device with static shapes, so the count of predicted rows never depends on the data.
    """
    B, L = ids.shape
    m = cfg.masked_per_seq
    dev = ids.device
    scores = torch.rand(B, L, generator=generator, device=dev)
    cols = scores.topk(m, dim=1).indices  # [B, m] distinct columns per row
    labels = ids.gather(1, cols)  # [B, m]
    r = torch.rand(B, m, generator=generator, device=dev)
    lo = max(special.all) + 1  # random replacements are never special tokens
    random_ids = torch.randint(lo, vocab_size, (B, m), generator=generator, device=dev)
    replaced = torch.where(r < cfg.mask_token_frac, torch.full_like(labels, special.mask),
                           torch.where(r < cfg.mask_token_frac + cfg.random_token_frac, random_ids, labels))
    inputs = ids.scatter(1, cols, replaced)  # [B, L]
    positions = (cols + torch.arange(B, device=dev).unsqueeze(1) * L).reshape(-1)  # [B * m]
    return MLMBatch(inputs, positions, labels.reshape(-1))


# ---------------------------------------------------------------- the built-in corpus

def builtin_corpus_path() -> str:
    return os.path.join(os.path.dirname(__file__), "corpus", "pd_lit.txt.xz")


def cache_dir() -> str:
    return os.environ.get("FASTCRAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastcram")


def builtin_data(vocab_size: int, cfg: DataConfig | None = None, progress: bool = True) -> str:
    """The built-in corpus prepared with a tokenizer of vocab_size; prepared once, then reused."""
    out = os.path.join(cache_dir(), f"pd_lit-v{vocab_size}")
    if os.path.isfile(os.path.join(out, MANIFEST)):
        return out
    _say(progress, f"preparing the built-in corpus once into {out}")
    cfg = cfg or DataConfig()
    cfg = DataConfig(**{**cfg.__dict__, "vocab_size": vocab_size})
    prepare([builtin_corpus_path()], out, cfg, progress=progress)
    return out
