"""LayerNorm and fused residual-add + LayerNorm over the last dimension.

Fused ops (Triton):
- `layer_norm(x, w, b, eps)`: y = (x - mean) * rstd * w + b, one read of x and one write of y.
- `add_layer_norm(x, residual, w, b, eps) -> (s, y)`: s = x + residual, y = LN(s), in one pass: x and
  residual are read once, s and y written once.
Rows are everything but the last dimension (any leading shape); the feature size N is 1..8192.
Loads are converted to fp32 at once; statistics and all math are fp32; outputs are stored in their dtype.

Dtypes (also under autocast, where the model adds a bf16 branch output `x` to an fp32 residual stream):
- s takes the promoted dtype of x and residual (what `x + residual` gives), so an fp32 stream stays fp32;
  y is normalised from s as stored (rounded to s's dtype), like the reference.
- y takes x's dtype (the input dtype for layer_norm; the branch dtype for add_layer_norm). Under autocast
  that is bf16, which is exactly what the next Linear would cast y to, at half the bytes written. The
  reference (F.layer_norm under autocast) returns fp32 here instead; the values fed to a matmul are equal.
- weight and bias may be fp32 (autocast keeps parameters fp32) or bf16; their gradients keep their dtype.
  Autocast itself is not consulted, so eager, compiled and autocast runs all follow these rules.

Saved for backward: the normalised input (x for layer_norm, s for add_layer_norm), weight, and per-row
mean and rstd in fp32 (8 bytes a row); x-hat is recomputed in the backward instead of stored.
Backward: stage 1 runs over the rows in chunks, one chunk per program: dx in one pass, and dweight/dbias
partial sums kept in registers and written as [programs, N] fp32; stage 2 sums the partials (no atomics).
For add_layer_norm the incoming grad of s is added to the LN grad; dx = dresidual, written once (twice
when x and residual differ in dtype, one copy in each dtype).

Bound: memory. Minimal bytes, e = element size, M rows of N features (the [N] params and the 8-byte-a-row
statistics are small next to these):
- layer_norm fwd 2*M*N*e (x, y); bwd 3*M*N*e (dy, x, dx).
- add_layer_norm fwd 4*M*N*e (x, residual, s, y); bwd 4*M*N*e (dy, ds, s, dx).
FLOPs are about 8 per element forward and 12 backward: far below any compute roof.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import HAVE_TRITON, interpreting, multiprocessor_count, tl, triton, triton_unavailable_reason

__all__ = ["HAVE_TRITON", "layer_norm_ref", "add_layer_norm_ref", "layer_norm", "add_layer_norm"]

MAX_N = 8192  # one row lives in registers: BLOCK_N = next_power_of_2(N) fp32 values per row
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROGRAMS_PER_SM = 8  # backward stage 1: enough programs to fill the GPU, few partial rows to reduce


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual  # the new residual stream
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _ln_fwd_kernel(X, R, S, Y, W, B, MEAN, RSTD, M, N, eps,
                       HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program normalises BLOCK_M rows; a row is held whole in registers."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        cols = tl.arange(0, BLOCK_N)  # [BN]
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]  # [BM, BN]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]  # [BM, BN]

        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # [BM, BN]
        if HAS_RES:
            x += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
            s_out = x.to(S.dtype.element_ty)
            tl.store(S + offs, s_out, mask=mask)
            x = s_out.to(tl.float32)  # normalise s as stored, as the reference does

        mean = tl.sum(x, axis=1) / N  # [BM]
        xc = tl.where(mask, x - mean[:, None], 0.0)  # [BM, BN]
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)  # [BM]
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BN]
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BN]
        y = xc * rstd[:, None] * w[None, :] + b[None, :]  # [BM, BN]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _ln_bwd_kernel(DY, DS, X, W, MEAN, RSTD, DX, DR, DW_PART, DB_PART, M, N, rows_per_prog,
                       HAS_DS: tl.constexpr, STORE_DR: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Stage 1: dx for a chunk of rows; dw/db partial sums of the chunk to row pid of the partials."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)  # [BN]
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BN]
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # reduced over rows once, at the end
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        row_start = pid * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, M)
        for i in range(0, rows_per_prog, BLOCK_M):
            rows = row_start + i + tl.arange(0, BLOCK_M)  # [BM]
            row_ok = rows < row_end
            mask = row_ok[:, None] & col_ok[None, :]  # [BM, BN]
            offs = rows[:, None].to(tl.int64) * N + cols[None, :]  # [BM, BN]

            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)  # [BM]
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)  # [BM]
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # [BM, BN]
            wdy = w[None, :] * dy  # [BM, BN]
            c1 = tl.sum(xhat * wdy, axis=1) / N  # [BM]
            c2 = tl.sum(wdy, axis=1) / N  # [BM]
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]  # [BM, BN]
            if HAS_DS:
                dx += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if STORE_DR:
                tl.store(DR + offs, dx.to(DR.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)

    def _configs() -> list:
        """Rows per program x warps; the interpreter gets exactly one config (it cannot time)."""
        if interpreting():
            return [triton.Config({"BLOCK_M": 4}, num_warps=4)]
        return [triton.Config({"BLOCK_M": bm}, num_warps=nw) for bm in (1, 2, 4, 8) for nw in (2, 4, 8, 16)]

    def _prune(configs, named_args, **kwargs):
        """Keep tiles of 4..16 fp32 values a thread: fewer starves the loads, more spills registers."""
        block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))

        def per_thread(c):
            return c.kwargs["BLOCK_M"] * block_n / (32 * c.num_warps)

        kept = [c for c in configs if 4 <= per_thread(c) <= 16]
        return kept or [min(configs, key=lambda c: abs(per_thread(c) - 8))]

    _ln_fwd_tuned = triton.autotune(_configs(), key=["N", "HAS_RES"],
                                    prune_configs_by={"early_config_prune": _prune})(_ln_fwd_kernel)
    _ln_bwd_tuned = triton.autotune(_configs(), key=["N", "HAS_DS", "STORE_DR"],
                                    prune_configs_by={"early_config_prune": _prune})(_ln_bwd_kernel)


# ----------------------------------------------------------------------------------------------------
# Launchers. `tile=(BLOCK_M, num_warps)` bypasses the autotuner (tests use it to cover every tile shape).
# ----------------------------------------------------------------------------------------------------
def _check(where: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> int:
    """Validate shapes, dtypes and devices; return the feature size N."""
    if x.dim() < 1:
        raise ValueError(f"{where}: x must have at least one dimension (features last), got a scalar")
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"{where}: feature size {n} is outside 1..{MAX_N}; use the torch backend for it")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t.dtype not in DTYPES:
            raise ValueError(f"{where}: {name} has dtype {t.dtype}; supported: fp32, bf16, fp16")
        if t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}; move them together")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected ({n},) for x {tuple(x.shape)}")
    why = triton_unavailable_reason(x.device.type)
    if why:
        raise ValueError(f"{where}: {why}")
    return n


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers fill (tests swap in a NaN-filled version to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] -> contiguous [M, N] (a copy only for non-contiguous input)."""
    return t.reshape(-1, n).contiguous()


def _fwd_launch(x2, r2, s2, y2, weight, bias, mean, rstd, eps, tile):
    m, n = x2.shape
    if m == 0:
        return
    has_res = r2 is not None
    args = (x2, r2 if has_res else x2, s2 if has_res else y2, y2, weight.contiguous(), bias.contiguous(),
            mean, rstd, m, n, eps)
    block_n = triton.next_power_of_2(n)
    if tile is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
        _ln_fwd_tuned[grid](*args, HAS_RES=has_res, BLOCK_N=block_n)
    else:
        block_m, warps = tile
        _ln_fwd_kernel[(triton.cdiv(m, block_m),)](*args, HAS_RES=has_res, BLOCK_M=block_m, BLOCK_N=block_n,
                                                    num_warps=warps)


def layer_norm_fwd_launch(x, weight, bias, eps, tile=None):
    """(y [..., N] in x.dtype, mean [...] fp32, rstd [...] fp32)."""
    n = _check("layer_norm", x, weight, bias)
    x2 = _rows(x, n)  # [M, N]
    y = _alloc(x.shape, dtype=x.dtype, device=x.device)
    mean = _alloc(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = _alloc(x.shape[:-1], dtype=torch.float32, device=x.device)
    _fwd_launch(x2, None, None, y.view(-1, n), weight, bias, mean.view(-1), rstd.view(-1), eps, tile)
    return y, mean, rstd


def add_layer_norm_fwd_launch(x, residual, weight, bias, eps, tile=None):
    """(s in promote(x, residual), y in x.dtype, mean fp32, rstd fp32)."""
    n = _check("add_layer_norm", x, weight, bias)
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual has shape {tuple(residual.shape)} but x has "
                         f"{tuple(x.shape)}; they must match (no broadcasting)")
    if residual.dtype not in DTYPES or residual.device != x.device:
        raise ValueError(f"add_layer_norm: residual ({residual.dtype}, {residual.device}) must be fp32/bf16/fp16 "
                         f"on x's device {x.device}")
    x2, r2 = _rows(x, n), _rows(residual, n)  # [M, N] each
    s = _alloc(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    y = _alloc(x.shape, dtype=x.dtype, device=x.device)
    mean = _alloc(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = _alloc(x.shape[:-1], dtype=torch.float32, device=x.device)
    _fwd_launch(x2, r2, s.view(-1, n), y.view(-1, n), weight, bias, mean.view(-1), rstd.view(-1), eps, tile)
    return s, y, mean, rstd


def _stage1_programs(device: torch.device) -> int:
    """How many programs stage 1 of the backward aims for."""
    if device.type == "cpu":
        return 3  # interpreter: a few programs, so chunk edges and the reduction are exercised
    return PROGRAMS_PER_SM * multiprocessor_count(device)


def layer_norm_bwd_launch(dy, ds, x, weight, mean, rstd, dx_dtype, dr_dtype=None, tile=None):
    """Gradients of y = LN(x) (plus the incoming grad ds of x itself, when given).

    Returns (dx in dx_dtype, dr, dweight, dbias in weight.dtype); dr is a second copy of dx in dr_dtype,
    or an empty tensor when dr_dtype is None.
    """
    n = _check("layer_norm backward", x, weight, weight)
    for name, t in (("dy", dy), ("ds", ds)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"layer_norm backward: {name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")
    x2, dy2 = _rows(x, n), _rows(dy, n)  # [M, N] each
    ds2 = _rows(ds, n) if ds is not None else None
    m = x2.shape[0]
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.dtype != torch.float32 or t.numel() != m:
            raise ValueError(f"layer_norm backward: {name} must be fp32 with {m} elements (as the forward returns "
                             f"it), got {t.dtype} {tuple(t.shape)}")
    dx = _alloc(x.shape, dtype=dx_dtype, device=x.device)
    dr = _alloc(x.shape if dr_dtype is not None else (0,), dtype=dr_dtype or dx_dtype, device=x.device)
    if m == 0:
        return dx, dr, weight.new_zeros(weight.shape), weight.new_zeros(weight.shape)
    rows_per_prog = triton.cdiv(m, _stage1_programs(x.device))
    programs = triton.cdiv(m, rows_per_prog)
    dw_part = _alloc((programs, n), dtype=torch.float32, device=x.device)  # every row is written
    db_part = _alloc((programs, n), dtype=torch.float32, device=x.device)
    args = (dy2, ds2 if ds2 is not None else dy2, x2, weight.contiguous(), mean.reshape(-1), rstd.reshape(-1),
            dx.view(-1, n), dr.view(-1, n) if dr_dtype is not None else dx.view(-1, n), dw_part, db_part,
            m, n, rows_per_prog)
    flags = dict(HAS_DS=ds is not None, STORE_DR=dr_dtype is not None, BLOCK_N=triton.next_power_of_2(n))
    if tile is None:
        _ln_bwd_tuned[(programs,)](*args, **flags)
    else:
        block_m, warps = tile
        _ln_bwd_kernel[(programs,)](*args, **flags, BLOCK_M=block_m, num_warps=warps)
    # Stage 2: the small [programs, N] reduction.
    return dx, dr, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


def compile_plan(cfg, micro_batch: int) -> None:
    """Every launch the model makes of this file's kernels at one micro-batch, forward and backward, on meta
    tensors: for `fastcram bench compile`, which compiles them for a GPU target without running them.

    Dtypes as the model feeds them: an fp32 residual stream with bf16 branches under autocast (the stream's
    first norms see fp32), a bf16 stream (--residual-dtype bf16), and plain fp32.
    """
    def t(dtype, *shape):
        return torch.empty(*shape, dtype=dtype, device="meta")

    f32, b16 = torch.float32, torch.bfloat16
    tokens, hidden = micro_batch * cfg.seq_len, cfg.hidden
    w, b = t(f32, hidden), t(f32, hidden)
    for x_dtype in (f32, b16):  # layer_norm of the stream
        x = t(x_dtype, tokens, hidden)
        y, mean, rstd = layer_norm_fwd_launch(x, w, b, 1e-12)
        layer_norm_bwd_launch(t(x_dtype, tokens, hidden), None, x, w, mean, rstd, x_dtype)
    for x_dtype, r_dtype in ((b16, f32), (b16, b16), (f32, f32)):  # branch + stream
        x, r = t(x_dtype, tokens, hidden), t(r_dtype, tokens, hidden)
        s, y, mean, rstd = add_layer_norm_fwd_launch(x, r, w, b, 1e-12)
        layer_norm_bwd_launch(t(x_dtype, tokens, hidden), t(s.dtype, tokens, hidden), s, w, mean, rstd, x_dtype,
                              r_dtype if r_dtype != x_dtype else None)


# ----------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), autograd through the bwd op.
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcram::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_fwd_launch(x, weight, bias, eps)


# The fake (meta) outputs are contiguous like the launchers' (never empty_like: it keeps a strided input's
# strides, and compiled code would then disagree with what the kernels return).
@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, x.new_empty(stats.shape, dtype=torch.float32)


@torch.library.custom_op("fastcram::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_fwd_launch(x, residual, weight, bias, eps)


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return s, x.new_empty(x.shape), stats, x.new_empty(stats.shape, dtype=torch.float32)


@torch.library.custom_op("fastcram::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor, dx_dtype: torch.dtype, dr_dtype: Optional[torch.dtype]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_bwd_launch(dy, ds, x, weight, mean, rstd, dx_dtype, dr_dtype)


@_layer_norm_bwd.register_fake
def _(dy, ds, x, weight, mean, rstd, dx_dtype, dr_dtype):
    dr = x.new_empty(x.shape if dr_dtype is not None else (0,), dtype=dr_dtype or dx_dtype)
    dw = weight.new_empty(weight.shape)
    return x.new_empty(x.shape, dtype=dx_dtype), dr, dw, weight.new_empty(weight.shape)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _ln_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, _, dw, db = torch.ops.fastcram.layer_norm_bwd(dy, None, x, weight, mean, rstd, x.dtype, None)
    return dx, dw, db.to(ctx.bias_dtype), None


def _add_setup(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused s (or y) arrives as None: no zero tensor is built


def _add_backward(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    x_dtype, r_dtype, b_dtype = ctx.dtypes
    if dy is None:  # only s was used: LN contributes nothing
        if ds is None:
            return None, None, None, None, None
        return ds.to(x_dtype), ds.to(r_dtype), torch.zeros_like(weight), torch.zeros(weight.shape, dtype=b_dtype,
                                                                                     device=weight.device), None
    dr_dtype = r_dtype if r_dtype != x_dtype else None
    dx, dr, dw, db = torch.ops.fastcram.layer_norm_bwd(dy, ds, s, weight, mean, rstd, x_dtype, dr_dtype)
    return dx, (dr if dr_dtype is not None else dx), dw, db.to(b_dtype), None


_layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)
_add_layer_norm_fwd.register_autograd(_add_backward, setup_context=_add_setup)


# ----------------------------------------------------------------------------------------------------
# Public functions (the names the Ops bundle takes)
# ----------------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim; y has x's dtype (see the module docstring for the dtype rules)."""
    y, _, _ = torch.ops.fastcram.layer_norm_fwd(x, weight, bias, eps)
    return y


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) = (x + residual, LN(x + residual)) in one pass.

    s has the promoted dtype of x and residual (fp32 when the stream is fp32 and x is a bf16 branch output
    under autocast); y has x's dtype. Gradients flow from both s and y; dx and dresidual are equal, each in
    its input's dtype.
    """
    s, y, _, _ = torch.ops.fastcram.add_layer_norm_fwd(x, residual, weight, bias, eps)
    return s, y
