"""Prepared shards -> packed blocks -> MLM batches: what training reads.

Shards hold whole 128-token blocks (written by prepare.py: documents tokenised, joined with <sep> and cut into
blocks, no padding). This module memory-maps them, orders them for training (two-level shuffle), prefetches
on a thread and masks batches with a fixed number of predicted tokens per sequence.

Every shard is verified before its first use (SHA-256 against the manifest, token ids inside the vocabulary):
on the loader's thread, ahead of time while the prefetch queue is full, so the training loop does not wait for
it. A shard that fails is a ShardError naming it; it is never skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from ..files import inside
from .prepare import MANIFEST, TOKENIZER_FILE
from .tokenizer import SpecialIds, load_tokenizer, special_ids, tokenizer_hash

# ---------------------------------------------------------------- reading shards

class ShardError(UserError):
    """A shard that does not hold what its manifest says (checksum, token ids); the message names the file."""


def _manifest_shards(manifest: dict, path: str, data_dir: str) -> tuple[int, list[dict]]:
    """(seq_len, shard entries) of a manifest, every field checked; UserError naming what is wrong."""
    def bad(what: str) -> UserError:
        return UserError(f"{path} {what}; prepare the data again (fastcram data prepare --out {data_dir})")

    seq_len, shards = manifest.get("seq_len"), manifest.get("shards")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise bad(f"gives seq_len {seq_len!r}; it must be a positive whole number")
    if not isinstance(shards, list):
        raise bad("has no list of shards")
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise bad(f"has a shard entry that is not an object (entry {i})")
        name = s.get("file", f"entry {i}")
        blocks, size, sha = s.get("blocks"), s.get("bytes"), s.get("sha256")
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise bad(f"gives shard {name} {blocks!r} blocks; it must be a positive whole number")
        if size != blocks * seq_len * 2:
            raise bad(f"gives shard {name} {size!r} bytes, not its {blocks} blocks of {seq_len} uint16 tokens")
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise bad(f"has no SHA-256 checksum of shard {name}, so it cannot be verified")
    return seq_len, shards


class BlockDataset:
    """The prepared blocks of a data folder, memory-mapped: [total_blocks, seq_len] uint16.

    Shards are mapped on first use and at most MAX_OPEN stay mapped (each map holds a file descriptor), so a
    folder may hold any number of shards of any size.
    """

    MAX_OPEN = 64

    def __init__(self, data_dir: str):
        path = os.path.join(data_dir, MANIFEST)
        if not os.path.isfile(path):
            raise UserError(f"{data_dir} has no {MANIFEST}: not a prepared corpus (or an unfinished one); "
                            f"run `fastcram data prepare --out {data_dir}`")
        try:
            with open(path, "rb") as f:
                self.manifest = json.loads(f.read().decode("utf-8"))
            if not isinstance(self.manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a valid fastcram manifest ({e}); prepare the data again") from None
        self.seq_len, shards = _manifest_shards(self.manifest, path, data_dir)
        self.shard_blocks = np.array([s["blocks"] for s in shards], dtype=np.int64)
        try:  # a manifest names files relative to its folder; nothing outside it is read
            self.shard_files = [inside(data_dir, s["file"]) for s in shards]
            self.tokenizer_path = inside(data_dir, self.manifest.get("tokenizer", TOKENIZER_FILE))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} names a file that is not in {data_dir} ({e}); prepare the data again") from None
        self.dir = data_dir
        self.order = self.manifest.get("order", "stream")  # folders made before orders existed: as read
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
        self.holdout, self.no_holdout_reason = HeldOutBlocks.open(data_dir, self.manifest, self.seq_len)
        for f, s in zip(self.shard_files, shards):
            if not os.path.isfile(f) or os.path.getsize(f) != s["bytes"]:
                raise UserError(f"shard {f} is missing or has the wrong size (manifest says {s['bytes']} bytes); "
                                f"prepare the data again")
        self.starts = np.concatenate([[0], np.cumsum(self.shard_blocks)]).astype(np.int64)
        self.total_blocks = int(self.starts[-1])
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._lock = threading.Lock()
        self._verified: set[int] = set()
        self._failed: dict[int, ShardError] = {}
        self._verify_lock = threading.Lock()

    def verify(self, sample: int | None = None, seed: int | None = None) -> list[str]:
        """Verify shards now (verify_shard): all of them, or `sample` random ones. Returns the files checked."""
        which = range(len(self.shard_files))
        if sample is not None and sample < len(which):
            which = sorted(np.random.default_rng(seed).choice(len(which), sample, replace=False))
        for i in which:
            self.verify_shard(int(i))
        return [self.manifest["shards"][i]["file"] for i in which]

    def is_verified(self, i: int) -> bool:
        return i in self._verified

    def verify_shard(self, i: int) -> None:
        """Shard i's SHA-256 equals the manifest's and its token ids are inside the vocabulary, or ShardError
        naming the file. Each shard is read once (one pass for both checks); later calls return at once."""
        if i in self._verified:
            return
        with self._verify_lock:
            if i in self._verified:
                return
            if i in self._failed:
                raise self._failed[i]
            try:
                self._verify_now(i)
            except ShardError as e:
                self._failed[i] = e
                raise
            self._verified.add(i)

    def _verify_now(self, i: int) -> None:
        path, entry = self.shard_files[i], self.manifest["shards"][i]
        sha, top = hashlib.sha256(), 0
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    sha.update(chunk)
                    ids = np.frombuffer(chunk, dtype=np.uint16, count=len(chunk) // 2)
                    top = max(top, int(ids.max())) if len(ids) else top
        except OSError as e:
            raise ShardError(f"shard {path} cannot be read ({e.strerror or e}); restore the file or prepare the "
                             f"data again") from None
        if sha.hexdigest() != entry["sha256"]:
            raise ShardError(f"shard {path} is corrupt (its checksum differs from {MANIFEST}); prepare the data "
                             f"again or restore the file")
        if top >= self.vocab_size:
            raise ShardError(f"shard {path} holds token id {top}, outside the {self.vocab_size}-token vocabulary of "
                             f"{self.tokenizer_path}; prepare the data again")

    def __len__(self) -> int:
        return self.total_blocks

    def shard(self, i: int) -> np.memmap:
        """Shard i mapped read-only: [blocks, seq_len] uint16; verified before its first use."""
        self.verify_shard(i)
        with self._lock:
            m = self._maps.get(i)
            if m is None:
                m = np.memmap(self.shard_files[i], dtype=np.uint16, mode="r",
                              shape=(int(self.shard_blocks[i]), self.seq_len))
                self._maps[i] = m
                if len(self._maps) > self.MAX_OPEN:
                    self._maps.popitem(last=False)
            else:
                self._maps.move_to_end(i)
            return m

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Blocks at the given global indices: [len(indices), seq_len] uint16."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.seq_len), dtype=np.uint16)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            out[rows] = self.shard(int(s))[indices[rows] - self.starts[s]]
        return out


class HeldOutBlocks:
    """The held-out split of a data folder (manifest "holdout"): whole documents `data prepare` set aside,
    in their own files, which the training loader never reads."""

    def __init__(self, data_dir: str, section: dict, seq_len: int):
        self.dir, self.section, self.seq_len = data_dir, section, seq_len
        path = os.path.join(data_dir, MANIFEST)
        try:
            self.entries = [{**s, "path": inside(data_dir, s["file"])} for s in section["shards"]]
            self.total_blocks = sum(int(s["blocks"]) for s in self.entries)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} has an invalid held-out split ({e}); prepare the data again") from None
        for s in self.entries:
            if not os.path.isfile(s["path"]) or os.path.getsize(s["path"]) != s["bytes"]:
                raise UserError(f"held-out shard {s['path']} is missing or has the wrong size (manifest says "
                                f"{s['bytes']} bytes); prepare the data again")

    @staticmethod
    def open(data_dir: str, manifest: dict, seq_len: int) -> tuple["HeldOutBlocks | None", str | None]:
        """(the held-out split, None) or (None, why there is none)."""
        section = manifest.get("holdout")
        if section is None:
            return None, (f"{data_dir} has no held-out split (prepared by a fastcram before held-out splits, "
                          f"manifest format {manifest.get('format', 1)}); prepare it again to get one")
        if not section.get("blocks"):
            return None, (f"the held-out split of {data_dir} is empty (its held-out documents fill no block); "
                          f"prepare it again with a larger --holdout-docs share")
        return HeldOutBlocks(data_dir, section, seq_len), None

    def __len__(self) -> int:
        return self.total_blocks

    def read(self, count: int | None = None) -> np.ndarray:
        """`count` blocks spread evenly over the split (all when None or more), in a fixed order:
        [n, seq_len] uint16, in memory. Every held-out file's checksum is checked first."""
        from ..files import sha256_file  # (imported here: the training shards' verification is the loader's own)

        for s in self.entries:
            if sha256_file(s["path"]) != s["sha256"]:
                raise UserError(f"held-out shard {s['path']} is corrupt (its checksum differs from {MANIFEST}); "
                                f"prepare the data again")
        n = self.total_blocks
        rows = np.arange(n) if count is None or count >= n else np.linspace(0, n - 1, count).round().astype(np.int64)
        starts = np.cumsum([0] + [int(s["blocks"]) for s in self.entries])
        out = np.empty((len(rows), self.seq_len), dtype=np.uint16)
        for i, s in enumerate(self.entries):
            mine = np.flatnonzero((rows >= starts[i]) & (rows < starts[i + 1]))
            if len(mine):
                shard = np.memmap(s["path"], dtype=np.uint16, mode="r", shape=(int(s["blocks"]), self.seq_len))
                out[mine] = shard[rows[mine] - starts[i]]
                del shard
        return out


CHUNK_BLOCKS = 1 << 16  # first shuffle level: runs of consecutive blocks (16 MiB of tokens at seq 128)
WINDOW_CHUNKS = 16  # second level: the blocks of this many chunks are permuted together (8 MiB of indices)


class EpochOrder:
    """The block order of one epoch, built one window at a time: memory O(window) for any amount of data.

    Shuffled: blocks are cut into chunks of `chunk_blocks` consecutive indices; the chunks are permuted; then
    the blocks of each window of `window_chunks` chunks are permuted. Data of up to chunk_blocks *
    window_chunks blocks is thus one full permutation. Every draw depends only on (seed, epoch, window), so
    any position is reached again without replaying the epoch. Unshuffled: 0, 1, 2, ...
    """

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool = True, chunk_blocks: int | None = None,
                 window_chunks: int | None = None):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.chunk_blocks = chunk_blocks = chunk_blocks or CHUNK_BLOCKS
        window_chunks = window_chunks or WINDOW_CHUNKS
        n_chunks = -(-n // chunk_blocks)
        self.chunks = np.random.default_rng([seed, epoch]).permutation(n_chunks) if shuffle else None
        if shuffle:
            self.windows = [self.chunks[i:i + window_chunks] for i in range(0, n_chunks, window_chunks)]
            sizes = [sum(self._chunk_size(c) for c in w) for w in self.windows]
            self.window_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cached: tuple[int, np.ndarray] | None = None

    def _chunk_size(self, c: int) -> int:
        return min(self.chunk_blocks, self.n - c * self.chunk_blocks)

    def _window(self, w: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != w:
            blocks = np.concatenate([np.arange(c * self.chunk_blocks, c * self.chunk_blocks + self._chunk_size(c))
                                     for c in self.windows[w]])
            self._cached = (w, np.random.default_rng([self.seed, self.epoch, w]).permutation(blocks))
        return self._cached[1]

    def ranges_ahead(self, start: int) -> list[tuple[int, int]]:
        """Ranges [lo, hi) of global block indices that positions from `start` on will read next: the chunks of
        the current and the next window (as read in order: the next two windows' worth of blocks)."""
        span = self.chunk_blocks * (len(self.windows[0]) if self.shuffle and self.windows else WINDOW_CHUNKS)
        if not self.shuffle:
            return [(start, min(self.n, start + 2 * span))] if start < self.n else []
        w = int(np.searchsorted(self.window_starts, start, side="right")) - 1
        chunks = [c for window in self.windows[max(w, 0):w + 2] for c in window]
        return [(int(c) * self.chunk_blocks, int(c) * self.chunk_blocks + self._chunk_size(int(c))) for c in chunks]

    def take(self, start: int, count: int) -> np.ndarray:
        """Positions [start, start + count) of this epoch's order: global block indices, int64."""
        if not 0 <= start <= start + count <= self.n:
            raise IndexError(f"positions {start}..{start + count} outside an epoch of {self.n} blocks")
        if not self.shuffle:
            return np.arange(start, start + count, dtype=np.int64)
        parts = []
        while count > 0:
            w = int(np.searchsorted(self.window_starts, start, side="right")) - 1
            offset = start - self.window_starts[w]
            part = self._window(w)[offset:offset + count]
            parts.append(part)
            start += len(part)
            count -= len(part)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


@dataclass
class DataPosition:
    """Where the loader stands: the epoch and the index of the next block in that epoch's order."""
    epoch: int = 0
    cursor: int = 0


class BlockLoader:
    """Deterministic micro-batches of blocks, prefetched on a thread into (pinned) host memory.

    The order is EpochOrder(seed, epoch): shuffled in two levels, or as stored when the data was sorted by a
    curriculum (shuffle=None follows the data's order: a curriculum is read in order, anything else
    shuffled). A position restores exactly. A batch that would run past the end of an epoch starts the next
    epoch instead (each epoch drops its < micro_batch tail).
    """

    def __init__(self, data: BlockDataset, micro_batch: int, seed: int, position: DataPosition | None = None,
                 pin: bool = False, prefetch: int = 4, shuffle: bool | None = None):
        if micro_batch > len(data):
            raise UserError(f"--micro-batch {micro_batch} exceeds the {len(data)} blocks of {data.dir}; "
                            f"use a smaller micro-batch or more data")
        self.data, self.micro_batch, self.seed, self.pin = data, micro_batch, seed, pin
        self.shuffle = data.order != "curriculum" if shuffle is None else shuffle
        self.position = position or DataPosition()  # of the next batch handed to the caller
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._ahead: tuple[EpochOrder, int] | None = None  # (order, cursor) being produced: what to verify next
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(DataPosition(**self.position.__dict__),),
                                        daemon=True)
        self._thread.start()

    def _order(self, epoch: int) -> EpochOrder:
        return EpochOrder(len(self.data), self.seed, epoch, self.shuffle)

    def _produce(self, pos: DataPosition) -> None:
        try:
            order = self._order(pos.epoch)
            while not self._stop.is_set():
                if pos.cursor + self.micro_batch > len(self.data):
                    pos = DataPosition(pos.epoch + 1, 0)
                    order = self._order(pos.epoch)
                self._ahead = (order, pos.cursor)
                idx = order.take(pos.cursor, self.micro_batch)
                batch = torch.from_numpy(self.data.gather(idx).astype(np.int64))  # [B, L] (shards verified first)
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
                self._verify_ahead()

    def _verify_ahead(self) -> None:
        """While the queue is full: verify one shard that the next batches will read, so that a batch rarely
        waits for a checksum. A shard that fails is left for gather() to raise in order."""
        if self._ahead is None:
            return
        order, cursor = self._ahead
        starts = self.data.starts
        for lo, hi in order.ranges_ahead(cursor):
            first = int(np.searchsorted(starts, lo, side="right")) - 1
            last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
            for i in range(first, last + 1):
                if not self.data.is_verified(i):
                    try:
                        self.data.verify_shard(i)
                    except ShardError:
                        self._ahead = None  # gather() raises it when the data gets there
                    return

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
