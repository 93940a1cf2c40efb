"""Shared test helpers: a small real corpus and a fake clock."""
from __future__ import annotations

import lzma
import os

from fastcram.data.builtin import builtin_corpus_path


def write_small_corpus(path: str, chars: int = 200_000) -> str:
    """The first `chars` characters of the built-in corpus as a plain .txt file."""
    with lzma.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        text = f.read(chars)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class FakeClock:
    """A clock that advances `tick` seconds every time it is read."""

    def __init__(self, tick: float = 1.0, start: float = 1000.0):
        self.t, self.tick = start, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def _splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def held_out_indices(n_docs: int, rate: float = 0.01, max_docs: int | None = 1000, seed: int = 0) -> list[int]:
    """The documents `data prepare` holds out, by their index in the stream, computed independently of it
    (plain Python integers): splitmix64(index ^ splitmix64(seed)) / 2^64 below rate, the first max_docs."""
    key = _splitmix64(seed)
    chosen = [i for i in range(n_docs) if (_splitmix64(i ^ key) >> 11) * 2.0 ** -53 < rate]
    return chosen if max_docs is None else chosen[:max_docs]
