"""Microbenchmark cases for linear_gelu and linear_geglu (fastcram/ops/linear_gelu.py).

Shapes: M = 16k and 64k tokens (quick: 64k only), D = 768; linear_geglu W [2F, D] = [3072, 768],
linear_gelu W [F, D] = [3072, 768]; so the GEMM is M x 768 x 3072 in both (shape "MxDxN").

Modes: "fwd" is the training forward (inputs require grad, so every provider keeps what its backward
needs: the Triton op writes the pre-activation h, cuBLAS writes it as its output); "bwd" times
torch.autograd.grad of a retained graph; "fwd+bwd" both. FLOPs: 2*M*D*N (fwd), x2 (bwd), x3 (fwd+bwd).

Providers:
  triton                    the fused op (backward GEMMs on cuBLAS, the op's default); CUDA only
  triton(bwd_gemm=triton)   the fused op with its Triton backward GEMMs (bwd, fwd+bwd): decides the default
  torch, cublas+eager       the reference, F.linear then the eager activation (the same callable twice:
                            "torch" is every op's eager column, "cublas+eager" is the issue's name)
  cublas+compiled-epilogue  F.linear, then a torch.compile'd activation / GLU epilogue (the GLU goal's baseline)
  torch.compile             torch.compile of the reference
  torch.compile-max-autotune  torch.compile(mode="max-autotune") of the reference
  torch._addmm_activation   gelu only, fwd only (no autograd formula): cuBLASLt's GELU epilogue, which needs
                            a bias (a zero bias here) and is the tanh approximation, not exact erf GELU
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import linear_gelu as lg
from .case import MODES, Case, Unavailable, rotating

D_MODEL = 768
GEMM_N = 3072  # GEMM output columns: 2F for the GLU, F for plain GELU
TOKENS = (16384, 65536)
INPUT_SETS = 2  # rotated so one call's inputs are not in L2 for the next (x alone is 100 MB at 64k)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _glu_epilogue(h: torch.Tensor) -> torch.Tensor:
    a, gate = h.chunk(2, dim=-1)  # [M, F] each
    return F.gelu(gate) * a


def _gelu_epilogue(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)


def _compiled(fn, **kw):
    return torch.compile(fn, dynamic=False, **kw)


def _provider_fns(op: str, mode: str) -> dict:
    """Provider name -> maker of fn(x, w); a maker raises Unavailable when the provider cannot run."""
    glu = op == "linear_geglu"
    ref = lg.linear_geglu_ref if glu else lg.linear_gelu_ref
    fused = lg.linear_geglu if glu else lg.linear_gelu
    epilogue = _glu_epilogue if glu else _gelu_epilogue

    def cublas_compiled_epilogue():
        epi = _compiled(epilogue)
        return lambda x, w: epi(F.linear(x, w))

    makers = {
        "triton": lambda: fused,
        "torch": lambda: ref,
        "cublas+eager": lambda: ref,
        "cublas+compiled-epilogue": cublas_compiled_epilogue,
        "torch.compile": lambda: _compiled(ref),
        "torch.compile-max-autotune": lambda: _compiled(ref, mode="max-autotune"),
    }
    if mode != "fwd":
        makers["triton(bwd_gemm=triton)"] = lambda: (lambda x, w: fused(x, w, bwd_gemm="triton"))
    if not glu:
        makers["torch._addmm_activation"] = lambda: _addmm_activation(mode)
    return makers


def _addmm_activation(mode: str):
    if mode != "fwd":
        raise Unavailable("torch._addmm_activation has no autograd formula")

    def fn(x, w):
        bias = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)  # the epilogue needs a bias
        return torch._addmm_activation(bias, x, w.t(), use_gelu=True)

    return fn


def _inputs(m: int, d: int, n: int, glu: bool, device: str, dtype: torch.dtype):
    x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)  # [M, D]
    w = (torch.randn(n, d, device=device, dtype=dtype) * d ** -0.5).requires_grad_()  # [N, D]
    dy = torch.randn(m, n // 2 if glu else n, device=device, dtype=dtype)  # [M, F]
    return x, w, dy


def _timed_call(fn, mode: str, input_sets: list):
    """The zero-argument callable for `mode`, after one warm-up call per input set (compile, autotune)."""
    if mode == "fwd":
        call = rotating(fn, [(x, w) for x, w, _ in input_sets])
    elif mode == "bwd":
        graphs = [(fn(x, w), x, w, dy) for x, w, dy in input_sets]  # retained forward graphs
        call = rotating(lambda y, x, w, dy: torch.autograd.grad(y, (x, w), dy, retain_graph=True), graphs)
    else:
        call = rotating(lambda x, w, dy: torch.autograd.grad(fn(x, w), (x, w), dy), input_sets)
    for _ in input_sets:
        call()
    return call


def _setup(name: str, maker, op: str, mode: str, shape: tuple, device: str, dtype: torch.dtype):
    def setup():
        if name.startswith("triton"):
            if not lg.HAVE_TRITON:
                raise Unavailable("triton is not installed")
            if torch.device(device).type != "cuda":
                raise Unavailable("triton kernels are timed on a CUDA GPU only (the CPU interpreter is for tests)")
        fn = maker()
        m, d, n = shape
        input_sets = [_inputs(m, d, n, op == "linear_geglu", device, dtype) for _ in range(INPUT_SETS)]
        if "compile" not in name:
            return _timed_call(fn, mode, input_sets)
        try:  # the warm-up compiles; a compiler failure is this provider's row, not the whole run's
            return _timed_call(fn, mode, input_sets)
        except Unavailable:
            raise
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}") from e

    return setup


def _bytes(mode: str, m: int, d: int, n: int, glu: bool, elt: int) -> int:
    f = n // 2 if glu else n
    fwd = m * d + n * d + m * f + m * n  # read x, W; write y and the saved pre-activation h
    bwd = m * f + m * n + 2 * m * d + 2 * n * d  # read dy, h, x, W; write dx, dW
    return elt * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    # CPU: a smoke-sized M, so the torch providers run in seconds (CPU figures say nothing about a GPU)
    tokens = (1024,) if device == "cpu" else (TOKENS[-1:] if quick else TOKENS)
    shapes = [(m, D_MODEL, GEMM_N) for m in tokens]
    elt = torch.empty((), dtype=dtype).element_size()
    out = []
    for op in ("linear_geglu", "linear_gelu"):
        glu = op == "linear_geglu"
        for m, d, n in shapes:
            for mode in MODES:
                gemm_flops = 2 * m * d * n
                case = Case(op=op, mode=mode, shape=f"{m}x{d}x{n}", dtype=DTYPE_NAMES.get(dtype, str(dtype)),
                            bound="compute", bytes=_bytes(mode, m, d, n, glu, elt),
                            flops=gemm_flops * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode])
                for name, maker in _provider_fns(op, mode).items():
                    case.providers[name] = _setup(name, maker, op, mode, (m, d, n), device, dtype)
                out.append(case)
    return out
