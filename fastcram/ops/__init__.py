"""The one boundary between reference math and fused kernels.

The model calls only the four functions of an `Ops` bundle. `get_ops("torch")` returns the reference
implementations; `get_ops("triton")` returns the fused Triton kernels, except for the ops named in
`disable`, which stay on the reference. `per_op` picks a backend op by op; the two norm ops also have a
"cuda" backend, the native kernels built by CMake from kernels/ (native.py loads them, native_norm.py wraps them).
Imports only config, errors and files: never model, data, observe, train, glue, benchmarks, export or cli.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

# op name -> module in this package that holds `<op>_ref` and the public fused `<op>`
OP_MODULES = {
    "layer_norm": "layer_norm",
    "add_layer_norm": "layer_norm",
    "ffn": "ffn",
    "mlm_loss": "mlm_loss",
}
BACKENDS = ("torch", "triton", "cuda")
NATIVE_OPS = ("layer_norm", "add_layer_norm")  # the ops with a native CUDA implementation (kernels/)


@dataclass(frozen=True)
class Ops:
    layer_norm: Callable
    add_layer_norm: Callable
    ffn: Callable  # ffn(x, w_in, w_out, kind): the whole FFN, kind = ModelConfig.ffn ("geglu" | "gelu")
    mlm_loss: Callable
    choice: dict = field(default_factory=dict)  # op name -> "torch" | "triton" | "cuda", for the run log


class OpsError(ValueError):
    """A backend or op that cannot be provided; the message says why and what to do."""


def _module(op: str):
    return importlib.import_module(f"{__name__}.{OP_MODULES[op]}")


def get_op(op: str, backend: str) -> Callable:
    """One op's implementation for one backend."""
    if op not in OP_MODULES:
        raise OpsError(f"unknown op {op!r}; known ops: {', '.join(OP_MODULES)}")
    if backend not in BACKENDS:
        raise OpsError(f"unknown kernels backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "cuda":
        if op not in NATIVE_OPS:
            raise OpsError(f"op {op!r} has no native CUDA implementation (only {', '.join(NATIVE_OPS)})")
        from . import native_norm

        if not native_norm.HAVE_NATIVE:
            raise OpsError(f"the native CUDA library is not available: {native_norm.NATIVE_REASON}")
        return getattr(native_norm, op)
    mod = _module(op)
    if backend == "torch":
        return getattr(mod, f"{op}_ref")
    fn = getattr(mod, op, None)
    if fn is None or not getattr(mod, "HAVE_TRITON", False):
        raise OpsError(f"op {op!r} has no triton implementation here (is triton installed?); "
                       f"use --kernels torch")
    return fn


def get_ops(backend: str = "torch", disable=(), per_op: dict | None = None) -> Ops:
    """The bundle for `backend`; ops in `disable` use the reference; `per_op` overrides op by op."""
    unknown = [op for op in list(disable) + list(per_op or {}) if op not in OP_MODULES]
    if unknown:
        raise OpsError(f"unknown op(s) {', '.join(unknown)}; known ops: {', '.join(OP_MODULES)}")
    choice = {op: ("torch" if op in disable else backend) for op in OP_MODULES}
    choice.update(per_op or {})
    fns = {op: get_op(op, b) for op, b in choice.items()}
    return Ops(**fns, choice=choice)


def triton_unavailable_reason(device_type: str) -> str | None:
    from ._triton import triton_unavailable_reason as why

    return why(device_type)
