"""The run log (JSONL, one record per log interval), its records and the progress line on stderr."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable

from ..files import JsonlAppender, WriteError
from .metrics import mfu


def say(on: bool, msg: str) -> None:
    if on:
        print(msg, file=sys.stderr, flush=True)


class RunLog:
    """Append-only JSONL: one record per log interval, each a whole line, fsynced so a crash loses at most the
    record being written.

    Opening repairs a last line cut by a crash (the bytes removed are recorded). A record that cannot be
    written (a full disk) never stops the run: the file is left as it was before the record (files.JsonlAppender),
    the failure is reported through `warn` (at most once every WARN_EVERY_S: a nearly full disk takes some
    records and not others), and the next record that is written says how many were lost ("log-gap"). Opening
    raises WriteError when the file cannot be created."""

    WARN_EVERY_S = 600.0

    def __init__(self, path: str, warn: Callable[[str], None] | None = None):
        self.path = path
        self.warn = warn or (lambda msg: say(True, msg))
        self._out = JsonlAppender(path, sync=True)
        self.lost = 0  # records not written since the last one that was
        self._warned_at: float | None = None
        if self._out.repaired_bytes:
            self.write({"event": "log-repaired", "removed_bytes": self._out.repaired_bytes,
                        "note": "the last line was cut by a crash or a full disk and was removed"})

    def write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        try:
            if self.lost:
                self._out.append({"time": record["time"], "event": "log-gap", "lost_records": self.lost})
                self.lost = 0
            self._out.append(record)
        except WriteError as e:
            now = time.monotonic()
            if self._warned_at is None or now - self._warned_at >= self.WARN_EVERY_S:
                self.warn(f"fastcram: run log: {e}; training goes on; records that cannot be written are lost "
                          f"(the log says how many where it continues)")
                self._warned_at = now
            self.lost += 1

    def close(self) -> None:
        self._out.close()


class NullLog:
    """The run log of ranks other than 0."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def log_record(state, interval, loss_sum, grad_norm, lr, accum, global_micro, clock, t, tokens_per_seq, fpt,
                peak, skipped):
    """One log record; the only place the loop reads device values (a host sync, once per interval)."""
    dt = max(t - interval["t"], 1e-9)
    tok_s = interval["seqs"] * tokens_per_seq / dt
    u = mfu(tok_s, fpt, peak)
    good = interval["steps"] - skipped
    norm = float(grad_norm)
    return {"step": state.step, "loss": round(loss_sum.item() / good, 6) if good else None,
            "grad_norm": round(norm, 4) if math.isfinite(norm) else None, "lr": lr, "batch_size": accum * global_micro,
            "tokens_per_s": round(tok_s, 1), "mfu": None if u is None else round(u, 4),
            "skipped_steps": skipped, "data_wait_s": round(interval["wait"], 4),
            "budget_spent_s": round(clock.elapsed(), 3), "progress": round(clock.progress(), 5),
            "sequences": state.sequences, "data_position": dataclasses.asdict(state.position)}


def progress_line(on: bool, rec: dict) -> None:
    m = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
    loss = "nan" if rec["loss"] is None else f"{rec['loss']:.4f}"
    held = f"  held-out {rec['eval_loss']:.4f}" if rec.get("eval_loss") is not None else ""
    say(on, f"[{100 * rec['progress']:5.1f}% budget] step {rec['step']:6d}  loss {loss}{held}  "
               f"lr {rec['lr']:.2e}  batch {rec['batch_size']}  {rec['tokens_per_s'] / 1e3:.1f}k tok/s  "
               f"MFU {m}  data wait {rec['data_wait_s']:.2f}s" + (f"  skipped {rec['skipped_steps']}"
                                                                  if rec["skipped_steps"] else ""))
