"""The peers' kernels as benchmark providers: what fastcram's users would pick instead of its kernels.

Each maker below returns the function a case times, with the same signature as the reference it is checked
against, or raises Unavailable with the reason (library missing, no GPU, a case it does not cover). The
libraries are optional and imported only here, only when a provider is set up.

  liger   Liger-Kernel (tested with 0.8.5, its py3-none-any wheel; tools/fetch_wheels.sh fetches it):
          layer_norm      its LayerNorm (LigerLayerNormFunction)
          add_layer_norm  a torch add, then its LayerNorm (it has no fused residual add)
          ffn (geglu)     cuBLAS GEMMs for the a and gate halves, its GEGLU kernel, cuBLAS down projection.
                          Its GEGLU computes GELU's tanh approximation, so the provider is named
                          "liger(gelu=tanh)" and checked against the tanh reference, not fastcram's exact erf
          mlm_loss        its fused linear cross-entropy, eager (its forward calls .item(), which breaks a
                          fullgraph compile), with an fp32 weight-gradient accumulator (accum_dtype) as
                          fastcram's op has
          Its LayerNorm and GEGLU kernels do not run in the Triton CPU interpreter; its cross-entropy does.
  quack   QuACK (quack-kernels; CUTLASS DSL, CUDA only, measured only where it is already installed: its
          DSL wheel is too large for the GPU check's wheel folder):
          layer_norm      its LayerNorm kernels (quack.rmsnorm.layernorm_fwd / layernorm_bwd, fp32 weight and
                          bias as it requires)
          add_layer_norm  a torch add, then that LayerNorm
          mlm_loss        its chunked linear cross-entropy (quack.linear_cross_entropy)
  apex    NVIDIA apex (no wheel; only where built): the fused dense + GELU + dense of apex.fused_dense for
          the classic FFN, with zero biases (it has no bias-free variant); cuBLASLt's GELU epilogue is the
          tanh approximation, so it is "apex(gelu=tanh)", checked against the tanh reference. apex's
          LayerNorm stays in cases_layer_norm.py.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch
import torch.nn.functional as F

from .case import Unavailable
from . import peer_check

LIGER_TESTED = "0.8.5"
# the step benchmark's `liger` variant: op -> whose kernel (liger_ops.py); the FFN stays fastcram's, since
# Liger's GEGLU is GELU's tanh approximation and would change the model being timed
LIGER_STEP_OPS = {"layer_norm": "liger", "add_layer_norm": "liger", "ffn": "triton", "mlm_loss": "liger"}
TANH = "gelu=tanh"  # provider suffix of the FFN peers that compute GELU's tanh approximation


def _on_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import(module: str, what: str, how: str):
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken install raising anything at import
        raise Unavailable(f"{what} is not importable here ({type(err).__name__}: {str(err)[:120]}); {how}") from err


# ---------------------------------------------------------------------------------------------- Liger

LIGER_HOW = "bash tools/fetch_wheels.sh (the GPU check installs it), or pip install liger-kernel"


def liger_functional():
    return _import("liger_kernel.transformers.functional", "Liger-Kernel", LIGER_HOW)


def _liger_gpu_only(device: str, kernel: str) -> None:
    liger_functional()  # a missing library is the first reason to give
    if not _on_cuda(device):
        raise Unavailable(f"Liger-Kernel's {kernel} kernel needs a CUDA GPU (it does not run in the Triton CPU "
                          f"interpreter); it is checked and timed on a GPU")


def liger_layer_norm(op: str, device: str) -> Callable:
    """(x, w, b) -> (y,) for layer_norm; (x, r, w, b) -> (s, y) for add_layer_norm (torch add first)."""
    _liger_gpu_only(device, "LayerNorm")
    ln = liger_functional().liger_layer_norm
    from fastcram.benchmarks.cases_layer_norm import EPS

    if op == "layer_norm":
        return lambda x, w, b: (ln(x, w, b, EPS),)

    def add_then_norm(x, r, w, b):
        s = x + r  # Liger has no fused residual add
        return s, ln(s, w, b, EPS)

    return add_then_norm


def ffn_tanh_ref(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, kind: str) -> torch.Tensor:
    """fastcram's FFN with GELU's tanh approximation: the reference the tanh peers are checked against."""
    h = F.linear(x, w_in)  # [M, N]
    if kind == "geglu":
        a, gate = h.chunk(2, dim=-1)  # [M, F] each
        y = F.gelu(gate, approximate="tanh") * a
    else:
        y = F.gelu(h, approximate="tanh")  # [M, F]
    return F.linear(y, w_out)  # [M, D]


def liger_ffn(kind: str, device: str) -> Callable:
    """(x, w_in, w_out) -> out: cuBLAS for the a and gate halves, Liger's GEGLU (tanh), cuBLAS down."""
    if kind != "geglu":
        raise Unavailable("Liger-Kernel has no kernel for the classic GELU FFN (only gated ones: GEGLU, SwiGLU)")
    _liger_gpu_only(device, "GEGLU")
    geglu = liger_functional().liger_geglu

    def run(x, w_in, w_out):
        f = w_in.shape[0] // 2
        a = F.linear(x, w_in[:f])  # [M, F]: separate GEMMs give contiguous halves, as LigerGEGLUMLP does
        gate = F.linear(x, w_in[f:])  # [M, F]
        return F.linear(geglu(gate, a), w_out)  # gelu_tanh(gate) * a, then [M, D]

    return run


def liger_mlm_loss(device: str) -> Callable:
    """(rows [K, D], labels [K], weight [V, D]) -> loss: Liger's fused linear cross-entropy, eager."""
    liger_functional()
    if not _on_cuda(device) and not _interpreting():
        raise Unavailable("Liger-Kernel's cross-entropy needs a CUDA GPU, or the Triton CPU interpreter "
                          "(TRITON_INTERPRET=1) for the output check")
    flce = liger_functional().liger_fused_linear_cross_entropy

    def run(rows, labels, weight):
        return flce(rows, weight, labels, accum_dtype=torch.float32)

    return run


# ---------------------------------------------------------------------------------------------- QuACK

QUACK_HOW = ("QuACK needs the CUTLASS DSL (a wheel far over the GPU check's 60 MiB folder), so it is measured "
             "only where pip install quack-kernels was done beforehand")


def _quack(device: str, module: str):
    mod = _import(module, "QuACK", QUACK_HOW)
    if not _on_cuda(device):
        raise Unavailable("QuACK's kernels (CUTLASS DSL) run on CUDA GPUs only")
    return mod


class _QuackLayerNorm(torch.autograd.Function):
    """QuACK's LayerNorm forward and backward kernels behind autograd (it wants fp32 weight and bias)."""

    @staticmethod
    def forward(ctx, x, w, b, eps, fwd, bwd):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [M, N]
        y, rstd, mean = fwd(x2, w.float(), b.float(), eps, return_rstd=True, return_mean=True)
        ctx.save_for_backward(x2, w, rstd, mean)
        ctx.bwd, ctx.shape, ctx.b_dtype = bwd, shape, b.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd, mean = ctx.saved_tensors
        dx, dw, db = ctx.bwd(x2, w.float(), dy.reshape(x2.shape).contiguous(), rstd, mean, has_bias=True)
        return dx.view(ctx.shape), dw.to(w.dtype), db.to(ctx.b_dtype), None, None, None


def quack_layer_norm(op: str, device: str) -> Callable:
    mod = _quack(device, "quack.rmsnorm")
    fwd, bwd = getattr(mod, "layernorm_fwd", None), getattr(mod, "layernorm_bwd", None)
    if fwd is None or bwd is None:
        raise Unavailable(f"this QuACK ({getattr(_import('quack', 'QuACK', QUACK_HOW), '__version__', '?')}) "
                          f"has no layernorm_fwd / layernorm_bwd")
    from fastcram.benchmarks.cases_layer_norm import EPS

    def ln(x, w, b):
        return _QuackLayerNorm.apply(x, w, b, EPS, fwd, bwd)

    if op == "layer_norm":
        return lambda x, w, b: (ln(x, w, b),)
    return lambda x, r, w, b: (lambda s: (s, ln(s, w, b)))(x + r)  # a torch add: no fused residual here


def quack_mlm_loss(device: str) -> Callable:
    fn = getattr(_quack(device, "quack.linear_cross_entropy"), "chunked_linear_cross_entropy", None)
    if fn is None:
        raise Unavailable("this QuACK has no chunked_linear_cross_entropy")
    return lambda rows, labels, weight: fn(rows, weight, labels, reduction="mean")


# ---------------------------------------------------------------------------------------------- apex

def apex_ffn(kind: str, device: str) -> Callable:
    """(x, w_in, w_out) -> out through apex's fused dense + GELU + dense, biases zero (classic FFN only)."""
    if kind != "gelu":
        raise Unavailable("apex has no fused GEGLU (its fused dense + GELU + dense is the classic FFN)")
    mod = _import("apex.fused_dense", "apex fused_dense", "apex ships no wheel: build it from source with its "
                                                          "CUDA extensions (--fused_dense)")
    if not _on_cuda(device):
        raise Unavailable("apex's fused dense runs on CUDA only")
    fn = getattr(mod, "FusedDenseGeluDenseFunc", None)
    if fn is None:
        raise Unavailable("this apex has no FusedDenseGeluDenseFunc")

    def run(x, w_in, w_out):
        b1 = torch.zeros(w_in.shape[0], device=x.device, dtype=x.dtype)  # [N]: apex needs biases
        b2 = torch.zeros(w_out.shape[0], device=x.device, dtype=x.dtype)  # [D]
        return fn.apply(x, w_in, b1, w_out, b2)

    return run


# ---------------------------------------------------------------------------------------------- checked

def checked(name: str, key: tuple, make_peer: Callable[[], Callable], reference: Callable,
            make_inputs: Callable[[], list], grad: bool) -> tuple[Callable, str]:
    """The peer's function and the verdict of its output check (raises Unavailable or Disagrees).

    A peer that fails while being checked (a kernel that does not build or launch here) is unavailable
    with the reason, not an error of the benchmark."""
    peer = make_peer()
    try:
        verdict = peer_check.check((name, *key), peer, reference, make_inputs, grad)
    except (Unavailable, peer_check.Disagrees):
        raise
    except Exception as err:  # noqa: BLE001 - the peer's own failure is its row's reason
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise Unavailable(f"{name} failed on this case: {type(err).__name__}: {msg}") from err
    return peer, verdict


def with_check(fn: Callable[[], object], verdict: str) -> Callable[[], object]:
    """The timed zero-argument function, carrying its output check's verdict for the row."""
    fn.check = verdict
    return fn
