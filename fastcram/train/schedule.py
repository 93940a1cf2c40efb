"""The budget clock and the recipe's schedules, all functions of progress p = elapsed / budget."""
from __future__ import annotations

import contextlib
import time
from typing import Callable


class Excluded:
    """What BudgetClock.excluded measured: the seconds kept off the budget."""
    seconds: float = 0.0


class BudgetClock:
    """Wall-clock budget that can resume with time already spent. `now` is injectable for tests. Time inside
    `excluded()` (held-out evaluation) is not budget time: the clock stands still there."""

    def __init__(self, budget_s: float, spent_s: float = 0.0, now: Callable[[], float] = time.monotonic):
        if not budget_s > 0:
            raise ValueError(f"budget must be positive, got {budget_s} s")
        self.budget_s, self._spent_before, self._now = float(budget_s), float(spent_s), now
        self._start = now()
        self.excluded_s = 0.0  # kept off the budget so far (this segment)
        self._paused_at: float | None = None

    def elapsed(self) -> float:
        """Budget seconds spent, this segment and all earlier ones."""
        now = self._now() if self._paused_at is None else self._paused_at
        return self._spent_before + (now - self._start) - self.excluded_s

    @contextlib.contextmanager
    def excluded(self):
        """The time spent inside this block is kept off the budget; yields an Excluded that holds it after."""
        if self._paused_at is not None:
            raise RuntimeError("BudgetClock.excluded does not nest")
        out = Excluded()
        self._paused_at = self._now()
        try:
            yield out
        finally:
            out.seconds = self._now() - self._paused_at
            self.excluded_s += out.seconds
            self._paused_at = None

    def progress(self) -> float:
        return min(self.elapsed() / self.budget_s, 1.0)

    def done(self) -> bool:
        return self.elapsed() >= self.budget_s

    def remaining(self) -> float:
        return max(self.budget_s - self.elapsed(), 0.0)


def lr_multiplier(p: float) -> float:
    """Rises from 0.25x to 1x at 75% of the budget, then falls linearly to 0 at 100%."""
    return max(0.0, min(0.25 + p, 4.0 * (1.0 - p)))


def accumulation_steps(p: float, micro_batch: int, final_batch: int, ramp_until: float = 0.6) -> int:
    """Micro-batches per optimizer step: from 1 micro-batch at p=0 linearly to final_batch sequences at
    p=ramp_until, in whole multiples of the micro-batch. The micro-batch shape never changes."""
    final_steps = max(1, round(final_batch / micro_batch))
    frac = min(max(p, 0.0) / ramp_until, 1.0) if ramp_until > 0 else 1.0
    return max(1, min(final_steps, 1 + int(frac * (final_steps - 1) + 1e-9)))
