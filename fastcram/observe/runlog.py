"""The run log (JSONL, one record per log interval), its records, the run's summary (summary.json and the log's
end record) and the lines the progress output shows on stderr."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable

from ..files import JsonlAppender, WriteError, atomic_write_json
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


def show_switch(value) -> str:
    """A switch's value as the start line shows it: kernels (op -> backend) as one backend when they all agree."""
    if isinstance(value, dict):
        return next(iter(set(value.values()))) if len(set(value.values())) == 1 else \
            "+".join(f"{op}:{b}" for op, b in value.items())
    return str(value)


def start_line(*, preset: str, params: int, device: str, world: int, micro_batch: int, budget_s: float,
               run_dir: str, switches: dict, caches: str | None) -> str:
    """What the progress output says first: the run, its switches and how each was chosen, the compile caches."""
    return (f"fastcram: {preset} ({params / 1e6:.1f}M params) on {device}" +
            (f" x {world} processes" if world > 1 else "") +
            f", micro-batch {micro_batch}, budget {budget_s / 60:.1f} min, run folder {run_dir}"
            f"\n  switches: " + ", ".join(f"{k} {show_switch(v['value'])} ({v['how']})" for k, v in switches.items())
            + (f"\n  compile caches: {caches}" if caches else ""))


def startup_line(startup: dict) -> str:
    return (f"start-up {startup['startup_s']:.1f} s: tuning {startup['tuning_s']:.1f} s, model "
            f"{startup['build_s']:.1f} s, first step (compile) {startup['first_step_s']:.1f} s")


def summary_record(*, run_dir: str, steps: int, micro_steps: int, sequences: int, tokens: int, world_size: int,
                   budget_s: float, budget_spent_s: float, first_loss: float | None, final_loss: float | None,
                   skipped_steps: int, final_checkpoint: str, device: str, ops: dict, telemetry: dict,
                   switches: dict, profile: dict | None, startup: dict, peak_mem_mib: float | None,
                   flops_per_token: float, final_eval_loss: float | None, evals: dict, target: dict | None) -> dict:
    """summary.json and the run log's "end" record, from plain values; `switches` is the start record's
    {switch: {"value", "how"}}, of which the summary keeps the values."""
    return {"run_dir": run_dir, "steps": steps, "micro_steps": micro_steps, "sequences": sequences, "tokens": tokens,
            "world_size": world_size, "budget_s": budget_s, "budget_spent_s": round(budget_spent_s, 3),
            "first_logged_loss": first_loss, "final_loss": final_loss, "skipped_steps": skipped_steps,
            "final_checkpoint": final_checkpoint, "device": device, "ops": ops, "telemetry": telemetry,
            "switches": {k: v["value"] for k, v in switches.items()}, "profile": profile, "startup": startup,
            "peak_mem_mib": peak_mem_mib, "flops_per_token": flops_per_token, "final_eval_loss": final_eval_loss,
            "eval": evals, "target": target, "exit_code": 0}


def write_summary(path: str, summary: dict, warn: Callable[[str], None]) -> None:
    """summary.json, atomically; one that cannot be written is said and sets the exit code to 1 (the training is
    saved in the final checkpoint all the same)."""
    try:
        atomic_write_json(path, summary)
    except WriteError as e:
        warn(f"fastcram: {e}; the final checkpoint {summary['final_checkpoint']} is complete")
        summary["exit_code"] = 1


def done_line(steps: int, tokens: int, first_loss, final_loss, eval_loss: float | None, checkpoint: str) -> str:
    held = "" if eval_loss is None else f", held-out loss {eval_loss:.4f}"
    return (f"\ndone: {steps} steps, {tokens / 1e6:.1f}M tokens, loss {first_loss} -> {final_loss}{held}; "
            f"checkpoint {checkpoint}")
