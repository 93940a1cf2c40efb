"""Microbenchmark cases for layer_norm and add_layer_norm: rows x 768, modes fwd / bwd / fwd+bwd.

Providers: "triton" (fastcram.ops.layer_norm), "torch" (the eager reference), "torch.compile" (the compiled
reference), "cuda" (the native kernels through fastcram.ops.native, called directly: no autograd), and the
peers: "apex" (apex's fused_layer_norm_affine), "liger" (Liger-Kernel's LayerNorm), "quack" (QuACK's
LayerNorm); for add_layer_norm each is an eager add followed by its LayerNorm (none of them fuses the
residual add). Every provider that counts as a peer (kernels.add_speedups: all but triton and cuda) is
checked against the reference on the case's inputs, outputs and gradients, before it is timed (peers.py):
the libraries and torch.compile (inductor writes its own kernels, so compiling the reference does not make
it the reference); one that disagrees is reported as such and never timed. "torch" is the reference itself
and is not checked (it would be compared with itself).
fwd is the training forward (inputs require grad, statistics saved); bwd times the backward alone on a
retained graph (for add_layer_norm with gradients arriving for both s and y, as in the model); fwd+bwd
does both. Activations, weight and bias all take the case dtype (apex wants them alike).
Bytes are the minimal traffic of the op (see the fastcram/ops/layer_norm.py docstring): activations plus
the [N] parameters and their gradients; the fp32 statistics (8 bytes a row) are left out.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

import torch

from . import peers
from .case import MODES, Case, Unavailable, rotating

HIDDEN = 768
ROWS = (16384, 65536, 131072, 262144)
ROWS_QUICK = (65536,)
EPS = 1e-12  # the recipe's
ROTATE_BYTES = 256 * 2**20  # input sets together exceed any L2 by this much
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
OPS = ("layer_norm", "add_layer_norm")


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for op in OPS:
        for rows in ROWS_QUICK if quick else ROWS:
            for mode in MODES:
                out.append(Case(op=op, mode=mode, shape=f"{rows}x{HIDDEN}", dtype=DTYPE_NAMES[dtype],
                                bound="memory", bytes=min_bytes(op, mode, rows, HIDDEN, dtype),
                                flops=useful_flops(op, mode, rows, HIDDEN),
                                providers=providers(op, mode, rows, HIDDEN, device, dtype)))
    return out


def min_bytes(op: str, mode: str, rows: int, n: int, dtype: torch.dtype) -> int:
    """Activation tensors touched once each, plus the parameters (read) and their gradients (written)."""
    e = torch.tensor([], dtype=dtype).element_size()
    acts = {("layer_norm", "fwd"): 2, ("layer_norm", "bwd"): 3,  # x, y | dy, x, dx
            ("add_layer_norm", "fwd"): 4, ("add_layer_norm", "bwd"): 4}  # x, r, s, y | dy, ds, s, dx
    params = {"fwd": 2, "bwd": 3}  # w, b | w, dw, db
    parts = ("fwd", "bwd") if mode == "fwd+bwd" else (mode,)
    return sum(acts[(op, p)] * rows * n * e + params[p] * n * e for p in parts)


def useful_flops(op: str, mode: str, rows: int, n: int) -> int:
    """About 8 per element forward, 12 backward, one more each for the residual add / incoming grad."""
    per = {"fwd": 8, "bwd": 12}
    extra = 1 if op == "add_layer_norm" else 0
    parts = ("fwd", "bwd") if mode == "fwd+bwd" else (mode,)
    return sum((per[p] + extra) * rows * n for p in parts)


def providers(op, mode, rows, n, device, dtype) -> dict[str, Callable[[], Callable[[], object]]]:
    shape = (op, mode, rows, n, device, dtype)
    return {
        "triton": lambda: autograd_bench(triton_fn(op, device), *shape),
        "torch": lambda: autograd_bench(ref_fn(op), *shape),
        "torch.compile": lambda: peer_bench("torch.compile", lambda: torch.compile(ref_fn(op), dynamic=False),
                                            *shape),
        "cuda": lambda: native_bench(*shape),
        "apex": lambda: peer_bench("apex", lambda: apex_fn(op, n, device), *shape),
        "liger": lambda: peer_bench("liger", lambda: peers.liger_layer_norm(op, device), *shape),
        "quack": lambda: peer_bench("quack", lambda: peers.quack_layer_norm(op, device), *shape),
    }


def peer_bench(name, make_fwd, op, mode, rows, n, device, dtype) -> Callable[[], object]:
    """A peer's autograd_bench, after its outputs and gradients matched the reference's on the same inputs."""
    fwd, verdict = peers.checked(name, (op, rows, n, str(dtype), device), make_fwd, ref_fn(op),
                                 lambda: make_inputs(op, rows, n, device, dtype, requires_grad=True), grad=True)
    return peers.with_check(autograd_bench(fwd, op, mode, rows, n, device, dtype), verdict)


def on_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"  # "cuda" or "cuda:N"


# ---- the forward function of each autograd provider: (x, [residual,] w, b) -> tuple of outputs ----

def ref_fn(op: str) -> Callable:
    from fastcram.ops.layer_norm import add_layer_norm_ref, layer_norm_ref

    if op == "layer_norm":
        return lambda x, w, b: (layer_norm_ref(x, w, b, EPS),)
    return lambda x, r, w, b: add_layer_norm_ref(x, r, w, b, EPS)


def triton_fn(op: str, device: str) -> Callable:
    from fastcram.ops import layer_norm as ln

    if not ln.HAVE_TRITON:
        raise Unavailable("triton is not installed")
    if not on_cuda(device):
        raise Unavailable("triton kernels are timed on a CUDA GPU only (the CPU interpreter is for tests)")
    if op == "layer_norm":
        return lambda x, w, b: (ln.layer_norm(x, w, b, EPS),)
    return lambda x, r, w, b: ln.add_layer_norm(x, r, w, b, EPS)


def apex_fn(op: str, n: int, device: str) -> Callable:
    if not on_cuda(device):
        raise Unavailable("apex runs on CUDA only")
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        importlib.import_module("fused_layer_norm_cuda")  # apex imports without its CUDA extension
    except Exception as err:  # ImportError, or a broken build raising anything
        raise Unavailable(f"apex fused LayerNorm not importable: {err}") from err
    if op == "layer_norm":
        return lambda x, w, b: (fused_layer_norm_affine(x, w, b, (n,), EPS),)

    def add_then_norm(x, r, w, b):
        s = x + r  # apex has no fused residual add
        return s, fused_layer_norm_affine(s, w, b, (n,), EPS)

    return add_then_norm


# ---- timing set-ups ----

def make_inputs(op, rows, n, device, dtype, requires_grad) -> list[torch.Tensor]:
    acts = [torch.randn(rows, n, device=device, dtype=dtype) for _ in range(2 if op == "add_layer_norm" else 1)]
    w = 1 + 0.1 * torch.randn(n, device=device, dtype=dtype)
    b = 0.1 * torch.randn(n, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (*acts, w, b)]


def n_sets(op, mode, rows, n, dtype) -> int:
    """Enough input sets that rotating through them keeps the op out of L2."""
    return max(1, min(8, math.ceil(ROTATE_BYTES / min_bytes(op, mode, rows, n, dtype))))


def autograd_bench(fwd, op, mode, rows, n, device, dtype) -> Callable[[], object]:
    sets = []
    for _ in range(n_sets(op, mode, rows, n, dtype)):
        ins = make_inputs(op, rows, n, device, dtype, requires_grad=True)
        outs = fwd(*ins)  # also warms up (compiles) every provider
        if mode == "fwd":
            sets.append((ins,))
            continue
        douts = [torch.randn_like(o) for o in outs]
        sets.append((outs, ins, douts) if mode == "bwd" else (ins, douts))
    if mode == "fwd":
        return rotating(lambda ins: fwd(*ins), sets)
    if mode == "bwd":
        return rotating(lambda outs, ins, douts: torch.autograd.grad(outs, ins, douts, retain_graph=True), sets)
    return rotating(lambda ins, douts: torch.autograd.grad(fwd(*ins), ins, douts), sets)


def native_module():
    """fastcram.ops.native, imported only when the provider is set up."""
    try:
        native = importlib.import_module("fastcram.ops.native")
        ok, why = native.available()
    except Exception as err:
        raise Unavailable(f"fastcram.native: {err}") from err
    if not ok:
        raise Unavailable(f"fastcram.native: {why}")
    for name in ("layer_norm_fwd", "add_layer_norm_fwd", "layer_norm_bwd"):
        if not hasattr(native, name):
            raise Unavailable(f"fastcram.native has no {name}()")
    return native


def native_bench(op, mode, rows, n, device, dtype) -> Callable[[], object]:
    """The native kernels called directly: fwd returns the statistics the bwd consumes, as in training."""
    if not on_cuda(device):
        raise Unavailable("the native kernels run on CUDA only")
    native = native_module()

    def forward(ins):
        """(the tensor the backward normalises: x, or s for add; mean; rstd)."""
        if op == "layer_norm":
            x, w, b = ins
            _, mean, rstd = native.layer_norm_fwd(x, w, b, EPS)
            return x, mean, rstd
        x, r, w, b = ins
        s, _, mean, rstd = native.add_layer_norm_fwd(x, r, w, b, EPS)
        return s, mean, rstd

    def backward(ins, saved, dy, ds):
        normed, mean, rstd = saved
        return native.layer_norm_bwd(dy, normed, ins[-2], mean, rstd, ds=ds)

    sets = []
    for _ in range(n_sets(op, mode, rows, n, dtype)):
        ins = make_inputs(op, rows, n, device, dtype, requires_grad=False)
        dy = torch.randn(rows, n, device=device, dtype=dtype)
        ds = torch.randn(rows, n, device=device, dtype=dtype) if op == "add_layer_norm" else None
        sets.append((ins, forward(ins) if mode == "bwd" else None, dy, ds))
    if mode == "fwd":
        return rotating(lambda ins, saved, dy, ds: forward(ins), sets)
    if mode == "bwd":
        return rotating(lambda ins, saved, dy, ds: backward(ins, saved, dy, ds), sets)
    return rotating(lambda ins, saved, dy, ds: backward(ins, forward(ins), dy, ds), sets)
