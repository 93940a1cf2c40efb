"""The run log (JSONL, one record per log interval), its records and the progress line on stderr."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from .metrics import mfu


def say(on: bool, msg: str) -> None:
    if on:
        print(msg, file=sys.stderr, flush=True)


class RunLog:
    """Append-only JSONL: one record per log interval, flushed so a crash loses at most one line."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


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
    return {"step": state.step, "loss": round(loss_sum.item() / good, 6) if good else None,
            "grad_norm": round(float(grad_norm), 4), "lr": lr, "batch_size": accum * global_micro,
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
