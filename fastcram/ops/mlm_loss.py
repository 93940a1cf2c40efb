"""Sparse-prediction MLM loss: project the predicted rows onto the tied embedding, cross-entropy.

Public: `mlm_loss(rows [K, D], labels [K], weight [V, D]) -> 0-d fp32 loss`, the mean over the K predicted
rows (gathered by the model) of `logsumexp(z_k) - z_k[label_k]` with `z_k = weight @ rows[k]`. Gradients go
to `rows` and to `weight` (accumulated in fp32, returned in weight's dtype).

The kernels below still take all hidden states plus `positions` and gather by pointer (the design before the
model gathered the rows itself); the public function passes positions = arange(K). Internally, repeated
positions are HANDLED: their gradients add up, through an index_add.

What is fused
- Forward (`_fwd_kernel`): gathers the K rows by pointer (no [K, D] copy), tiles rows x vocabulary
  (BLOCK_K x BLOCK_V, reduction over D in BLOCK_D steps with tl.dot, fp32 accumulation) and keeps an online
  softmax (running max and sum, fp32) per row plus the label's logit. Logits exist only tile by tile.
  The vocabulary is split over NUM_SPLITS programs per row block so that small K still fills the GPU; a
  tiny `_combine_kernel` merges the (max, sum, label logit) partials into the per-row logsumexp.
- Saved for backward: the inputs (no copies) and the per-row logsumexp `lse` [K] fp32. Nothing of size V*K.
  The loss is row_loss.sum() / n_valid with n_valid = K unless labels are ignored (see Limits).
- Backward: SECOND PASS THAT RECOMPUTES the logit tiles from `lse`, one vocabulary chunk (Vc columns,
  about V/8) at a time: `_dlogits_kernel` writes dl = (softmax - onehot) * grad / K for the chunk
  ([K, Vc], compute dtype); `_drows_kernel` (tiled over K x D, loops over the chunk's V) accumulates
  d_rows += dl @ W[chunk] in an fp32 [K, D] buffer; `_dweight_kernel` (tiled over Vc x D, loops over all
  K rows, gathering them by position) writes d_weight[chunk] = dl^T @ rows once, fp32 accumulation, stored
  in weight's dtype. No atomics: every output tile has one writer; chunks follow each other in stream order.
  d_hidden = zeros.index_add_(positions, d_rows), so repeated positions accumulate.

Why recompute and not the same pass: the softmax of a row needs its whole-vocabulary logsumexp before any
gradient element is known, so a single sweep would have to keep the logits ([K, V] bf16 = 1/2 of the fp32
logits, over the memory goal). And folding d_rows / d_weight into the logit sweep needs a [BLOCK, D] fp32
accumulator per program (128 x 768 x 4 B = 384 KiB, more than a 256 KiB register file), or atomics into
d_weight. So the gradient GEMMs read a materialised dl chunk instead.

Cost (K predicted rows, V vocabulary, D hidden, N tokens; e = bytes per element; Vc = chunk width):
- forward  2*K*V*D FLOPs; bytes ~ (K + V)*D*e from HBM (W tiles are shared through L2) + 12*S*K partials.
- backward 6*K*V*D FLOPs (2 recompute + 2 d_rows + 2 d_weight); dl: K*V*e written + 2*K*V*e read;
  fp32 d_rows read-modify-write 8*K*D per chunk; outputs N*D*e + V*D*e (+ the zero fill of d_hidden).
- Total 8*K*V*D FLOPs vs 6*K*V*D for the reference, which instead moves ~12*K*V bytes of logits.
  K=16384, D=768, V=32768, bf16: 3.3 TFLOP (reference 2.5 TFLOP + ~6.4 GB of logits traffic); here
  ~3.2 GB of dl traffic + 0.8 GB of d_rows updates. The op is compute bound.
- Peak extra memory: the dl chunk K*Vc*e (~K*V/4 bytes in bf16 = 1/16 of the fp32 logits) + the fp32
  d_rows buffer K*D*4 + d_rows in the output dtype + the outputs; at K=16384: 128 + 48 + 24 MiB + outputs
  (d_hidden 96 MiB at N=4K, d_weight 48 MiB), under the 512 MiB = 1/4 of the fp32 logits. The reference
  holds >= 4*K*V bytes (bf16 logits and their gradient): 2 GiB.

Limits
- hidden [N, D] and weight [V, D] share one dtype, fp32 or bf16 (fp16 is refused: dl = p / K underflows).
- positions and labels are int32/int64 [K], K >= 1 (static: the launch never reads their values on the
  host). Labels equal to -100 are ignored exactly like F.cross_entropy's default ignore_index (no loss, no
  gradient, excluded from the mean; the count stays on the device). Any other label outside [0, V) is NOT
  checked on the GPU (a check would need a host sync): that row's label logit counts as 0, so it adds its
  logsumexp to the loss and its plain softmax to the gradient. Positions outside [0, N) are undefined
  behaviour on the GPU. On CPU (the interpreter) both are checked and raise ValueError.
- Autocast: registered for "cuda" with torch.library.register_autocast, casting hidden and weight to bf16,
  which is what F.linear in the reference does under autocast(bfloat16); the weight gradient then comes
  back in bf16 and autograd casts it to the fp32 parameter's dtype, as for the reference.
- fp32 inputs use input_precision="ieee" in tl.dot (exact fp32, for the 1e-5 tests); bf16 uses tensor cores.
"""
import functools

import torch
import torch.nn.functional as F

from fastcram.ops._triton import HAVE_TRITON, interpreting, tl, triton, triton_unavailable_reason

__all__ = ["HAVE_TRITON", "IGNORE_INDEX", "mlm_loss_ref", "mlm_loss"]

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index, honoured by both backends


def mlm_loss_ref(rows: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(rows, weight)  # [K, V]
    return F.cross_entropy(logits.float(), labels, reduction="mean")


# ------------------------------------------------------------------------------------------------ kernels
if HAVE_TRITON:

    def _configs(gpu: list, interp: dict) -> list:
        """Autotune candidates; exactly one (small tiles) in the CPU interpreter."""
        if interpreting():
            return [triton.Config(interp, num_warps=1, num_stages=1)]
        return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu]

    _LOGIT_CONFIGS = _configs(
        [({"BLOCK_K": 128, "BLOCK_V": 128, "BLOCK_D": 64}, 8, 3),
         ({"BLOCK_K": 128, "BLOCK_V": 256, "BLOCK_D": 64}, 8, 3),
         ({"BLOCK_K": 64, "BLOCK_V": 128, "BLOCK_D": 64}, 4, 4),
         ({"BLOCK_K": 128, "BLOCK_V": 128, "BLOCK_D": 32}, 4, 4)],
        {"BLOCK_K": 16, "BLOCK_V": 128, "BLOCK_D": 16})
    _DROWS_CONFIGS = _configs(
        [({"BLOCK_K": 128, "BLOCK_D": 128, "BLOCK_V": 64}, 8, 3),
         ({"BLOCK_K": 128, "BLOCK_D": 256, "BLOCK_V": 64}, 8, 3),
         ({"BLOCK_K": 128, "BLOCK_D": 64, "BLOCK_V": 64}, 4, 4),
         ({"BLOCK_K": 64, "BLOCK_D": 128, "BLOCK_V": 64}, 4, 4)],
        {"BLOCK_K": 16, "BLOCK_D": 16, "BLOCK_V": 128})
    _DWEIGHT_CONFIGS = _configs(
        [({"BLOCK_V": 128, "BLOCK_D": 128, "BLOCK_K": 64}, 8, 3),
         ({"BLOCK_V": 128, "BLOCK_D": 256, "BLOCK_K": 64}, 8, 3),
         ({"BLOCK_V": 128, "BLOCK_D": 64, "BLOCK_K": 64}, 4, 4),
         ({"BLOCK_V": 64, "BLOCK_D": 128, "BLOCK_K": 64}, 4, 4)],
        {"BLOCK_V": 128, "BLOCK_D": 16, "BLOCK_K": 16})

    @triton.jit
    def _logits_tile(h_ptr, row_off, k_mask, w_ptr, v, v_mask, D, stride_w,
                     BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PREC: tl.constexpr):
        """z[BLOCK_K, BLOCK_V] = rows @ W[v]^T in fp32; rows addressed by row_off (gathered)."""
        z = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
        w_off = v.to(tl.int64) * stride_w  # [BLOCK_V]
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            a = tl.load(h_ptr + row_off[:, None] + d[None, :],
                        mask=k_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_D]
            b = tl.load(w_ptr + w_off[None, :] + d[:, None],
                        mask=d_mask[:, None] & v_mask[None, :], other=0.0)  # [BLOCK_D, BLOCK_V]
            z = tl.dot(a, b, z, input_precision=DOT_PREC)
        return z

    @triton.autotune(configs=_LOGIT_CONFIGS, key=["K", "V", "D"])
    @triton.jit
    def _fwd_kernel(h_ptr, pos_ptr, lab_ptr, w_ptr, m_ptr, s_ptr, t_ptr,
                    K, V, D, stride_h, stride_w, NUM_SPLITS,
                    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PREC: tl.constexpr):
        """Per (row block, vocabulary split): running max m, sum s of exp(z - m), label logit t."""
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        pos = tl.load(pos_ptr + k, mask=k_mask, other=0).to(tl.int64)
        lab = tl.load(lab_ptr + k, mask=k_mask, other=-1)
        row_off = pos * stride_h  # [BLOCK_K]
        tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), NUM_SPLITS)
        v_begin = pid_s * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
        m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_K,), tl.float32)
        t = tl.zeros((BLOCK_K,), tl.float32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            v_mask = v < v_end
            z = _logits_tile(h_ptr, row_off, k_mask, w_ptr, v, v_mask, D, stride_w,
                             BLOCK_K, BLOCK_V, BLOCK_D, DOT_PREC)
            z = tl.where(v_mask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a valid column
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
            t += tl.sum(tl.where(v[None, :] == lab[:, None], z, 0.0), axis=1)
        out = pid_s * K + k
        tl.store(m_ptr + out, m, mask=k_mask)  # -inf, s = 0 for an empty split
        tl.store(s_ptr + out, s, mask=k_mask)
        tl.store(t_ptr + out, t, mask=k_mask)

    @triton.jit
    def _combine_kernel(m_ptr, s_ptr, t_ptr, lab_ptr, lse_ptr, loss_ptr, K, NUM_SPLITS,
                        IGNORE: tl.constexpr, BLOCK: tl.constexpr):
        """Merge the split partials: lse = m + log(s); row loss = lse - label logit (0 if ignored)."""
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        k_mask = k < K
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        t = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, NUM_SPLITS):
            m_i = tl.load(m_ptr + i * K + k, mask=k_mask, other=float("-inf"))
            s_i = tl.load(s_ptr + i * K + k, mask=k_mask, other=0.0)
            m_new = tl.maximum(m, m_i)
            # an empty split (or the start) has m = -inf; a finite reference avoids -inf - -inf = nan
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + s_i * tl.exp(m_i - m_ref)
            m = m_new
            t += tl.load(t_ptr + i * K + k, mask=k_mask, other=0.0)
        lse = m + tl.log(tl.where(k_mask, s, 1.0))  # padding lanes have s = 0
        lab = tl.load(lab_ptr + k, mask=k_mask, other=IGNORE)
        tl.store(lse_ptr + k, lse, mask=k_mask)
        tl.store(loss_ptr + k, tl.where(lab != IGNORE, lse - t, 0.0), mask=k_mask)

    @triton.autotune(configs=_LOGIT_CONFIGS, key=["K", "V", "D", "v_count"])
    @triton.jit
    def _dlogits_kernel(h_ptr, pos_ptr, lab_ptr, w_ptr, lse_ptr, scale_ptr, dl_ptr,
                        K, V, D, v_begin, v_count, stride_h, stride_w, stride_dl,
                        IGNORE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
        """dl[k, j] = (exp(z - lse) - [v == label]) * grad / n_valid for columns v = v_begin + j."""
        pid_k = tl.program_id(0)
        pid_v = tl.program_id(1)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        pos = tl.load(pos_ptr + k, mask=k_mask, other=0).to(tl.int64)
        lab = tl.load(lab_ptr + k, mask=k_mask, other=IGNORE)
        j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
        j_mask = j < v_count
        v = v_begin + j
        z = _logits_tile(h_ptr, pos * stride_h, k_mask, w_ptr, v, j_mask, D, stride_w,
                         BLOCK_K, BLOCK_V, BLOCK_D, DOT_PREC)
        lse = tl.load(lse_ptr + k, mask=k_mask, other=0.0)
        scale = tl.load(scale_ptr)  # grad_output / n_valid, a device scalar: no host sync
        p = tl.exp(z - lse[:, None])  # [BLOCK_K, BLOCK_V]
        g = (p - tl.where(v[None, :] == lab[:, None], 1.0, 0.0)) * scale
        g = tl.where((lab != IGNORE)[:, None], g, 0.0)
        ptrs = dl_ptr + k.to(tl.int64)[:, None] * stride_dl + j[None, :]
        tl.store(ptrs, g.to(dl_ptr.dtype.element_ty), mask=k_mask[:, None] & j_mask[None, :])

    @triton.autotune(configs=_DROWS_CONFIGS, key=["K", "D", "v_count"], restore_value=["acc_ptr"])
    @triton.jit
    def _drows_kernel(dl_ptr, w_ptr, acc_ptr, out_ptr, K, D, v_begin, v_count, stride_dl, stride_w,
                      ACCUMULATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_V: tl.constexpr, DOT_PREC: tl.constexpr):
        """out[K, D] = (acc if ACCUMULATE else 0) + dl[K, v_count] @ W[v_begin:v_begin+v_count]."""
        pid = tl.program_id(0)
        n_d = tl.cdiv(D, BLOCK_D)
        pid_k = pid // n_d  # D fastest: neighbours share the dl panel in L2
        pid_d = pid % n_d
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        k64 = k.to(tl.int64)
        tile = k64[:, None] * D + d[None, :]  # acc and out are contiguous [K, D]
        tile_mask = k_mask[:, None] & d_mask[None, :]
        if ACCUMULATE:
            acc = tl.load(acc_ptr + tile, mask=tile_mask, other=0.0)
        else:
            acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        for j0 in range(0, v_count, BLOCK_V):
            j = j0 + tl.arange(0, BLOCK_V)
            j_mask = j < v_count
            a = tl.load(dl_ptr + k64[:, None] * stride_dl + j[None, :],
                        mask=k_mask[:, None] & j_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_V]
            b = tl.load(w_ptr + (v_begin + j).to(tl.int64)[:, None] * stride_w + d[None, :],
                        mask=j_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_V, BLOCK_D]
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)

    @triton.autotune(configs=_DWEIGHT_CONFIGS, key=["K", "D", "v_count"])
    @triton.jit
    def _dweight_kernel(dl_ptr, h_ptr, pos_ptr, dw_ptr, K, D, v_begin, v_count, stride_dl, stride_h,
                        stride_dw, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PREC: tl.constexpr):
        """dw[v_begin + j, :] = sum_k dl[k, j] * hidden[positions[k], :] (fp32 accumulation)."""
        pid = tl.program_id(0)
        n_d = tl.cdiv(D, BLOCK_D)
        pid_v = pid // n_d  # D fastest: neighbours share the dl^T panel in L2
        pid_d = pid % n_d
        j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        j_mask = j < v_count
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            pos = tl.load(pos_ptr + k, mask=k_mask, other=0).to(tl.int64)
            a = tl.load(dl_ptr + k.to(tl.int64)[None, :] * stride_dl + j[:, None],
                        mask=j_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_V, BLOCK_K]
            b = tl.load(h_ptr + pos[:, None] * stride_h + d[None, :],
                        mask=k_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_D]
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        ptrs = dw_ptr + (v_begin + j).to(tl.int64)[:, None] * stride_dw + d[None, :]
        tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=j_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------- launchers
_DTYPES = (torch.float32, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_V_CHUNKS = 8  # backward vocabulary chunks: the dl buffer is ~K*V/8 elements


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel-written buffer (tests swap it for NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(hidden, positions, labels, weight) -> None:
    why = triton_unavailable_reason(hidden.device.type)
    if why is not None:
        raise ValueError(f"mlm_loss (fastcram/ops/mlm_loss.py): {why}; or use --kernels torch")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"mlm_loss: hidden must be [N, D] and weight [V, D]; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)} (flatten the batch before the call)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"mlm_loss: hidden has D={hidden.shape[1]} but weight has D={weight.shape[1]}")
    if hidden.dtype != weight.dtype or hidden.dtype not in _DTYPES:
        raise ValueError(f"mlm_loss: hidden and weight must share one dtype, float32 or bfloat16; got "
                         f"{hidden.dtype} and {weight.dtype} (run under autocast or cast them)")
    if positions.dim() != 1 or labels.shape != positions.shape or positions.numel() == 0:
        raise ValueError(f"mlm_loss: positions and labels must be non-empty [K] tensors of one length; "
                         f"got {tuple(positions.shape)} and {tuple(labels.shape)}")
    if positions.dtype not in _INDEX_DTYPES or labels.dtype not in _INDEX_DTYPES:
        raise ValueError(f"mlm_loss: positions and labels must be int32 or int64; got {positions.dtype} "
                         f"and {labels.dtype}")
    devices = {t.device for t in (hidden, positions, labels, weight)}
    if len(devices) != 1:
        raise ValueError(f"mlm_loss: all inputs must be on one device; got {sorted(map(str, devices))}")
    if hidden.device.type == "cpu":
        _check_values_cpu(positions, labels, hidden.shape[0], weight.shape[0])


def _check_values_cpu(positions, labels, n_rows: int, vocab: int) -> None:
    """Debug range check, only where reading values costs no device sync (CPU / interpreter)."""
    if bool(((positions < 0) | (positions >= n_rows)).any()):
        raise ValueError(f"mlm_loss: positions must lie in [0, {n_rows}) (rows of hidden)")
    bad = ((labels < 0) | (labels >= vocab)) & (labels != IGNORE_INDEX)
    if bool(bad.any()):
        raise ValueError(f"mlm_loss: labels must lie in [0, {vocab}) or equal {IGNORE_INDEX} (ignored)")


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for bf16 operands


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(k: int, v: int, device: torch.device) -> int:
    """Vocabulary splits so that ~4 programs per SM exist even when K is small (host math only)."""
    v_tiles = triton.cdiv(v, 128)
    if device.type != "cuda":
        return min(2, v_tiles)  # the interpreter: still exercise the combine
    row_blocks = triton.cdiv(k, 128)
    return max(1, min(v_tiles, triton.cdiv(4 * _sm_count(device.index or 0), row_blocks)))


def _default_v_chunk(v: int) -> int:
    return triton.cdiv(triton.cdiv(v, _V_CHUNKS), 128) * 128  # multiple of 128: aligned dl rows


def _grid2(block_a: str, size_a: int, block_b: str, size_b: int):
    """2-D launch grid over two sizes, tiled by the autotuned block sizes."""
    return lambda meta: (triton.cdiv(size_a, meta[block_a]), triton.cdiv(size_b, meta[block_b]))


def _grid_flat(block_a: str, size_a: int, block_b: str, size_b: int):
    """The same tiles as one flat axis, b fastest (the kernel splits the program id)."""
    return lambda meta: (triton.cdiv(size_a, meta[block_a]) * triton.cdiv(size_b, meta[block_b]),)


def _forward(hidden, positions, labels, weight, num_splits: int | None = None):
    """(loss 0-d fp32, lse [K] fp32)."""
    _check_inputs(hidden, positions, labels, weight)
    hidden, weight = _row_major(hidden), _row_major(weight)
    positions, labels = positions.contiguous(), labels.contiguous()
    (k,), (v, d), dev = positions.shape, weight.shape, hidden.device
    splits = num_splits or _default_splits(k, v, dev)
    m, s, t = (_empty((splits, k), torch.float32, dev) for _ in range(3))  # [S, K] partials
    _fwd_kernel[lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), splits)](
        hidden, positions, labels, weight, m, s, t, k, v, d, hidden.stride(0), weight.stride(0), splits,
        DOT_PREC=_dot_precision(hidden.dtype))
    lse = _empty((k,), torch.float32, dev)
    row_loss = _empty((k,), torch.float32, dev)
    block = 128
    _combine_kernel[(triton.cdiv(k, block),)](m, s, t, labels, lse, row_loss, k, splits,
                                              IGNORE=IGNORE_INDEX, BLOCK=block)
    n_valid = (labels != IGNORE_INDEX).sum()  # stays on the device
    return row_loss.sum() / n_valid, lse


def _backward(grad, hidden, positions, labels, weight, lse, v_chunk: int | None = None):
    """(d_hidden [N, D] in hidden's dtype, d_weight [V, D] in weight's dtype)."""
    _check_inputs(hidden, positions, labels, weight)
    hidden, weight = _row_major(hidden), _row_major(weight)
    positions, labels, lse = positions.contiguous(), labels.contiguous(), lse.contiguous()
    (k,), (v, d), dev = positions.shape, weight.shape, hidden.device
    prec = _dot_precision(hidden.dtype)
    scale = (grad.to(torch.float32) / (labels != IGNORE_INDEX).sum()).reshape(1)  # device scalar
    vc = min(v_chunk or _default_v_chunk(v), v)
    n_chunks = triton.cdiv(v, vc)
    dl = _empty((k, vc), hidden.dtype, dev)  # one vocabulary chunk of d(loss)/d(logits)
    d_weight = _empty((v, d), weight.dtype, dev)
    d_rows = _empty((k, d), hidden.dtype, dev)  # [K, D]
    in_place = hidden.dtype == torch.float32 or n_chunks == 1
    acc = d_rows if in_place else _empty((k, d), torch.float32, dev)  # fp32 sum over chunks
    for c in range(n_chunks):  # static count: V and the chunk size are shapes
        v_begin = c * vc
        v_count = min(vc, v - v_begin)
        last = c == n_chunks - 1
        _dlogits_kernel[_grid2("BLOCK_K", k, "BLOCK_V", v_count)](
            hidden, positions, labels, weight, lse, scale, dl, k, v, d, v_begin, v_count,
            hidden.stride(0), weight.stride(0), dl.stride(0), IGNORE=IGNORE_INDEX, DOT_PREC=prec)
        _drows_kernel[_grid_flat("BLOCK_K", k, "BLOCK_D", d)](
            dl, weight, acc, d_rows if last else acc, k, d, v_begin, v_count, dl.stride(0),
            weight.stride(0), ACCUMULATE=c > 0, DOT_PREC=prec)
        _dweight_kernel[_grid_flat("BLOCK_V", v_count, "BLOCK_D", d)](
            dl, hidden, positions, d_weight, k, d, v_begin, v_count, dl.stride(0), hidden.stride(0),
            d_weight.stride(0), DOT_PREC=prec)
    d_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev)  # [N, D]
    d_hidden.index_add_(0, positions, d_rows)  # repeated positions add up
    return d_hidden, d_weight


# ------------------------------------------------------------------------------------------- registration
@torch.library.custom_op("fastcram::mlm_loss_fwd", mutates_args=())
def _mlm_loss_fwd_op(hidden: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(hidden, positions, labels, weight)


@_mlm_loss_fwd_op.register_fake
def _(hidden, positions, labels, weight):
    k = positions.shape[0]
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty((k,), dtype=torch.float32)


@torch.library.custom_op("fastcram::mlm_loss_bwd", mutates_args=())
def _mlm_loss_bwd_op(grad: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                     labels: torch.Tensor, weight: torch.Tensor,
                     lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad, hidden, positions, labels, weight, lse)


@_mlm_loss_bwd_op.register_fake
def _(grad, hidden, positions, labels, weight, lse):
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)  # contiguous, like the kernels


def _setup_context(ctx, inputs, output):
    hidden, positions, labels, weight = inputs
    ctx.save_for_backward(hidden, positions, labels, weight, output[1])


def _backward_rule(ctx, grad_loss, grad_lse):
    hidden, positions, labels, weight, lse = ctx.saved_tensors
    d_hidden, d_weight = _mlm_loss_bwd_op(grad_loss, hidden, positions, labels, weight, lse)
    return d_hidden, None, None, d_weight  # lse is internal: its gradient is ignored


_mlm_loss_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)
torch.library.register_autocast("fastcram::mlm_loss_fwd", "cuda", torch.bfloat16)


# ------------------------------------------------------------------------------------------------- public
def mlm_loss(rows: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the predicted `rows` [K, D] against `labels` over the tied `weight`."""
    positions = torch.arange(rows.shape[0], device=rows.device)  # [K]: the rows come gathered
    loss, _ = _mlm_loss_fwd_op(rows, positions, labels, weight)
    return loss
