"""Microbenchmark cases for the whole FFN (fastcram/ops/ffn.py), GELU-GLU and classic GELU.

Shapes: crammed-bert's, M = micro-batch x 128 tokens (micro-batch 256 and 512; quick: 256), D = 768,
w_in [N, D] = [3072, 768], w_out [D, F]: F = 1536 for the GLU, 3072 for the classic FFN. Shape strings
read "<kind>:MxDxNxF".

Modes: "fwd" is the training forward (inputs require grad, so every provider keeps what its backward
needs); "bwd" times torch.autograd.grad of a retained graph; "fwd+bwd" both.
FLOPs: 2*M*D*(N + F) forward, twice that backward.

Bytes (the column, by construction, for the fused op's design; e = bytes per element, weights in the
compute dtype):
  fwd  e * (2*M*D + N*D + M*N + 2*M*F + D*F)
       GEMM 1 reads x, w_in and writes h, y; the down projection reads y, w_out and writes out
  bwd  e * (4*M*D + 4*M*N + M*F + 2*D*F + 2*N*D)
       the dY GEMM reads dOut, w_out, h and writes dh (dY never reaches memory); dw_out reads dOut, y;
       dx reads dh, w_in and writes dx; dw_in reads dh, x; each weight gradient is written once
The previous path (Triton GEMM 1 with its epilogue, then cuBLAS dY and a separate pointwise pass) and the
"cublas+compiled-epilogue" provider move e * 2*M*F more in the backward (dY written, then read back):
2*M*1536*2 bytes per layer for the GLU in bf16, 0.2 GB at M = 32768.

Providers:
  triton                    the fused op (CUDA only)
  torch                     the unfused reference, eager: F.linear, the activation, F.linear
  cublas+compiled-epilogue  F.linear (cuBLAS), a torch.compile'd activation / GLU epilogue, F.linear: the
                            GEMMs on cuBLAS with inductor's pointwise kernels forward and backward
  torch.compile             torch.compile of the reference
  torch.compile-max-autotune  torch.compile(mode="max-autotune") of the reference
  liger(gelu=tanh)          peer, GLU only: cuBLAS GEMMs for the a and gate halves, Liger-Kernel's GEGLU kernel,
                            the cuBLAS down projection (peers.py)
  apex(gelu=tanh)           peer, classic FFN only: apex's fused dense + GELU + dense, zero biases (peers.py)
Every provider that counts as a peer (kernels.add_speedups: all but triton) is checked against a reference
on the case's inputs, outputs and gradients, before it is timed (peers.checked); one that disagrees is
reported as such and never timed. cublas+compiled-epilogue and the torch.compile providers are checked against
the unfused reference: inductor writes its own kernels, so compiling the reference does not make it the
reference. The two library peers compute GELU's tanh approximation, not the exact erf: they are checked against
the tanh form of the reference (peers.ffn_tanh_ref). "torch" is the reference itself and is not checked (it
would be compared with itself).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import ffn as ffn_op
from . import peers
from .case import MODES, Case, Unavailable, rotating

OP = "ffn"
D_MODEL = 768
N_IN = 3072  # w_in rows: 2F for the GLU, F for the classic FFN
TOKENS = (32768, 65536)  # micro-batch 256 (the default) and 512, of 128-token sequences
INPUT_SETS = 2  # rotated so one call's inputs are not in L2 for the next (x alone is 50 MB at M = 32k)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _glu_epilogue(h: torch.Tensor) -> torch.Tensor:
    a, gate = h.chunk(2, dim=-1)  # [M, F] each
    return F.gelu(gate) * a


def _gelu_epilogue(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)


def _compiled(fn, **kw):
    return torch.compile(fn, dynamic=False, **kw)


def _reference(kind: str):
    return lambda x, w_in, w_out: ffn_op.ffn_ref(x, w_in, w_out, kind)


def _provider_fns(kind: str) -> dict:
    """fastcram's op and the reference: name -> maker of fn(x, w_in, w_out), not output-checked (the op is
    tested against the reference in tests/, and the reference is what the peers are checked against)."""
    return {
        "triton": lambda: (lambda x, w_in, w_out: ffn_op.ffn(x, w_in, w_out, kind)),
        "torch": lambda: _reference(kind),
    }


def _peer_fns(kind: str, device: str) -> dict:
    """Peer name -> (maker of fn(x, w_in, w_out), the reference it is checked against)."""
    epilogue = _glu_epilogue if kind == "geglu" else _gelu_epilogue

    def cublas_compiled_epilogue():
        epi = _compiled(epilogue)
        return lambda x, w_in, w_out: F.linear(epi(F.linear(x, w_in)), w_out)

    exact, tanh = _reference(kind), (lambda x, wi, wo: peers.ffn_tanh_ref(x, wi, wo, kind))
    return {
        "cublas+compiled-epilogue": (cublas_compiled_epilogue, exact),
        "torch.compile": (lambda: _compiled(exact), exact),
        "torch.compile-max-autotune": (lambda: _compiled(exact, mode="max-autotune"), exact),
        f"liger({peers.TANH})": (lambda: peers.liger_ffn(kind, device), tanh),
        f"apex({peers.TANH})": (lambda: peers.apex_ffn(kind, device), tanh),
    }


def _inputs(m: int, d: int, n: int, f: int, device: str, dtype: torch.dtype):
    x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)  # [M, D]
    w_in = (torch.randn(n, d, device=device, dtype=dtype) * d ** -0.5).requires_grad_()  # [N, D]
    w_out = (torch.randn(d, f, device=device, dtype=dtype) * f ** -0.5).requires_grad_()  # [D, F]
    dout = torch.randn(m, d, device=device, dtype=dtype)  # [M, D]
    return x, w_in, w_out, dout


def _timed_call(fn, mode: str, input_sets: list):
    """The zero-argument callable for `mode`, after one warm-up call per input set (compile, autotune)."""
    if mode == "fwd":
        call = rotating(fn, [args[:3] for args in input_sets])
    elif mode == "bwd":
        graphs = [(fn(x, wi, wo), (x, wi, wo), dout) for x, wi, wo, dout in input_sets]  # retained graphs
        call = rotating(lambda out, wrt, dout: torch.autograd.grad(out, wrt, dout, retain_graph=True), graphs)
    else:
        call = rotating(lambda x, wi, wo, dout: torch.autograd.grad(fn(x, wi, wo), (x, wi, wo), dout),
                        input_sets)
    for _ in input_sets:
        call()
    return call


def _peer_setup(name: str, maker, reference, kind: str, mode: str, shape: tuple, device: str,
                dtype: torch.dtype):
    """A peer, after its outputs and gradients matched `reference` on the case's inputs."""
    def setup():
        fn, verdict = peers.checked(name, (OP, kind, shape, str(dtype), device), maker, reference,
                                    lambda: list(_inputs(*shape, device, dtype)[:3]), grad=True)
        return peers.with_check(_warmed_up(name, fn, mode, shape, device, dtype), verdict)

    return setup


def _setup(name: str, maker, mode: str, shape: tuple, device: str, dtype: torch.dtype):
    def setup():
        if name == "triton":
            if not ffn_op.HAVE_TRITON:
                raise Unavailable("triton is not installed")
            if torch.device(device).type != "cuda":
                raise Unavailable("triton kernels are timed on a CUDA GPU only (the CPU interpreter is for tests)")
        return _warmed_up(name, maker(), mode, shape, device, dtype)

    return setup


def _warmed_up(name: str, fn, mode: str, shape: tuple, device: str, dtype: torch.dtype):
    """The timed call on fresh input sets; a compiler failure in the warm-up is this provider's row."""
    input_sets = [_inputs(*shape, device, dtype) for _ in range(INPUT_SETS)]
    if "compile" not in name:
        return _timed_call(fn, mode, input_sets)
    try:
        return _timed_call(fn, mode, input_sets)
    except Unavailable:
        raise
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}") from e


def fwd_bytes(m: int, d: int, n: int, f: int, elt: int) -> int:
    return elt * (2 * m * d + n * d + m * n + 2 * m * f + d * f)


def bwd_bytes(m: int, d: int, n: int, f: int, elt: int) -> int:
    return elt * (4 * m * d + 4 * m * n + m * f + 2 * d * f + 2 * n * d)


def unfused_dy_bytes(m: int, f: int, elt: int) -> int:
    """What the previous backward moved on top of bwd_bytes: dY [M, F] written, then read back."""
    return elt * 2 * m * f


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    # CPU: a smoke-sized M, so the torch providers run in seconds (CPU figures say nothing about a GPU)
    tokens = (256,) if device == "cpu" else (TOKENS[:1] if quick else TOKENS)
    return [_case(kind, m, mode, device, dtype) for kind in ("geglu", "gelu") for m in tokens for mode in MODES]


def _case(kind: str, m: int, mode: str, device: str, dtype: torch.dtype) -> Case:
    f = N_IN // 2 if kind == "geglu" else N_IN
    shape = (m, D_MODEL, N_IN, f)
    elt = torch.empty((), dtype=dtype).element_size()
    fwd_flops = 2 * m * D_MODEL * (N_IN + f)
    nbytes = {"fwd": fwd_bytes(*shape, elt), "bwd": bwd_bytes(*shape, elt),
              "fwd+bwd": fwd_bytes(*shape, elt) + bwd_bytes(*shape, elt)}[mode]
    case = Case(op=OP, mode=mode, shape=f"{kind}:{m}x{D_MODEL}x{N_IN}x{f}", dtype=DTYPE_NAMES.get(dtype, str(dtype)),
                bound="compute", bytes=nbytes, flops=fwd_flops * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode])
    for name, maker in _provider_fns(kind).items():
        case.providers[name] = _setup(name, maker, mode, shape, device, dtype)
    for name, (maker, reference) in _peer_fns(kind, device).items():
        case.providers[name] = _peer_setup(name, maker, reference, kind, mode, shape, device, dtype)
    return case
