"""Sparse-prediction MLM loss: project the predicted rows onto the tied embedding, cross-entropy.

Public: `mlm_loss(rows [K, D], labels [K], weight [V, D]) -> 0-d fp32 loss`, the mean over the K predicted
rows (gathered by the model) of `logsumexp(z_k) - z_k[label_k]` with `z_k = weight @ rows[k]`. Gradients go
to `rows` and to `weight` (accumulated in fp32, returned in each input's dtype).

What is fused: the gradient is formed in the forward. For each chunk of Kc predicted rows (Kc from the
memory budget, see Memory):
1. logits chunk z = rows[c] @ W^T ([Kc, V], compute dtype): torch.mm, i.e. cuBLAS on a GPU;
2. `_cross_entropy_kernel` (Triton, one program a row, fp32 math): running max and sum of exp over the row,
   lse, the row's loss term lse - z[label]; then, while the row is hot, it writes the logit gradient
   (softmax - onehot) / n_valid OVER THE LOGITS CHUNK IN PLACE;
3. d_rows[c] = g @ W ([Kc, D]) written straight into its slice of the output (torch.mm, out=);
4. d_weight += g^T @ rows[c] ([V, D], fp32 accumulation in cuBLAS: addmm with beta = 1; for bf16 inputs
   cuBLAS's fp32 output (`out_dtype`, torch >= 2.10 for an fp32 accumulator), so no bf16 partial is rounded).
The loss is row_loss.sum() / n_valid. What the backward gets is only the incoming scalar: it scales the
stored d_rows and d_weight in place (`_scale_kernel`, fp32 multiply) and returns them. No logits are
recomputed.

Saved for backward: d_rows [K, D] and d_weight [V, D], which are the gradients themselves. Not the inputs.
Without grad (evaluation, or no input requiring grad) only steps 1-2 run, with no gradient write: 2*K*V*D.
When only one of rows / weight requires grad, only its GEMM runs (4*K*V*D).

Cost, K predicted rows, V vocabulary, D hidden, e bytes per element, Kc rows a chunk, n = K / Kc chunks:
- FLOPs: 2*K*V*D (logits) + 2*K*V*D (d_rows) + 2*K*V*D (d_weight) = 6*K*V*D with grad, exactly the
  reference's; 2*K*V*D without. The softmax/gradient pass adds ~10 FLOPs an element, O(K*V).
- Bytes from memory: the logits/gradient chunk is written by the GEMM, read by the kernel (a second
  pass re-reads the row, mostly from L2), rewritten in place, and read by the two GEMMs: ~5*K*V*e. W is
  read twice a chunk (2*n*V*D*e); the fp32 d_weight accumulator is read and written once a chunk
  (8*(n-1)*V*D + 4*V*D) and, for bf16, cast once to the bf16 output.
- crammed-bert, micro-batch 256: K = 8192 (32 of 128 tokens), D = 768, V = 32768, bf16, Kc = 2048 (n = 4):
  6*K*V*D = 1.24 TFLOP (0.41 TFLOP without grad); ~2.5 GiB of logits/gradient traffic (K*V*e = 512 MiB a
  pass), 0.38 GiB of W reads, 0.66 GiB of fp32 accumulator traffic, 0.14 GiB for the final cast: ~3.7 GiB.
  At the H200's nominal 989 TFLOP/s and 4.8 TB/s that is >= 1.25 ms of math against ~0.8 ms of traffic,
  most of it inside the compute-bound GEMMs (by arithmetic; not measured yet). The reference moves about
  the same bytes (it writes the bf16 logits, reads them in the loss, reads them again and writes their
  gradient in the backward) and holds 1 GiB of them.

Memory (extra = beyond the inputs, the loss, and the gradients it returns, d_rows and the fp32 weight
gradient among them): the logits chunk Kc*V*e, Kc chosen so that it is half the budget, i.e. Kc = K/(2e)
rows (K/4 in bf16, K/8 in fp32; for K >= 128 rounded down to a multiple of 64), and [K] fp32 row losses.
The budget is a quarter of the fp32 [K, V] logits, K*V bytes. At crammed-bert's shape: 128 MiB of logits
chunk (+ 96 MiB for the fp32 accumulator of a bf16 weight, freed at the end of the forward once cast to the
bf16 d_weight) against the 256 MiB budget. The backward scales in place and allocates nothing. A bf16
chunk of 2048 x 32768 keeps every GEMM large (each >= 100 GFLOP). `row_chunk` overrides Kc.

Limits
- rows [K, D] and weight [V, D] share one dtype, fp32 or bf16 (fp16 is refused: (p - onehot) / K
  underflows). labels are int32/int64 [K], K >= 1. Any strides.
- Labels equal to -100 are ignored exactly like F.cross_entropy's default ignore_index (no loss, no
  gradient, excluded from the mean; the count stays on the device, so there is no host sync). Any other
  label outside [0, V) is NOT checked on the GPU (a check would need a host sync): that row's label logit
  counts as 0, so it adds its logsumexp to the loss and its plain softmax to the gradient. On the CPU (the
  interpreter) labels are checked and raise ValueError.
- Backward runs once per forward: a second backward through the same graph (retain_graph=True) raises
  autograd's "modified by an inplace operation" error instead of scaling the gradients twice.
- The forward op's gradient outputs are internal: the backward scales them in place, which is sound (and
  compiles; inductor reuses their buffers) because the public function never hands them out. A graph that
  returned them to its caller could not be partitioned by AOTAutograd, so opcheck's aot_dispatch test is
  left out for the variants with gradients (tests/test_mlm_loss.py::test_opcheck).
- Autocast: registered for "cuda" with torch.library.register_autocast, casting rows and weight to bf16,
  which is what F.linear in the reference does under autocast(bfloat16); the weight gradient then comes
  back in bf16 (rounded once from the fp32 accumulator) and autograd casts it to the fp32 parameter's dtype,
  as for the reference.
- Deterministic: no atomics; fixed chunking; cuBLAS GEMMs and torch's sums are run to run identical.
- FLOPs are registered with torch.utils.flop_counter, so FlopCounterMode (and tools built on it) counts
  6*K*V*D (2*K*V*D without grad) for the forward op and 0 for the in-place scaling.
"""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from fastcram.ops._triton import HAVE_TRITON, interpreting, tl, triton, triton_unavailable_reason

__all__ = ["HAVE_TRITON", "IGNORE_INDEX", "mlm_loss_ref", "mlm_loss"]

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index, honoured by both backends


def mlm_loss_ref(rows: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(rows, weight)  # [K, V]
    return F.cross_entropy(logits.float(), labels, reduction="mean")


# ------------------------------------------------------------------------------------------------ kernels
if HAVE_TRITON:

    @triton.jit
    def _cross_entropy_kernel(z_ptr, lab_ptr, loss_ptr, inv_valid_ptr, V, stride_z,
                              WRITE_GRAD: tl.constexpr, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row of the logits chunk: its loss term, and (WRITE_GRAD) its gradient over the logits."""
        row = tl.program_id(0)
        z_row = z_ptr + row.to(tl.int64) * stride_z
        lab = tl.load(lab_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        # pass 1: running max m and sum s of exp(z - m), fp32; 0-d accumulators
        m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + cols
            z = tl.load(z_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))  # finite from the first block on: it has a column
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = lab != IGNORE
        in_range = (lab >= 0) & (lab < V)
        target = tl.load(z_row + lab, mask=in_range, other=0.0).to(tl.float32)  # read before pass 2
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        if WRITE_GRAD:
            # pass 2, in place: (softmax - onehot) / n_valid; zero for an ignored row
            scale = tl.where(valid, tl.load(inv_valid_ptr), 0.0)
            for v0 in range(0, V, BLOCK_V):
                v = v0 + cols
                z = tl.load(z_row + v, mask=v < V, other=0.0).to(tl.float32)
                g = (tl.exp(z - lse) - tl.where(v == lab, 1.0, 0.0)) * scale
                tl.store(z_row + v, g.to(z_ptr.dtype.element_ty), mask=v < V)

    @triton.jit
    def _scale_kernel(x_ptr, s_ptr, n, BLOCK: tl.constexpr):
        """x *= s in place, the multiply in fp32 (s is the fp32 incoming gradient, a device scalar)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        tl.store(x_ptr + i, (x * tl.load(s_ptr)).to(x_ptr.dtype.element_ty), mask=i < n)


# ---------------------------------------------------------------------------------------------- launchers
_DTYPES = (torch.float32, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_GPU_BLOCK_V = 4096  # columns a step of the cross-entropy kernel (8 KiB of a bf16 row)
_SCALE_BLOCK = 4096


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every buffer a kernel or GEMM writes (tests swap it for NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(rows, labels, weight) -> None:
    why = triton_unavailable_reason(rows.device.type)
    if why is not None:
        raise ValueError(f"mlm_loss (fastcram/ops/mlm_loss.py): {why}; or use --kernels torch")
    if rows.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"mlm_loss: rows must be [K, D] and weight [V, D]; got {tuple(rows.shape)} and "
                         f"{tuple(weight.shape)} (gather the predicted rows into one [K, D] tensor)")
    if rows.shape[1] != weight.shape[1]:
        raise ValueError(f"mlm_loss: rows have D={rows.shape[1]} but weight has D={weight.shape[1]}")
    if rows.dtype != weight.dtype or rows.dtype not in _DTYPES:
        raise ValueError(f"mlm_loss: rows and weight must share one dtype, float32 or bfloat16; got "
                         f"{rows.dtype} and {weight.dtype} (run under autocast or cast them)")
    if labels.dim() != 1 or labels.shape[0] != rows.shape[0] or rows.shape[0] == 0:
        raise ValueError(f"mlm_loss: labels must be [K] with K = rows.shape[0] >= 1 (non-empty, one length); "
                         f"got rows {tuple(rows.shape)} and labels {tuple(labels.shape)}")
    if labels.dtype not in _INDEX_DTYPES:
        raise ValueError(f"mlm_loss: labels must be int32 or int64; got {labels.dtype}")
    devices = {t.device for t in (rows, labels, weight)}
    if len(devices) != 1:
        raise ValueError(f"mlm_loss: all inputs must be on one device; got {sorted(map(str, devices))}")
    if rows.is_cuda and rows.dtype == torch.bfloat16 and torch.torch_version.TorchVersion(torch.__version__) < "2.10":
        raise ValueError(f"mlm_loss: bf16 needs torch >= 2.10 (addmm of bf16 operands into an fp32 accumulator, "
                         f"out_dtype); this is torch {torch.__version__}: upgrade it or use --kernels torch")
    if rows.device.type == "cpu":
        _check_labels_cpu(labels, weight.shape[0])


def _check_labels_cpu(labels, vocab: int) -> None:
    """Debug range check, only where reading values costs no device sync (CPU / interpreter)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != IGNORE_INDEX)
    if bool(bad.any()):
        raise ValueError(f"mlm_loss: labels must lie in [0, {vocab}) or equal {IGNORE_INDEX} (ignored)")


def default_row_chunk(k: int, dtype: torch.dtype) -> int:
    """Rows a chunk: the [Kc, V] chunk is half the budget (K*V bytes = a quarter of the fp32 logits)."""
    kc = max(1, k // (2 * torch.empty((), dtype=dtype).element_size()))
    return kc - kc % 64 if kc >= 128 else kc  # GEMM-friendly row counts at real sizes


def _block_v(v: int) -> int:
    if interpreting():
        return min(triton.next_power_of_2(v), 1024)  # numpy blocks: few, large steps
    return min(triton.next_power_of_2(v), _GPU_BLOCK_V)


def _accumulate_d_weight(acc, g_t, rows_c, first: bool) -> None:
    """acc [V, D] (+)= g_t [V, Kc] @ rows_c [Kc, D], fp32 accumulation; acc is fp32 or the inputs' dtype."""
    if acc.dtype == g_t.dtype:
        if first:
            torch.mm(g_t, rows_c, out=acc)
        else:
            acc.addmm_(g_t, rows_c)
    elif acc.is_cuda:  # bf16 operands, fp32 accumulator: cuBLAS writes fp32 itself
        if first:
            torch.mm(g_t, rows_c, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, g_t, rows_c, out_dtype=torch.float32, out=acc)
    else:  # bf16 in the CPU interpreter (tests only): fp32 copies of the operands
        if first:
            torch.mm(g_t.float(), rows_c.float(), out=acc)
        else:
            acc.addmm_(g_t.float(), rows_c.float())


def _forward(rows, labels, weight, grad_rows: bool, grad_weight: bool, row_chunk: int | None = None,
             block_v: int | None = None):
    """(loss 0-d fp32, d_rows [K, D] or [0], d_weight [V, D] or [0]): the gradients of the mean loss."""
    _check_inputs(rows, labels, weight)
    labels = labels.contiguous()
    (k, d), v, dev, dtype = rows.shape, weight.shape[0], rows.device, rows.dtype
    kc = min(k, row_chunk or default_row_chunk(k, dtype))
    write_grad = grad_rows or grad_weight
    n_valid = (labels != IGNORE_INDEX).sum()  # stays on the device
    inv_valid = (1.0 / n_valid).to(torch.float32).reshape(1)
    logits = _empty((kc, v), dtype, dev)  # one row chunk of logits, overwritten by their gradient
    row_loss = _empty((k,), torch.float32, dev)  # [K]
    d_rows = _empty((k, d), dtype, dev) if grad_rows else rows.new_empty((0,))
    d_weight = _empty((v, d), dtype, dev) if grad_weight else weight.new_empty((0,))
    acc = d_weight if dtype == torch.float32 or not grad_weight else _empty((v, d), torch.float32, dev)
    bv = block_v or _block_v(v)
    autocast_type = "cpu" if dev.type == "meta" else dev.type  # meta: `fastcram bench compile`'s launches
    with torch.autocast(autocast_type, enabled=False):  # the chunk GEMMs run in the inputs' dtype, into out=
        for c0 in range(0, k, kc):  # static: K and Kc are shapes
            c1 = min(c0 + kc, k)
            z = logits[: c1 - c0]  # [kc, V]
            rows_c = rows[c0:c1]  # [kc, D]
            torch.mm(rows_c, weight.t(), out=z)
            _cross_entropy_kernel[(c1 - c0,)](z, labels[c0:c1], row_loss[c0:c1], inv_valid, v, z.stride(0),
                                              WRITE_GRAD=write_grad, IGNORE=IGNORE_INDEX, BLOCK_V=bv,
                                              num_warps=1 if interpreting() else 8)
            if grad_rows:
                torch.mm(z, weight, out=d_rows[c0:c1])  # [kc, D]
            if grad_weight:
                _accumulate_d_weight(acc, z.t(), rows_c, first=c0 == 0)  # [V, D]
    if acc is not d_weight:
        d_weight.copy_(acc)  # the one rounding to bf16
    return row_loss.sum() / n_valid, d_rows, d_weight


def _scale_(grad, *tensors) -> None:
    """Every tensor *= grad (0-d fp32 on the device), in place."""
    s = grad.to(torch.float32).reshape(1)
    for x in tensors:
        n = x.numel()
        if n:  # an empty [0] stands for a gradient that was not asked for
            _scale_kernel[(triton.cdiv(n, _SCALE_BLOCK),)](x, s, n, BLOCK=_SCALE_BLOCK, num_warps=8)


def compile_plan(cfg, micro_batch: int) -> None:
    """Every kernel launch of this op at one micro-batch (K = micro_batch * masked tokens a sequence), with
    and without gradients, bf16 and fp32, on meta tensors: for `fastcram bench compile`."""
    from ..config import DataConfig

    k = micro_batch * DataConfig(seq_len=cfg.seq_len).masked_per_seq  # the recipe's fixed mask count
    for dtype in (torch.bfloat16, torch.float32):
        rows = torch.empty(k, cfg.hidden, dtype=dtype, device="meta")
        weight = torch.empty(cfg.vocab_size, cfg.hidden, dtype=dtype, device="meta")
        labels = torch.empty(k, dtype=torch.int64, device="meta")
        _forward(rows, labels, weight, False, False)  # evaluation
        _, d_rows, d_weight = _forward(rows, labels, weight, True, True)  # training
        _scale_(torch.empty((), device="meta"), d_rows, d_weight)


# ------------------------------------------------------------------------------------------- registration
@torch.library.custom_op("fastcram::mlm_loss_fwd", mutates_args=())
def _mlm_loss_fwd_op(rows: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, grad_rows: bool,
                     grad_weight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(rows, labels, weight, grad_rows, grad_weight)


@_mlm_loss_fwd_op.register_fake
def _(rows, labels, weight, grad_rows, grad_weight):
    loss = rows.new_empty((), dtype=torch.float32)
    d_rows = rows.new_empty(rows.shape if grad_rows else (0,))
    d_weight = weight.new_empty(weight.shape if grad_weight else (0,))
    return loss, d_rows, d_weight


@torch.library.custom_op("fastcram::mlm_loss_scale_", mutates_args=("d_rows", "d_weight"))
def _mlm_loss_scale_op(grad: torch.Tensor, d_rows: torch.Tensor, d_weight: torch.Tensor) -> None:
    _scale_(grad, d_rows, d_weight)


@_mlm_loss_scale_op.register_fake
def _(grad, d_rows, d_weight):
    return None


def _setup_context(ctx, inputs, output):
    _, d_rows, d_weight = output
    ctx.mark_non_differentiable(d_rows, d_weight)  # the stored gradients, not results
    ctx.set_materialize_grads(False)  # no zero-filled [K, D] and [V, D] "gradients" for them
    ctx.save_for_backward(d_rows, d_weight)
    ctx.grad_rows, ctx.grad_weight = inputs[3], inputs[4]


def _backward_rule(ctx, grad_loss, _grad_d_rows, _grad_d_weight):
    d_rows, d_weight = ctx.saved_tensors
    _mlm_loss_scale_op(grad_loss, d_rows, d_weight)
    return (d_rows if ctx.grad_rows else None), None, (d_weight if ctx.grad_weight else None), None, None


_mlm_loss_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)
torch.library.register_autocast("fastcram::mlm_loss_fwd", "cuda", torch.bfloat16)


def _mlm_loss_flops(rows_shape, labels_shape, weight_shape, grad_rows, grad_weight, *args, **kwargs) -> int:
    """2*K*V*D for the logits, 2*K*V*D more for each gradient the forward forms."""
    (k, d), v = rows_shape, weight_shape[0]
    return 2 * k * v * d * (1 + int(grad_rows) + int(grad_weight))


register_flop_formula(torch.ops.fastcram.mlm_loss_fwd)(_mlm_loss_flops)


# ------------------------------------------------------------------------------------------------- public
def mlm_loss(rows: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the predicted `rows` [K, D] against `labels` over the tied `weight` [V, D]."""
    grad = torch.is_grad_enabled()
    loss, _, _ = _mlm_loss_fwd_op(rows, labels, weight, grad and rows.requires_grad,
                                  grad and weight.requires_grad)
    return loss
