"""More than one process: torchrun + DistributedDataParallel with one budget clock.

Every rank masks the same global micro-batch (same generator, same order) and keeps its own rows, so the
ranks' data are disjoint and a world of N ranks computes exactly what one process would on the global
batch. Rank 0 owns the clock: once per optimizer step the ranks agree on progress and on stopping through
a small all-reduce of a host tensor (a gloo group), which never waits on the GPU's stream.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..data.loader import MLMBatch


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    control_group: object = None  # a gloo group for host-side agreement

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env(device_type: str) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistContext(rank, world, local, control)


def agree(ctx: DistContext, progress: float, flags: list[bool]) -> tuple[float, list[bool]]:
    """Rank 0's progress and flags; the last flag (a stop signal) is raised if any rank has it."""
    if not ctx.enabled:
        return progress, flags
    mine = [progress] + [float(f) for f in flags[:-1]] if ctx.is_main else [0.0] * len(flags)
    t = torch.tensor(mine + [float(flags[-1])], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return float(t[0]), [bool(v > 0) for v in t[1:].tolist()]


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's obj on every rank (a pickled broadcast over the host-side group); obj itself for one process."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=ctx.control_group)
    return box[0]


def mean_across(ctx: DistContext, value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for log records only: it synchronises)."""
    if not ctx.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world


def rank_slice(b: MLMBatch, ctx: DistContext, micro_batch: int, seq_len: int, per_seq: int) -> MLMBatch:
    """This rank's rows of a masked global batch [world * micro_batch, L]; positions re-based to them."""
    if not ctx.enabled:
        return b
    r = ctx.rank
    rows = slice(r * micro_batch, (r + 1) * micro_batch)
    flat = slice(r * micro_batch * per_seq, (r + 1) * micro_batch * per_seq)  # positions are row-major
    return MLMBatch(b.input_ids[rows], b.positions[flat] - r * micro_batch * seq_len, b.labels[flat])


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
