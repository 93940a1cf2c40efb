"""A run's checkpoint writes as the training loop sees them, and when failed writes stop the run.

Rank 0 submits each write to the background writer (checkpoint.AsyncCheckpointer); finished writes go to the
run log, and a failed one is named on stderr with its cause and the checkpoint a crash would fall back to. A
failed write stops the run when the weights are no longer finite, at once with --stop-on-checkpoint-error, and
otherwise only once no checkpoint has been written for `unsaved_limit` of the budget; a final checkpoint that
cannot be written ends the run with one line (exit 2).
"""
from __future__ import annotations

import math
from typing import Callable

from ..config import TrainConfig
from ..errors import UserError
from .checkpoint import AsyncCheckpointer
from .schedule import BudgetClock


def lower_lr(lr: float) -> float:
    """The learning rate a run stopped by non-finite values is told to resume with: half its own."""
    lr = lr / 2
    return lr if math.isfinite(lr) else 5e-4


class RunCheckpoints:
    """The checkpoints of one run: what is being written, what was, and the newest one on disk."""

    def __init__(self, run_dir: str, tcfg: TrainConfig, clock: BudgetClock, log, warn: Callable[[str], None],
                 main: bool, resumed: dict | None):
        self.run_dir, self.tcfg, self.clock, self.log, self.warn, self.main = run_dir, tcfg, clock, log, warn, main
        self.writer = AsyncCheckpointer(run_dir, tcfg.keep_checkpoints)
        self.last_saved = None if resumed is None else {  # the newest checkpoint on disk: what a crash falls back to
            "path": resumed["_path"], "step": resumed["step"], "budget_spent_s": resumed["elapsed_s"]}

    def save(self, path: str, payload: Callable[[], dict], step: int) -> None:
        """Start writing payload() on rank 0 (every rank holds the same weights)."""
        if self.main:
            self.writer.submit(path, payload(), step)

    def save_now(self, path: str, payload: Callable[[], dict], step: int) -> dict | None:
        """Write and wait for it: the failed write's record, or None when it was written."""
        self.save(path, payload, step)
        self.writer.wait()
        return self.report().get(path)

    def save_final(self, path: str, payload: Callable[[], dict], step: int) -> None:
        """Write the final checkpoint and wait for it; when it cannot be written the run log is closed with a
        "stopped" record and a UserError names what a crash would fall back to."""
        failed = self.save_now(path, payload, step)
        if failed:
            self.log.write({"event": "stopped", "reason": "final-checkpoint", "step": step})
            self.log.close()
            raise UserError(f"could not write the final checkpoint {path} ({failed['error']}); " +
                            (f"{self.fallback()}: free disk space and run fastcram train --resume {self.run_dir}"
                             if self.last_saved else "this run has no checkpoint: its training is lost; free disk "
                                                     "space and start it again"))

    def wait(self) -> None:
        self.writer.wait()

    def report(self) -> dict:
        """Log finished checkpoint writes; returns {path: record} of the failed ones, each named on stderr with
        its cause and the checkpoint a crash would fall back to."""
        failed = {}
        for rec in self.writer.results():
            self.log.write(rec)
            if "error" not in rec:
                self.last_saved = rec
                continue
            failed[rec["path"]] = rec
            self.warn(f"fastcram: checkpoint of step {rec['step']} not saved: {rec['error']}; {self.fallback()}")
        return failed

    def fallback(self) -> str:
        s = self.last_saved
        if s is None:
            return "this run has no checkpoint yet: a crash now would lose all of its training"
        return f"the newest checkpoint is {s['path']} (step {s['step']})"

    def stop_reason(self, failed: dict) -> str | None:
        """Whether failed writes stop the run: "non-finite" when the weights are no longer finite,
        "checkpoint-error" with --stop-on-checkpoint-error or past the unsaved limit, else None."""
        tcfg, rec = self.tcfg, list(failed.values())[-1]
        resume = f"fastcram train --resume {self.run_dir}"
        if rec.get("nonfinite"):
            self.warn(f"fastcram: stopping: the weights are no longer finite at step {rec['step']}; "
                      f"{self.fallback()}; resume with a lower learning rate, e.g. {resume} --lr {lower_lr(tcfg.lr):g}")
            return "non-finite"
        unsaved = self.clock.elapsed() - (self.last_saved["budget_spent_s"] if self.last_saved else 0.0)
        if tcfg.stop_on_checkpoint_error:
            why = "--stop-on-checkpoint-error"
        elif unsaved >= tcfg.unsaved_limit * tcfg.budget_s:
            why = (f"no checkpoint could be written for {unsaved:.0f} s, {100 * unsaved / tcfg.budget_s:.0f}% of the "
                   f"budget (the limit is {100 * tcfg.unsaved_limit:g}%)")
        else:
            return None
        self.warn(f"fastcram: stopping ({why}): {rec['error']}; {self.fallback()}; free disk space, then " +
                  (resume if self.last_saved else "start the run again"))
        return "checkpoint-error"
