"""Held-out MLM loss during training: the data's held-out split, masked once with a fixed seed, evaluated
with the model in eval mode and no grad, off the budget clock; and when evaluations are due.

The masks are drawn once, on the CPU (so every device and every run gets the same positions and
replacements), with the training mask's rule (round(p * L) positions a sequence, 80/10/10), so held-out and
training losses compare. Two evaluations of one model give the same bits: the same batches in the same order,
each batch's mean loss weighted by its rows and summed in fp64. The forward runs eagerly on the model's own
module (never through the compiled training step or DDP): no grad, so the mlm_loss op does only the
forward's work, and the compiled step's graph and CUDA graphs are not touched. `Evaluations` keeps a run's
account of them: when the next is due, the last loss, their count and time, and the first to reach --target-loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import DataConfig, TrainConfig
from ..data.loader import HeldOutBlocks, MLMBatch, mask_batch
from ..data.tokenizer import SpecialIds
from .schedule import BudgetClock

DEFAULT_SHARE = 0.02  # default cadence: every 2% of the budget ...
DEFAULT_MIN_S = 10.0  # ... but at least this far apart
GROWTH_MIN_GAP_SHARE = 1 / 200  # a growth cadence starts at (and keeps at least) this share of the budget apart


class HeldOutEval:
    """The held-out blocks as fixed masked batches on the device; calling it gives the mean MLM loss."""

    def __init__(self, holdout: HeldOutBlocks, dcfg: DataConfig, special: SpecialIds, vocab_size: int,
                 micro_batch: int, device: str, max_blocks: int, seed: int):
        blocks = holdout.read(max_blocks)  # [n, L] uint16
        ids = torch.from_numpy(blocks.astype(np.int64))  # [n, L]
        gen = torch.Generator().manual_seed(seed)
        self.batches: list[MLMBatch] = []
        for lo in range(0, len(ids), micro_batch):
            b = mask_batch(ids[lo:lo + micro_batch], dcfg, special, vocab_size, gen)
            self.batches.append(MLMBatch(b.input_ids.to(device), b.positions.to(device), b.labels.to(device)))
        self.blocks = len(ids)
        self.predictions = sum(b.labels.numel() for b in self.batches)
        self.device = device

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, context) -> float:
        """Mean held-out MLM loss of `model` (the plain module) under `context` (the step's autocast and
        attention settings); one host sync at the end."""
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            with context():
                for b in self.batches:
                    loss = model(b.input_ids, b.positions, b.labels)  # 0-d: mean over this batch's rows
                    total += loss.double() * b.labels.numel()
        finally:
            model.train(was_training)
        return (total / self.predictions).item()

    def describe(self) -> dict:
        return {"blocks": self.blocks, "predicted_tokens": self.predictions, "batches": len(self.batches)}


@dataclass
class EvalSchedule:
    """When held-out evaluations are due, in budget seconds: every `every_s`, or (growth) each time the
    budget spent has grown by that fraction but at least `min_gap_s` after the last (so a time read off the
    evaluations, like a time to a target loss, is known to within that fraction once past min_gap_s / growth)."""
    every_s: float | None = None
    growth: float | None = None
    min_gap_s: float = 0.0

    def after(self, t: float) -> float:
        """The first due time after budget time t."""
        if self.growth is not None:
            return max(t * (1 + self.growth), t + self.min_gap_s)
        return (math.floor(t / self.every_s + 1e-9) + 1) * self.every_s


def eval_schedule(tcfg: TrainConfig) -> EvalSchedule | None:
    """The run's cadence from its settings; None when evaluation is off (--eval-every 0)."""
    if tcfg.eval_growth is not None:
        return EvalSchedule(growth=tcfg.eval_growth, min_gap_s=tcfg.budget_s * GROWTH_MIN_GAP_SHARE)
    every = tcfg.eval_every_s
    if every is None:
        every = min(max(tcfg.budget_s * DEFAULT_SHARE, DEFAULT_MIN_S), tcfg.budget_s)
    return EvalSchedule(every_s=every) if every > 0 else None


class Evaluations:
    """One run's held-out evaluations: rank 0 runs them, each off the budget clock (reading the split too).
    `pending` holds the last result until the next log record takes it; `target_hit` the first evaluation at or
    below --target-loss."""

    def __init__(self, tcfg: TrainConfig, dcfg: DataConfig, data, device: str, clock: BudgetClock, log,
                 say: Callable[[str], None], main: bool):
        self.tcfg, self.data, self.clock = tcfg, data, clock
        self.evaluator, self.schedule = None, eval_schedule(tcfg)
        self.count, self.seconds, self.last, self.step = 0, 0.0, None, -1  # self.step: of the last evaluation
        self.target_hit = self.pending = None
        if self.schedule is None or not main:
            return
        if data.holdout is None:
            say(f"fastcram: {data.no_holdout_reason}; training without a held-out loss")
            log.write({"event": "no_holdout", "reason": data.no_holdout_reason})
            return
        with clock.excluded() as ex:
            self.evaluator = HeldOutEval(data.holdout, dcfg, data.special, data.vocab_size, tcfg.micro_batch, device,
                                         tcfg.eval_blocks, tcfg.eval_seed)
        self.seconds += ex.seconds
        self.next_at = self.schedule.after(clock.elapsed())
        log.write({"event": "eval_setup", **self.evaluator.describe(), "seed": tcfg.eval_seed,
                   "every_s": self.schedule.every_s, "growth": self.schedule.growth,
                   "target_loss": tcfg.target_loss, "setup_s": round(ex.seconds, 3)})

    def due(self, step: int, budget_done: bool) -> bool:
        return not (self.evaluator is None or self.target_hit is not None or step in (0, self.step)
                    or not (budget_done or self.clock.elapsed() >= self.next_at))

    def run(self, model: torch.nn.Module, context, step: int, sequences: int) -> float:
        """One evaluation at optimizer step `step`, off the budget clock; returns the seconds it took."""
        at = self.clock.elapsed()
        with self.clock.excluded() as ex:
            loss = self.evaluator(model, context)
        self.next_at = self.schedule.after(at)
        self.count, self.seconds, self.last, self.step = self.count + 1, self.seconds + ex.seconds, loss, step
        self.pending = {"eval_loss": loss, "eval_s": round(ex.seconds, 4), "eval_at_s": round(at, 3)}
        target = self.tcfg.target_loss
        if target is not None and loss <= target:
            self.target_hit = {"target_loss": target, "eval_loss": loss, "budget_s": at, "step": step,
                               "sequences": sequences, "tokens": sequences * self.data.seq_len}
        return ex.seconds

    def summary(self) -> dict:
        return {"evaluations": self.count, "eval_s": round(self.seconds, 3),
                "excluded_from_budget_s": round(self.clock.excluded_s, 3),
                **(self.evaluator.describe() if self.evaluator else
                   {"none": self.data.no_holdout_reason if self.data.holdout is None else "off"})}
