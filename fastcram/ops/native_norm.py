"""The native CUDA LayerNorm (kernels/, built by CMake) as an optional ops backend: `get_ops(..., per_op=
{"layer_norm": "cuda", "add_layer_norm": "cuda"})`.

Registered as custom ops (forward and backward) so torch.compile(fullgraph=True) sees no graph break; the
forward saves fp32 mean and rstd, the backward calls the native backward (dx in one pass, dweight/dbias by a
two-stage reduction). Under autocast x (bf16) and the residual (fp32) arrive in different dtypes: the native
kernels take one activation dtype, so both are promoted to the wider one before the call, keeping the
residual stream in its own dtype, as the reference does. Without the built library (or a GPU) the backend is
absent, with the loader's reason.
"""
from __future__ import annotations

import torch

from . import native

HAVE_NATIVE, NATIVE_REASON = native.available()


@torch.library.custom_op("fastcram::native_ln_fwd", mutates_args=())
def _ln_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return native.layer_norm_fwd(x.contiguous(), weight, bias, eps)


@_ln_fwd.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)  # fakes are contiguous, like the kernels' outputs
    return x.new_empty(x.shape), stats, x.new_empty(stats.shape, dtype=torch.float32)


@torch.library.custom_op("fastcram::native_add_ln_fwd", mutates_args=())
def _add_ln_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return native.add_layer_norm_fwd(x.contiguous(), residual.contiguous(), weight, bias, eps)


@_add_ln_fwd.register_fake
def _(x, residual, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, x.new_empty(stats.shape, dtype=torch.float32)


@torch.library.custom_op("fastcram::native_ln_bwd", mutates_args=())
def _ln_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
            ds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return native.layer_norm_bwd(dy.contiguous(), x.contiguous(), weight, mean, rstd,
                                 None if ds is None else ds.contiguous())


@_ln_bwd.register_fake
def _(dy, x, weight, mean, rstd, ds):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _ln_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _ln_bwd(dy, x, weight, mean, rstd, None)
    return dx, dw, db, None


_ln_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


def _add_setup(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)


def _add_backward(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only s was used downstream
        dy = torch.zeros_like(s)
    dx, dw, db = _ln_bwd(dy, s, weight, mean, rstd, ds)
    return dx, dx, dw, db, None  # s = x + residual: the same gradient for both


_add_ln_fwd.register_autograd(_add_backward, setup_context=_add_setup)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return _ln_fwd(x, weight, bias, eps)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(x.dtype, residual.dtype)  # autocast: bf16 branch output + fp32 stream
    s, y, _, _ = _add_ln_fwd(x.to(dtype), residual.to(dtype), weight, bias, eps)
    return s, y.to(x.dtype)
