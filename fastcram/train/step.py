"""The model on its ops bundle, the optimizer and the compiled training step, and the guard that skips a step
whose loss or gradients are not finite."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..config import ModelConfig, TrainConfig
from ..errors import UserError
from ..model import CrammedBert
from ..ops import OP_MODULES, OpsError, get_ops, triton_unavailable_reason


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return name


def build_model(model_cfg: ModelConfig, tcfg: TrainConfig, device: str, per_op: dict | None = None) -> CrammedBert:
    """The model on its ops bundle: tcfg.kernels for every op, or an explicit per-op choice; then the
    norm-ops override (--norm-kernels)."""
    if tcfg.norm_kernels:
        base = per_op or {op: ("torch" if tcfg.kernels == "auto" else tcfg.kernels) for op in OP_MODULES}
        per_op = {**base, "layer_norm": tcfg.norm_kernels, "add_layer_norm": tcfg.norm_kernels}
    if tcfg.kernels == "triton" or "triton" in (per_op or {}).values():
        why = triton_unavailable_reason(device)
        if why:
            raise UserError(f"--kernels triton: {why}; use --kernels torch")
    try:
        ops = get_ops("torch", per_op=per_op) if per_op else get_ops(tcfg.kernels)
    except OpsError as e:
        flag = f"--norm-kernels {tcfg.norm_kernels}" if tcfg.norm_kernels else f"--kernels {tcfg.kernels}"
        raise UserError(f"{flag}: {e}") from None
    return CrammedBert(model_cfg, ops).to(device)


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW as the recipe: no weight decay on biases, norms and the position scale."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters, and it honours `found_inf` (NonFiniteGuard) without a host sync
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=tcfg.eps, fused=True)


def make_step(model: torch.nn.Module, tcfg: TrainConfig, device: str) -> Callable:
    """forward + backward of one micro-batch, scaled by 1/accum; returns the (unscaled) loss on device.

    `model` may be DDP-wrapped: gradients are then all-reduced only when `sync` is true (the last micro-step
    of an accumulation). Under DDP the graph is compiled without fullgraph: DDP's optimizer splits it at
    gradient-bucket boundaries so communication overlaps the backward.
    """
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    forward = torch.compile(model, fullgraph=not ddp, dynamic=False) if tcfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step(input_ids, positions, labels, accum: int, sync: bool = True) -> torch.Tensor:
        with (model.no_sync() if ddp and not sync else contextlib.nullcontext()), autocast:
            loss = forward(input_ids, positions, labels)
            (loss / accum).backward()
        return loss.detach()

    return step


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients are not finite, without a host sync.

    The fused AdamW kernels honour `optimizer.found_inf` (the mechanism AMP's grad scaler uses): a non-zero
    value leaves parameters, moments and the step count untouched. Counters stay on the device and are read
    at log intervals; `limit` consecutive skips stop the run there with a clear message.
    """

    def __init__(self, optimizer, device: str, limit: int, check_loss: bool = True):
        self.optimizer, self.limit, self.check_loss = optimizer, limit, check_loss
        self.skipped = torch.zeros((), device=device)  # in this log interval
        self.in_a_row = torch.zeros((), device=device)
        self.total = 0

    def before_step(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        # Under DDP only the (all-reduced, hence identical) gradient norm decides, so all ranks skip together.
        ok = torch.isfinite(grad_norm) & torch.isfinite(step_loss) if self.check_loss else torch.isfinite(grad_norm)
        bad = (~ok).float()  # 0-d, on device
        self.optimizer.found_inf = bad
        self.skipped += bad
        self.in_a_row = (self.in_a_row + bad) * bad  # reset to 0 by a good step

    def read(self) -> tuple[int, int]:
        """(skipped in this interval, consecutive now); a host sync, for log intervals only."""
        skipped, row = int(self.skipped.item()), int(self.in_a_row.item())
        self.total += skipped
        self.skipped.zero_()
        return skipped, row
