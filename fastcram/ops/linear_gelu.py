"""Bias-free linear + exact (erf) GELU, and linear + GELU-GLU.

    linear_gelu(x, W)  = gelu(x @ W.T)                      W: [F, D]
    linear_geglu(x, W) = gelu(gate) * a,  [a | gate] = x @ W.T   W: [2F, D], a rows first, then gate rows
x: [..., D] with any leading shape; M = number of rows (tokens). W is laid out exactly like the model's
nn.Linear parameter, so checkpoints do not depend on the backend.

What is fused
- Forward: one Triton GEMM whose epilogue applies the activation. For the GLU one program's B tile is
  BLOCK_N a-columns (W rows n..) next to the matching BLOCK_N gate-columns (W rows F + n..), multiplied in
  one wide dot; the epilogue splits the accumulator in registers and forms GELU(gate) * a there, so the
  [M, 2F] pre-activation is never read back from memory.
- Backward: one Triton pointwise kernel turns (dy, pre-activation) into the pre-activation gradient dh,
  with the GELU derivative and the GLU product rule fused in (da = dy * gelu(gate),
  dgate = dy * a * gelu'(gate)). Then dx = dh @ W and dW = dh^T @ x are plain GEMMs, either cuBLAS through
  torch ("torch", the default) or the Triton GEMM of this file ("triton"); choose with the `bwd_gemm`
  keyword. The default is unmeasured: plain GEMMs without an epilogue are cuBLAS's home ground, and dW
  (output [2F, D], reduction over M) needs split-K-like wave balancing that cuBLAS does and this kernel does
  not. Benchmark both (fastcram/benchmarks/cases_linear_gelu.py) before changing it.

What is saved for backward: x, W and the pre-activation h = x @ W.T ([M, F] or [M, 2F]) in the compute
dtype. It is saved, not recomputed: recomputing it costs one more M x D x N GEMM (+33% of the layer's
fwd+bwd FLOPs) to save M*N*2 bytes, and the compiled reference keeps exactly the same tensors (x and the
matmul output), so saving it matches torch.compile's activation memory. h is written only when a gradient
is needed (grad mode on and x or W requires grad); in no-grad calls the forward writes y only.

Precision: fp32 accumulation everywhere; fp32, bf16 (and fp16) inputs. fp32 inputs use
tl.dot(input_precision="ieee") so the GPU does not silently use TF32. The epilogue rounds h to the input
dtype first (the h that is saved, and the one the reference's activation sees), then computes the
activation in fp32 and rounds y once; dh likewise is computed in fp32 and rounded once. The CPU
interpreter truncates fp32 -> bf16, so there (only) the kernels round to nearest even by hand.

Autocast: the public functions cast x and W to the autocast dtype when autocast is on for x's device (as
F.linear does), so fp32 parameters under torch.autocast("cuda", torch.bfloat16) run the bf16 kernels; the
cast is recorded by autograd, so W's gradient comes back in fp32 just as with the reference. Outside
autocast, x and W must share a dtype.

Limits: W must be 2-D with W.shape[1] == D (and an even number of rows for the GLU); x and W on the same
CUDA device (or CPU under TRITON_INTERPRET=1). No double backward. Any sizes work; the fast path (vectorised
async copies) needs M, D and N to be multiples of 16 (row strides of x, W and h too).

Tiles: autotuned per (M, N, K, strides, dtypes) from configs that compile for sm_90 without spills: some
small enough for 2 CTAs per SM (one CTA's epilogue overlaps the other's main loop), some persistent (one
program per SM, tile and K loops flattened so the epilogue overlaps the next tile's loads). At D = 768 a
tile has only 12 K-steps, so hiding the epilogue matters. Grouped program ordering keeps W tiles in L2.

Bound (crammed shapes, M = 64k tokens, D = 768, N = 2F = 3072, bf16): forward 2*M*D*N = 309 GFLOP against
about (M*D + N*D + M*F + M*N) * 2 bytes = 0.71 GB when h is saved: compute-bound on an H100/H200 (0.31 ms
at the 989 TFLOP/s peak vs 0.15 ms of DRAM time). Unfused, the epilogue kernel reads h back and writes y
(another M*(N + F)*2 = 0.6 GB, about 0.13 ms); that round trip is what the fused forward removes.
Backward: 2 GEMMs (2 * 309 GFLOP) plus one pointwise pass over dy, h and dh (M*(F + 2N)*2 bytes = 1 GB).
"""
import functools
import math

import torch
import torch.nn.functional as F

from ._triton import HAVE_TRITON, interpreting, tl, triton

__all__ = ["HAVE_TRITON", "linear_gelu_ref", "linear_geglu_ref", "linear_gelu", "linear_geglu", "BWD_GEMMS"]

BWD_GEMMS = ("torch", "triton")  # who computes dx and dW: cuBLAS through torch, or this file's Triton GEMM


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.linear(x, weight))  # [..., F]


def linear_geglu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    a, gate = F.linear(x, weight).chunk(2, dim=-1)  # weight [2F, D]: a rows first, then gate rows
    return F.gelu(gate) * a  # [..., F]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8, persistent: bool = False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                          "PERSISTENT": persistent}, num_stages=stages, num_warps=warps)


def _configs(kind: str) -> list:
    """Autotune configs. One small config in the interpreter (tiles smaller than the test shapes, so edge
    masks and the grouped ordering are exercised; the GLU one is persistent with 2 programs, so the
    multi-tile loop is exercised too). On GPU: tiles around what suits H100/H200 at D = 768, checked to
    compile for sm_90 without register spills; some small enough for 2 CTAs per SM (one's epilogue
    overlaps the other's main loop), some persistent (the flattened loop overlaps them instead)."""
    if interpreting():
        return [_cfg(16, 16, 16, 1, 4, group_m=2, persistent=kind != "gelu")]
    if kind == "geglu":  # BLOCK_N is the width of the a-tile; the dot is twice as wide (a and gate)
        return [
            _cfg(128, 64, 64, 3, 8), _cfg(128, 64, 64, 4, 8), _cfg(128, 64, 128, 3, 8),
            _cfg(128, 128, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(256, 64, 64, 3, 8),
            _cfg(128, 64, 64, 3, 8, persistent=True), _cfg(128, 64, 64, 4, 8, persistent=True),
            _cfg(128, 64, 128, 3, 8, persistent=True),
        ]
    if kind == "gelu":  # one accumulator plus the erf epilogue: wider tiles spill
        return [
            _cfg(128, 128, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
            _cfg(128, 128, 64, 3, 8, persistent=True), _cfg(128, 128, 64, 4, 8, persistent=True),
        ]
    # the plain backward GEMMs (no epilogue)
    return [
        _cfg(128, 128, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 3, 8),
        _cfg(256, 128, 64, 3, 8), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 64, 64, 4, 4),
        _cfg(128, 128, 64, 4, 8, persistent=True),
    ]


def _even_k(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


def _prune_for_dtype(configs, named_args, **kwargs):
    """fp32 inputs take the exact FMA path ("ieee"), where the bf16 tiles spill: use one small tile."""
    if named_args["a_ptr"].dtype == torch.float32 and not interpreting():
        return [_cfg(64, 64, 32, 3, 4)]
    return configs


if HAVE_TRITON:

    @triton.jit
    def _gelu_f32(g):
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))

    @triton.jit
    def _gelu_grad_f32(g):
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * g * g)
        return cdf + g * pdf

    @triton.jit
    def _to_storage(x, dtype: tl.constexpr, CAST_F32: tl.constexpr):
        """fp32 x in `dtype`. The interpreter truncates fp32 -> bf16; round to nearest even by hand there so
        interpreter results carry the GPU's rounding error, not twice it."""
        if CAST_F32:
            if dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of output tile number `tile`; GROUP_M row-tiles walk the columns together so
        the B tiles they share stay in L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_rows
        pid_n = (tile % per_group) // group_rows
        return pid_m, pid_n

    @triton.jit
    def _b_columns(pid_n, N, ACT: tl.constexpr, BLOCK_N: tl.constexpr):
        """Columns of B (and of h) that tile pid_n covers, and which are in range. For the GLU the tile is
        2 * BLOCK_N wide: BLOCK_N a-columns, then the matching gate-columns N further on."""
        if ACT == 2:
            j = tl.arange(0, 2 * BLOCK_N)  # [2BN]
            n = pid_n * BLOCK_N + j % BLOCK_N  # output column of each
            cols = n + (j // BLOCK_N) * N
        else:
            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
            cols = n
        return cols, n < N

    @triton.jit
    def _mma_tile(a_ptr, b_ptr, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                  ACT: tl.constexpr, CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 accumulator of A[rows] @ B[:, cols] for one tile: [BM, BN], or [BM, 2BN] for the GLU, whose
        a- and gate-columns go through one wide dot (one wgmma of N = 2BN, as wide as cuBLAS's tiles)."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        cols, col_ok = _b_columns(pid_n, N, ACT, BLOCK_N)  # [W]
        # Masks, not wrapped indices, on M and N: with M, N, K multiples of 16 the compiler still proves the
        # contiguity it needs for vectorised async copies, even when M or N is the contiguous dimension
        # (dW reads dh^T).
        mask_m = (offs_m < M)[:, None]  # [BM, 1]
        mask_n = col_ok[None, :]  # [1, W]
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn  # [BK, W]
        if ACT == 2:
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                mask_a = mask_m
                mask_b = mask_n
            else:
                k_left = K - k * BLOCK_K
                mask_a = mask_m & (offs_k[None, :] < k_left)
                mask_b = mask_n & (offs_k[:, None] < k_left)
            a = tl.load(a_ptrs, mask=mask_a, other=0.0)  # [BM, BK]
            b = tl.load(b_ptrs, mask=mask_b, other=0.0)  # [BK, W]
            if CAST_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        return acc

    @triton.jit
    def _epilogue(acc, pid_m, pid_n, c_ptr, h_ptr, M, N, stride_cm, stride_cn, stride_hm, stride_hn,
                  ACT: tl.constexpr, SAVE_PREACT: tl.constexpr, CAST_F32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Store the pre-activation (if asked) and the activation of one tile."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        rows = offs_m.to(tl.int64)[:, None]
        mask_m = (offs_m < M)[:, None]
        # Round the pre-activation to the storage dtype first: the epilogue then sees the same h as the
        # backward and the reference do, and 16-bit values halve the epilogue's registers.
        h = _to_storage(acc, h_ptr.dtype.element_ty, CAST_F32)  # [BM, W]
        if SAVE_PREACT:
            cols, col_ok = _b_columns(pid_n, N, ACT, BLOCK_N)  # h's columns are B's
            h_ptrs = h_ptr + rows * stride_hm + cols.to(tl.int64)[None, :] * stride_hn  # [BM, W]
            tl.store(h_ptrs, h, mask=mask_m & col_ok[None, :])
        if ACT == 2:  # the a- and gate-halves of the tile; within a thread's registers, no data movement
            a_h, g_h = tl.split(tl.permute(tl.reshape(h, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))  # [BM, BN] each
            out = _gelu_f32(g_h.to(tl.float32)) * a_h.to(tl.float32)
        elif ACT == 1:
            out = _gelu_f32(h.to(tl.float32))
        else:
            out = acc
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        c_ptrs = c_ptr + rows * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn  # [BM, BN]
        tl.store(c_ptrs, _to_storage(out, c_ptr.dtype.element_ty, CAST_F32), mask=mask_m & (offs_n < N)[None, :])

    @triton.jit
    def _matmul_act_kernel(
        a_ptr, b_ptr, c_ptr, h_ptr,  # C[M, N] = act(A[M, K] @ B[K, N...]); h: pre-activation (optional)
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn,
        ACT: tl.constexpr,  # 0: none, 1: gelu, 2: geglu (B has 2N columns: a then gate)
        SAVE_PREACT: tl.constexpr,
        CAST_F32: tl.constexpr,  # interpreter: do the arithmetic in fp32 (its bf16 arithmetic is wrong)
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), default otherwise
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        PERSISTENT: tl.constexpr,  # fewer programs than tiles; the tile and K loops are flattened
    ):
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        if PERSISTENT:
            step = tl.num_programs(0)
            # The epilogue keeps its own tile counter: in the flattened loop the pipeliner must not see one
            # value used both before and after the K loop. Flattening lets a tile's epilogue overlap the
            # next tile's loads.
            tile_out = tl.program_id(0) - step
            for tile in tl.range(tl.program_id(0), num_m * num_n, step, flatten=True):
                pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
                acc = _mma_tile(a_ptr, b_ptr, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk,
                                stride_bn, ACT, CAST_F32, DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
                tile_out += step
                pid_m, pid_n = _tile_coords(tile_out, num_m, num_n, GROUP_M)
                _epilogue(acc, pid_m, pid_n, c_ptr, h_ptr, M, N, stride_cm, stride_cn, stride_hm,
                          stride_hn, ACT, SAVE_PREACT, CAST_F32, BLOCK_M, BLOCK_N)
        else:
            pid_m, pid_n = _tile_coords(tl.program_id(0), num_m, num_n, GROUP_M)
            acc = _mma_tile(a_ptr, b_ptr, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk,
                            stride_bn, ACT, CAST_F32, DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
            _epilogue(acc, pid_m, pid_n, c_ptr, h_ptr, M, N, stride_cm, stride_cn, stride_hm, stride_hn,
                      ACT, SAVE_PREACT, CAST_F32, BLOCK_M, BLOCK_N)

    @triton.jit
    def _preact_grad_kernel(
        dy_ptr, h_ptr, dh_ptr,  # dy: [M, F]; h, dh: [M, F] (gelu) or [M, 2F] (geglu: a then gate)
        M, F, stride_dym, stride_hm, stride_dhm,
        GLU: tl.constexpr, CAST_F32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
        mask = (offs_r < M)[:, None] & (offs_c < F)[None, :]  # [BR, BC]
        rows = offs_r.to(tl.int64)[:, None]
        cols = offs_c[None, :]
        dy = tl.load(dy_ptr + rows * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)  # [BR, BC]
        h_ptrs = h_ptr + rows * stride_hm + cols
        dh_ptrs = dh_ptr + rows * stride_dhm + cols
        if GLU:
            a = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
            da = _to_storage(dy * _gelu_f32(g), dh_ptr.dtype.element_ty, CAST_F32)
            dg = _to_storage(dy * a * _gelu_grad_f32(g), dh_ptr.dtype.element_ty, CAST_F32)
            tl.store(dh_ptrs, da, mask=mask)
            tl.store(dh_ptrs + F, dg, mask=mask)
        else:
            h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            dh = _to_storage(dy * _gelu_grad_f32(h), dh_ptr.dtype.element_ty, CAST_F32)
            tl.store(dh_ptrs, dh, mask=mask)

    _even_k_heuristic = triton.heuristics({"EVEN_K": _even_k})(_matmul_act_kernel)
    _AUTOTUNE_KEY = ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn"]  # + tensor dtypes

    def _autotuned(kind: str):
        return triton.autotune(configs=_configs(kind), key=_AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune_for_dtype})(_even_k_heuristic)

    _gelu_fwd_kernel = _autotuned("gelu")
    _geglu_fwd_kernel = _autotuned("geglu")
    _matmul_kernel = _autotuned("matmul")


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACT = {"none": 0, "gelu": 1, "geglu": 2}


def _alloc(shape, like: torch.Tensor) -> torch.Tensor:
    """Every kernel output is allocated here (tests swap it for a NaN-filled allocation)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _check_device(t: torch.Tensor, what: str) -> None:
    if not HAVE_TRITON:
        raise ValueError(f"{what}: triton is not installed; use the torch backend (--kernels torch)")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{what}: got a tensor on {t.device}; the triton kernels need CUDA (or "
                         f"TRITON_INTERPRET=1 on CPU); use the torch backend (--kernels torch)")


def _check_linear(x: torch.Tensor, weight: torch.Tensor, glu: bool) -> None:
    name = "linear_geglu" if glu else "linear_gelu"
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D [out_features, D], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: x's last dimension {tuple(x.shape)[-1:]} must equal weight.shape[1] = "
                         f"{weight.shape[1]}")
    if glu and weight.shape[0] % 2:
        raise ValueError(f"{name}: weight must have an even number of rows ([a rows | gate rows]), "
                         f"got {weight.shape[0]}")
    if x.dtype not in _DTYPES or x.dtype != weight.dtype:
        raise ValueError(f"{name}: x and weight must share a dtype in {_DTYPES} (or run under autocast), "
                         f"got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name}: x is on {x.device} but weight is on {weight.device}")
    _check_device(x, name)


@functools.lru_cache(maxsize=None)
def _persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (2 in the interpreter, to exercise the tile loop)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is the default and ignored for 16-bit inputs


def _launch_matmul_act(kernel, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h: torch.Tensor | None,
                       act: str) -> None:
    """c = act(a @ b) with a [M, K], b [K, N] (or [K, 2N] for geglu), any strides; h gets a @ b if given."""
    M, K = a.shape
    N = c.shape[1]
    if M == 0 or N == 0:
        return
    save = h is not None
    hh = h if save else c  # unused pointer when nothing is saved
    max_programs = _persistent_programs(a.device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, max_programs) if meta["PERSISTENT"] else tiles,)

    kernel[grid](
        a, b, c, hh, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), hh.stride(0), hh.stride(1),
        ACT=_ACT[act], SAVE_PREACT=save, CAST_F32=interpreting(), DOT_PRECISION=_dot_precision(a.dtype),
    )


def _linear_act_fwd(x: torch.Tensor, weight: torch.Tensor, glu: bool, save_preact: bool):
    """y = act(x @ weight.T) as [..., F]; h = x @ weight.T as [M, N] when save_preact, else empty."""
    _check_linear(x, weight, glu)
    n_out = weight.shape[0]  # N: GEMM columns (2F for the GLU)
    f_out = n_out // 2 if glu else n_out
    x2 = x.reshape(-1, x.shape[-1])  # [M, D]
    y = _alloc((*x.shape[:-1], f_out), x)  # [..., F]
    h = _alloc((x2.shape[0], n_out), x) if save_preact else _alloc((0,), x)  # [M, N] or empty
    kernel = _geglu_fwd_kernel if glu else _gelu_fwd_kernel
    _launch_matmul_act(kernel, x2, weight.t(), y.view(-1, f_out), h if save_preact else None,
                       "geglu" if glu else "gelu")
    return y, h


def _preact_grad(dy: torch.Tensor, h: torch.Tensor, glu: bool) -> torch.Tensor:
    """dh [M, N] from dy [..., F] and the saved pre-activation h [M, N]."""
    _check_device(dy, "linear_gelu backward")
    M, N = h.shape
    f_out = N // 2 if glu else N
    dy2 = dy.reshape(M, f_out)  # [M, F]
    if dy2.stride(1) != 1:
        dy2 = dy2.contiguous()
    h = h if h.stride(1) == 1 else h.contiguous()
    dh = _alloc((M, N), h)  # [M, N]
    if M == 0 or f_out == 0:
        return dh
    block_c = 16 if interpreting() else min(256, triton.next_power_of_2(f_out))
    block_r = 8 if interpreting() else max(1, 2048 // block_c)
    grid = (triton.cdiv(M, block_r), triton.cdiv(f_out, block_c))
    _preact_grad_kernel[grid](dy2, h, dh, M, f_out, dy2.stride(0), h.stride(0), dh.stride(0),
                              GLU=glu, CAST_F32=interpreting(), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return dh


def _triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N] in a's dtype, fp32 accumulation, any strides."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"linear_gelu matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    if a.dtype != b.dtype or a.dtype not in _DTYPES:
        raise ValueError(f"linear_gelu matmul: dtypes {a.dtype} and {b.dtype} must match and be in {_DTYPES}")
    _check_device(a, "linear_gelu matmul")
    c = _alloc((a.shape[0], b.shape[1]), a)  # [M, N]
    _launch_matmul_act(_matmul_kernel, a, b, c, None, "none")
    return c


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------
def _fake_fwd(x: torch.Tensor, weight: torch.Tensor, glu: bool, save_preact: bool):
    n_out = weight.shape[0]
    f_out = n_out // 2 if glu else n_out
    m = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], f_out))
    h = x.new_empty((m, n_out)) if save_preact else x.new_empty((0,))
    return y, h


@torch.library.custom_op("fastcram::linear_gelu_fwd", mutates_args=())
def _linear_gelu_fwd_op(x: torch.Tensor, weight: torch.Tensor, save_preact: bool,
                        bwd_gemm: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_act_fwd(x, weight, False, save_preact)


@torch.library.custom_op("fastcram::linear_geglu_fwd", mutates_args=())
def _linear_geglu_fwd_op(x: torch.Tensor, weight: torch.Tensor, save_preact: bool,
                         bwd_gemm: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_act_fwd(x, weight, True, save_preact)


@_linear_gelu_fwd_op.register_fake
def _(x, weight, save_preact, bwd_gemm):
    return _fake_fwd(x, weight, False, save_preact)


@_linear_geglu_fwd_op.register_fake
def _(x, weight, save_preact, bwd_gemm):
    return _fake_fwd(x, weight, True, save_preact)


@torch.library.custom_op("fastcram::linear_gelu_preact_grad", mutates_args=())
def _preact_grad_op(dy: torch.Tensor, h: torch.Tensor, glu: bool) -> torch.Tensor:
    return _preact_grad(dy, h, glu)


@_preact_grad_op.register_fake
def _(dy, h, glu):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastcram::linear_gelu_matmul", mutates_args=())
def _matmul_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _triton_matmul(a, b)


@_matmul_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1]))


def _mm(a: torch.Tensor, b: torch.Tensor, bwd_gemm: str) -> torch.Tensor:
    if bwd_gemm == "triton":
        return torch.ops.fastcram.linear_gelu_matmul(a, b)
    return torch.mm(a, b)  # cuBLAS (fp32 accumulation for 16-bit inputs)


def _make_setup_context(glu: bool):
    def setup_context(ctx, inputs, output):
        x, weight, save_preact, bwd_gemm = inputs
        y, h = output
        ctx.mark_non_differentiable(h)  # a saved buffer, not a result
        ctx.save_for_backward(x, weight, h)
        ctx.glu = glu
        ctx.save_preact = save_preact
        ctx.bwd_gemm = bwd_gemm

    return setup_context


def _backward(ctx, dy: torch.Tensor, _dh_unused):
    x, weight, h = ctx.saved_tensors
    if not ctx.save_preact:
        raise RuntimeError("linear_gelu: backward needs the pre-activation; call the op with save_preact=True "
                           "(the public linear_gelu / linear_geglu do so whenever a gradient is needed)")
    dh = torch.ops.fastcram.linear_gelu_preact_grad(dy, h, ctx.glu)  # [M, N]
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _mm(dh, weight, ctx.bwd_gemm).view(x.shape)  # [M, N] @ [N, D] -> [..., D]
    if ctx.needs_input_grad[1]:
        x2 = x.reshape(-1, x.shape[-1])  # [M, D]
        dw = _mm(dh.t(), x2, ctx.bwd_gemm)  # [N, M] @ [M, D] -> [N, D]
    return dx, dw, None, None


_linear_gelu_fwd_op.register_autograd(_backward, setup_context=_make_setup_context(False))
_linear_geglu_fwd_op.register_autograd(_backward, setup_context=_make_setup_context(True))


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------
def _prepare(x: torch.Tensor, weight: torch.Tensor, bwd_gemm: str):
    """Autocast cast (as F.linear does) and whether the forward must save the pre-activation."""
    if bwd_gemm not in BWD_GEMMS:
        raise ValueError(f"linear_gelu: bwd_gemm must be one of {BWD_GEMMS}, got {bwd_gemm!r}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # cast like F.linear: only 32/16-bit floats
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = (t.to(dtype) if t.dtype in _DTYPES else t for t in (x, weight))
    save = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return x, weight, save


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, *, bwd_gemm: str = "torch") -> torch.Tensor:
    """gelu(x @ weight.T), exact erf GELU. x: [..., D], weight: [F, D] -> [..., F]."""
    x, weight, save = _prepare(x, weight, bwd_gemm)
    y, _ = torch.ops.fastcram.linear_gelu_fwd(x, weight, save, bwd_gemm)
    return y


def linear_geglu(x: torch.Tensor, weight: torch.Tensor, *, bwd_gemm: str = "torch") -> torch.Tensor:
    """gelu(gate) * a with [a | gate] = x @ weight.T. x: [..., D], weight: [2F, D] -> [..., F]."""
    x, weight, save = _prepare(x, weight, bwd_gemm)
    y, _ = torch.ops.fastcram.linear_geglu_fwd(x, weight, save, bwd_gemm)
    return y
