"""argparse value types shared by every subcommand: bad values become one-line usage errors (exit 2)."""
from __future__ import annotations

import argparse


def positive_int(flag: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs a whole number, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {s}")
        return v
    return parse


def positive_float(flag: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs a number, got {s!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {s}")
        return v
    return parse
