"""The model on its ops bundle, the optimizer and the compiled training step (with its step-level switches:
compile mode, attention backend, autocast, residual dtype), and the guard that skips a step whose loss or
gradients are not finite."""
from __future__ import annotations

import contextlib
import gc
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import DataConfig, ModelConfig, TrainConfig
from ..errors import UserError
from ..model import CrammedBert
from ..ops import OP_MODULES, Ops, OpsError, get_ops, triton_unavailable_reason
from .switches import COMPILE_MODES

RESIDUAL_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: the stream keeps the norm's fp32


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return name


def autocast_dtype(tcfg: TrainConfig, device: str) -> torch.dtype | None:
    """bf16 under --autocast auto on a GPU or --autocast bf16 anywhere; None: fp32 throughout."""
    if tcfg.autocast == "bf16" or (tcfg.autocast == "auto" and device.startswith("cuda")):
        return torch.bfloat16
    return None


def build_model(model_cfg: ModelConfig, tcfg: TrainConfig, device: str, per_op: dict | None = None,
                ops: Ops | None = None) -> CrammedBert:
    """The model on its ops bundle: tcfg.kernels for every op, then tcfg.per_op (or the per_op argument)
    op by op, then the norm-ops override (--norm-kernels); or `ops`, a ready bundle (the step benchmark's peer
    kernels), in place of all that. The residual stream in tcfg.residual_dtype."""
    if ops is not None:
        return CrammedBert(model_cfg, ops, residual_dtype=_residual_dtype(tcfg, device)).to(device)
    per_op = per_op if per_op is not None else tcfg.per_op
    if tcfg.norm_kernels or per_op:
        base = {op: ("torch" if tcfg.kernels == "auto" else tcfg.kernels) for op in OP_MODULES}
        per_op = {**base, **(per_op or {})}
        if tcfg.norm_kernels:
            per_op.update(layer_norm=tcfg.norm_kernels, add_layer_norm=tcfg.norm_kernels)
    if tcfg.kernels == "triton" or "triton" in (per_op or {}).values():
        why = triton_unavailable_reason(device)
        if why:
            raise UserError(f"--kernels triton: {why}; use --kernels torch")
    try:
        ops = get_ops("torch", per_op=per_op) if per_op else get_ops(tcfg.kernels)
    except OpsError as e:
        flag = f"--norm-kernels {tcfg.norm_kernels}" if tcfg.norm_kernels else f"--kernels {tcfg.kernels}"
        raise UserError(f"{flag}: {e}") from None
    return CrammedBert(model_cfg, ops, residual_dtype=_residual_dtype(tcfg, device)).to(device)


def _residual_dtype(tcfg: TrainConfig, device: str) -> torch.dtype | None:
    if tcfg.residual_dtype not in RESIDUAL_DTYPES:
        raise UserError(f"--residual-dtype {tcfg.residual_dtype}: choose one of {', '.join(RESIDUAL_DTYPES)}")
    residual = RESIDUAL_DTYPES[tcfg.residual_dtype]
    if residual is not None and autocast_dtype(tcfg, device) != residual:
        raise UserError(f"--residual-dtype {tcfg.residual_dtype} needs bf16 autocast (the default on a GPU; "
                        f"pass --autocast bf16 on a CPU), else an fp32 branch output promotes the sum back to fp32")
    return residual


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW as the recipe: no weight decay on biases, norms and the position scale."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters, and it honours `found_inf` (NonFiniteGuard) without a host sync
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=tcfg.eps, fused=True)


def sdpa_backends(name: str) -> list | None:
    """The torch.nn.attention backends of --attention NAME; None: PyTorch's own dispatch."""
    from torch.nn.attention import SDPBackend

    table = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name == "default":
        return None
    if name not in table:
        raise UserError(f"--attention {name}: choose one of default, {', '.join(table)} (or auto)")
    return [table[name]]


def check_attention(name: str, model_cfg: ModelConfig, device: str, dtype: torch.dtype | None,
                    masked_per_seq: int | None = None) -> None:
    """A UserError unless the chosen SDPA backend runs this model's attention shapes (forward and backward)
    on this device: found at start-up, not as a failure inside the compiled step."""
    backends = sdpa_backends(name)
    if backends is None:
        return
    from torch.nn.attention import sdpa_kernel

    H, L = model_cfg.heads, model_cfg.seq_len
    hd = model_cfg.hidden // H
    dt = dtype or torch.float32
    queries = {L} | ({masked_per_seq} if masked_per_seq and model_cfg.sparse_last_layer else set())
    for lq in sorted(queries):  # full layers ask L queries; the sparse last layer m of them
        q = torch.randn(2, H, lq, hd, device=device, dtype=dt, requires_grad=True)
        k, v = (torch.randn(2, H, L, hd, device=device, dtype=dt, requires_grad=True) for _ in range(2))
        try:
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, k, v).float().sum().backward()
        except RuntimeError as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--attention {name}: not available for {lq}x{L} attention, head dim {hd}, {dt} on "
                            f"{device} ({why}); use --attention default or auto") from None


class TrainStep:
    """forward + backward of one micro-batch, scaled by 1/accum; returns the (unscaled) loss on device.

    `model` may be DDP-wrapped: gradients are then all-reduced only when `sync` is true (the last micro-step
    of an accumulation). Under DDP the graph is compiled without fullgraph: DDP's optimizer splits it at
    gradient-bucket boundaries so communication overlaps the backward. `settings` records what the step was
    built with (the run log header writes it): compile mode, attention backends, autocast and residual dtype,
    the ops backend of each op.
    """

    def __init__(self, model: torch.nn.Module, tcfg: TrainConfig, device: str):
        self.model = model
        self.ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        inner = model.module if self.ddp else model
        if tcfg.compile_mode not in COMPILE_MODES:
            raise UserError(f"--compile-mode {tcfg.compile_mode}: choose one of {', '.join(COMPILE_MODES)} (or auto)")
        mode = None if tcfg.compile_mode == "default" else tcfg.compile_mode
        self.forward = (torch.compile(model, fullgraph=not self.ddp, dynamic=False, mode=mode) if tcfg.compile
                        else model)
        self.cuda_graphs = tcfg.compile and tcfg.compile_mode == "reduce-overhead"
        self.params = [p for p in inner.parameters() if p.requires_grad]
        self.amp = autocast_dtype(tcfg, device)
        self.backends = sdpa_backends(tcfg.attention)
        self.settings = {
            "compile": tcfg.compile, "compile_mode": tcfg.compile_mode if tcfg.compile else None,
            "attention": tcfg.attention, "sdpa_backends": None if self.backends is None else
            [b.name for b in self.backends], "autocast": None if self.amp is None else str(self.amp),
            "residual_dtype": str(inner.residual_dtype or torch.float32),
            "sparse_last_layer": inner.cfg.sparse_last_layer, "ops": dict(inner.ops.choice)}
        self._device_type = "cuda" if device.startswith("cuda") else "cpu"

    def _attention(self):
        if self.backends is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self.backends)  # read when the graph is traced, so it reaches the compiled step

    @contextlib.contextmanager
    def context(self):
        """The autocast and attention settings the step runs under, for a forward outside it (evaluation)."""
        amp = torch.autocast(self._device_type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None)
        with amp, self._attention():
            yield

    def __call__(self, input_ids, positions, labels, accum: int, sync: bool = True) -> torch.Tensor:
        fresh = []
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # each micro-step replays the captured graphs anew
            fresh = [p for p in self.params if p.grad is None]
        no_sync = self.model.no_sync() if self.ddp and not sync else contextlib.nullcontext()
        amp = torch.autocast(self._device_type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None)
        with no_sync, amp, self._attention():
            loss = self.forward(input_ids, positions, labels)
            (loss / accum).backward()
        if not self.cuda_graphs:
            return loss.detach()
        # A CUDA-graph output lives in the graphs' memory pool and is overwritten by the next replay. A new
        # .grad is such an output (autograd keeps it rather than copying): accumulating the next micro-step
        # into it would read overwritten memory, so it becomes a tensor of its own (once per optimizer step).
        for p in fresh:
            if p.grad is not None:
                p.grad = p.grad.clone()
        return loss.detach().clone()


def make_step(model: torch.nn.Module, tcfg: TrainConfig, device: str) -> TrainStep:
    return TrainStep(model, tcfg, device)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: TrainStep,
                   tcfg: TrainConfig) -> Callable:
    """One whole training step of one micro-batch, as the tuner and the step benchmark time it: forward,
    backward, gradient clipping, AdamW step, zeroing the gradients. Returns the loss on the device."""
    def one(batch) -> torch.Tensor:
        loss = step(batch.input_ids, batch.positions, batch.labels, 1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return one


def synthetic_batches(model_cfg: ModelConfig, micro_batch: int, device: str, special, mask_prob: float = 0.25,
                      n_blocks: int = 4, seed: int = 0) -> Callable:
    """A function returning the next masked batch of uniform random tokens (throughput does not depend on
    which tokens they are); blocks rotate, masks are drawn fresh each time, on the device."""
    from ..data.loader import mask_batch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    lo = max(special.all) + 1
    blocks = [torch.randint(lo, model_cfg.vocab_size, (micro_batch, model_cfg.seq_len), generator=gen,
                            device=device) for _ in range(n_blocks)]  # each [B, L]
    dcfg = DataConfig(seq_len=model_cfg.seq_len, mask_prob=mask_prob)
    state = {"i": 0}

    def next_batch():
        ids = blocks[state["i"] % n_blocks]
        state["i"] += 1
        return mask_batch(ids, dcfg, special, model_cfg.vocab_size, gen)

    return next_batch


def release_compiled(device: str) -> None:
    """Forget compiled graphs and free cached memory: the next model compiles its own graph (within the
    recompile limits) and starts from a clean allocator."""
    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


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
