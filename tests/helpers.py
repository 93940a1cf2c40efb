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
