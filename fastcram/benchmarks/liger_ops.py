"""Liger-Kernel's kernels as an ops bundle: the step benchmark's `liger` variant (fastcram with Liger's kernels
in place of its own where the interfaces allow). Imported only when that variant is built; importing it
without Liger-Kernel raises ImportError.

Which ops:
- layer_norm: Liger's LayerNorm forward and backward kernels;
- add_layer_norm: a torch add (inductor fuses it with its neighbours), then Liger's LayerNorm: Liger has no
  fused residual add;
- mlm_loss: Liger's fused linear cross-entropy (chunked logits, the gradients formed in the forward, fp32
  weight-gradient accumulator); its backward scales the stored gradients;
- ffn: fastcram's own Triton FFN. Liger's GEGLU computes GELU's tanh approximation, not the recipe's exact
  erf GELU, so it would change the model being timed (the kernel benchmark times it on its own, labelled).

Each Liger kernel sits behind a torch.library custom op, the way fastcram registers its own kernels, so the
model still compiles as one graph (torch.compile(fullgraph=True)): inductor sees an opaque op, as it does for
fastcram's. Liger's own autograd Functions would not do there: its cross-entropy calls .item() (a graph break).
The cross-entropy op therefore syncs with the host once a step, inside Liger's code; that cost is Liger's.
These ops always form the gradients (the step benchmark trains); they are not for evaluation.
"""
from __future__ import annotations

import torch
from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward
from liger_kernel.ops.layer_norm import layer_norm_backward, layer_norm_forward

from ..ops import Ops, get_op
from .peers import LIGER_STEP_OPS


# ---------------------------------------------------------------------------------------------- LayerNorm

@torch.library.custom_op("fastcram_liger::layer_norm_fwd", mutates_args=())
def _ln_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd, _, _ = layer_norm_forward(x, weight, bias, eps)  # x [M, N] -> y [M, N], mean/rstd [M]
    return y, mean, rstd


@_ln_fwd.register_fake
def _(x, weight, bias, eps):
    m = x.shape[0]
    return torch.empty_like(x), x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("fastcram_liger::layer_norm_bwd", mutates_args=())
def _ln_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
            rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = layer_norm_backward(dy, x, weight, bias, mean, rstd)
    return dx, dw, db


@_ln_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _ln_bwd(dy.contiguous(), x, weight, bias, mean, rstd)
    return dx, dw, db, None


_ln_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Liger's LayerNorm over the last dim; y has x's dtype."""
    n = x.shape[-1]
    y, _, _ = _ln_fwd(x.reshape(-1, n).contiguous(), weight, bias, eps)  # [M, N]
    return y.view(x.shape)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual  # the new residual stream; Liger has no fused add
    return s, layer_norm(s, weight, bias, eps)


# ---------------------------------------------------------------------------------------------- MLM loss

@torch.library.custom_op("fastcram_liger::mlm_loss_fwd", mutates_args=())
def _mlm_fwd(rows: torch.Tensor, labels: torch.Tensor,
             weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = fused_linear_cross_entropy_forward(rows, weight, labels, accum_dtype=torch.float32,
                                             compute_gradients=True, weight_requires_grad=True)
    loss, d_rows, d_weight = out[0], out[4], out[5]
    return loss.float(), d_rows, d_weight


@_mlm_fwd.register_fake
def _(rows, labels, weight):
    return rows.new_empty((), dtype=torch.float32), torch.empty_like(rows), torch.empty_like(weight)


def _mlm_setup(ctx, inputs, output):
    _, d_rows, d_weight = output
    ctx.save_for_backward(d_rows, d_weight)


def _mlm_backward(ctx, grad_loss, _gr, _gw):
    d_rows, d_weight = ctx.saved_tensors
    return d_rows * grad_loss, None, d_weight * grad_loss


_mlm_fwd.register_autograd(_mlm_backward, setup_context=_mlm_setup)
torch.library.register_autocast("fastcram_liger::mlm_loss_fwd", "cuda", torch.bfloat16)  # as F.linear would


def mlm_loss(rows: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of rows [K, D] against labels [K] over weight [V, D], by Liger's fused kernel."""
    loss, _, _ = _mlm_fwd(rows.contiguous(), labels, weight)
    return loss


def bundle() -> Ops:
    """The ops bundle of the `liger` step variant: Liger where it fits, fastcram's Triton FFN elsewhere."""
    return Ops(layer_norm=layer_norm, add_layer_norm=add_layer_norm, ffn=get_op("ffn", "triton"),
               mlm_loss=mlm_loss, choice=dict(LIGER_STEP_OPS))
