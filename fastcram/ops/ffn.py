"""The whole bias-free FFN as one op: GELU-GLU (the recipe) or the classic GELU FFN.

    ffn(x, w_in, w_out, "geglu") = (gelu(gate) * a) @ w_out.T,  [a | gate] = x @ w_in.T
    ffn(x, w_in, w_out, "gelu")  = gelu(x @ w_in.T) @ w_out.T
x: [..., D] with any leading shape, M = number of rows (tokens). w_in: [N, D], w_out: [D, F] (nn.Linear's
[out, in] layout, so checkpoints do not depend on the backend); GLU: N = 2F, a rows first, then gate rows;
classic: N = F. Exact (erf) GELU. No dropout inside the FFN (cramming's FFN has none).

What is fused
- Forward: one Triton GEMM, x @ w_in.T, whose epilogue stores the pre-activation h [M, N] (for the
  backward) and the activation y [M, F]; the [M, N] h is never read back. For the GLU one program owns
  BLOCK_N a-columns and the matching BLOCK_N gate-columns (w_in rows n.. and F + n..), two dots on one A
  tile, so the epilogue holds both halves in registers. Then the down projection y @ w_out.T (cuBLAS).
- Backward: one Triton GEMM, dY = dOut @ w_out ([M, D] @ [D, F]), whose epilogue reads the saved h and
  writes the pre-activation gradient dh [M, N] once (GLU: da = dY * gelu(gate), dgate = dY * a *
  gelu'(gate); classic: dh = dY * gelu'(h)). dY itself never reaches memory. The weight gradients and dx
  stay cuBLAS GEMMs: dw_out = dOut^T @ y, dx = dh @ w_in, dw_in = dh^T @ x.

Loads: on sm_90 and newer the main loop reads A and B through host-side TMA tensor descriptors when the
inputs are 16-bit and every operand has a 16-byte-aligned base and row stride and a unit last stride
(`use_descriptors`), and through pointers otherwise (older GPUs, fp32, odd sizes, strided or expanded
inputs). The interpreter takes the descriptor path under the same stride rule in any dtype, so both paths
are tested on the CPU in fp32. The epilogues load and store through pointers.

Saved for backward: x, w_in, w_out, h [M, N] and y [M, F] in the compute dtype. h is saved, not recomputed
(recomputing costs one more M x D x N GEMM); y is the down projection's input, written by the forward
anyway: keeping it costs memory, not bytes, and recomputing it in the backward epilogue would write it a
second time. Autograd on the reference (and the previous two-op path) keeps the same tensors. In no-grad calls
the op writes neither (y then lives only until the down projection has read it).

Precision: fp32 accumulation; fp32, bf16 (and fp16) inputs; fp32 inputs use tl.dot(input_precision="ieee")
so the GPU does not silently use TF32. The forward epilogue rounds h to the input dtype first (the h that
is saved and that the reference's activation sees), then computes the activation in fp32 and rounds y
once; the backward epilogue keeps dY in fp32 and rounds dh once. The CPU interpreter truncates
fp32 -> bf16, so there (only) the kernels round to nearest even by hand.

Autocast: the public function casts x, w_in and w_out to the autocast dtype when autocast is on for x's
device (as F.linear does); the cast is recorded by autograd, so fp32 parameters get fp32 gradients.

Limits: x, w_in, w_out on one CUDA device (or CPU under TRITON_INTERPRET=1), one dtype. No double backward.

Bytes by construction (e = bytes per element, weights counted in the compute dtype; the dw GEMMs accumulate
in fp32 and write e bytes per element):
  forward   e * (2*M*D + N*D + M*N + 2*M*F + D*F)
            GEMM 1 reads x, w_in, writes h, y; the down projection reads y, w_out, writes out
  backward  e * (4*M*D + 4*M*N + M*F + 2*D*F + 2*N*D)
            dY GEMM reads dOut, w_out, h, writes dh; dw_out reads dOut, y; dx reads dh, w_in, writes dx;
            dw_in reads dh, x; the two weight gradients are written once each
The previous path (GEMM 1 with its epilogue, then a cuBLAS dY GEMM and a separate pointwise pass over dY
and h) moved e * 2*M*F more in the backward: dY written by its GEMM and read back by the pointwise pass.
At crammed-bert's shape (GLU, D = 768, N = 3072, F = 1536, bf16) that is 2*M*1536*2 bytes per layer:
0.2 GB per layer at M = 32768 (micro-batch 256). FLOPs: 2*M*D*(N + F) forward, twice that backward.
Bound, by arithmetic at that shape: compute. Forward 232 GFLOP (0.23 ms at a 989 TFLOP/s bf16 peak) against
0.51 GB (0.11 ms at 4.8 TB/s); backward 464 GFLOP (0.47 ms) against 1.12 GB (0.23 ms), of which the 0.2 GB
saved here is about 0.04 ms of DRAM time per layer if the epilogue's traffic does not overlap the math.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import (HAVE_TRITON, capability, interpreting, max_shared_memory, multiprocessor_count, prune, tl,
                      triton, triton_unavailable_reason)

__all__ = ["HAVE_TRITON", "KINDS", "ffn_ref", "ffn", "use_descriptors"]

KINDS = ("geglu", "gelu")  # ModelConfig.ffn's values


def ffn_ref(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, kind: str) -> torch.Tensor:
    h = F.linear(x, w_in)  # [..., N]
    if kind == "geglu":
        a, gate = h.chunk(2, dim=-1)  # w_in [2F, D]: a rows first, then gate rows
        y = F.gelu(gate) * a  # [..., F]
    elif kind == "gelu":
        y = F.gelu(h)  # [..., F]
    else:
        raise ValueError(f"ffn: kind must be one of {KINDS}, got {kind!r}")
    return F.linear(y, w_out)  # [..., D]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
# Epilogues of the one GEMM kernel: which GEMM it is and what the epilogue does with the accumulator.
FWD_GELU, FWD_GEGLU, BWD_GELU, BWD_GEGLU = 1, 2, 3, 4

if HAVE_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor

    def _set_descriptor_blocks(nargs) -> None:
        """Autotune pre-hook: a host descriptor's block is the config's tile (set before each launch)."""
        if nargs["USE_DESC"]:
            bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
            nargs["a"].block_shape = [bm, bk]
            nargs["b"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]

    def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int, persistent: bool = False, group_m: int = 8):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                              "PERSISTENT": persistent}, num_stages=stages, num_warps=warps,
                             pre_hook=_set_descriptor_blocks)

    # Autotune configs, one list per kernel, each checked to compile for sm_90a without register spills
    # (bf16, both load paths; the check's command is in bench/RESULTS.md). At D = 768 a tile has only 12
    # K-steps, so hiding the epilogue matters: some tiles are small enough for 2 CTAs per SM (one CTA's
    # epilogue overlaps the other's main loop), some persistent (one program per SM, tile and K loops
    # flattened so the epilogue overlaps the next tile's loads). For the GLU BLOCK_N is the width of one
    # half: the program multiplies 2 * BLOCK_N columns of w_in.
    FWD_GEGLU_CONFIGS = [
        _cfg(128, 64, 64, 3, 8), _cfg(128, 64, 64, 4, 8), _cfg(128, 64, 128, 3, 8),
        _cfg(128, 128, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(256, 64, 64, 3, 8),
        _cfg(128, 64, 64, 3, 8, persistent=True), _cfg(128, 64, 64, 4, 8, persistent=True),
        _cfg(128, 64, 128, 3, 8, persistent=True),
    ]
    FWD_GELU_CONFIGS = [  # one accumulator plus the erf epilogue: wider tiles spill
        _cfg(128, 128, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
        _cfg(128, 128, 64, 3, 8, persistent=True), _cfg(128, 128, 64, 4, 8, persistent=True),
    ]
    # The backward epilogue loads h ([BM, BN], twice for the GLU) and evaluates erf and exp on every element:
    # 128 x 128 tiles (and, for the GLU, 128 x 64 persistent ones on 4 warps) hit 255 registers and spill.
    BWD_GEGLU_CONFIGS = [
        _cfg(128, 64, 64, 3, 8), _cfg(128, 64, 64, 4, 8), _cfg(64, 128, 64, 4, 8), _cfg(64, 64, 64, 4, 4),
        _cfg(128, 32, 64, 4, 4), _cfg(128, 64, 64, 3, 8, persistent=True),
        _cfg(128, 64, 64, 4, 8, persistent=True), _cfg(64, 64, 64, 3, 4, persistent=True),
    ]
    BWD_GELU_CONFIGS = [
        _cfg(128, 64, 64, 3, 8), _cfg(128, 64, 64, 4, 8), _cfg(64, 128, 64, 4, 8), _cfg(64, 64, 64, 4, 4),
        _cfg(128, 64, 64, 3, 8, persistent=True), _cfg(128, 64, 64, 4, 8, persistent=True),
    ]
    FP32_CONFIG = _cfg(64, 32, 32, 3, 4)  # the exact FMA path ("ieee"): bf16-sized tiles spill there (64x64
    # spilled in the GLU forward on sm_80; this one compiles without spills for every epilogue, sm_90a and sm_80)
    # The interpreter: one config (autotuning there only costs time), tiles smaller than the test shapes so
    # edge masks and grouped ordering are exercised, persistent with 2 programs so the tile loop is too.
    INTERPRETER_CONFIG = _cfg(16, 16, 16, 1, 4, persistent=True, group_m=2)

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
    def _mma_tile(a, b, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                  TWO_B: tl.constexpr, USE_DESC: tl.constexpr, B_NK: tl.constexpr, CAST_F32: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 accumulators of one [BM, BN] tile: A[rows] @ B[:, cols] and, for the GLU forward (TWO_B),
        A[rows] @ B[:, N + cols] (the gate columns) from the same A tile. B is [K, 2N] or [K, N] as a matrix;
        with descriptors it is stored [N.., K] (B_NK: nn.Linear's weight) or [K, N]."""
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = acc
        if USE_DESC:
            # TMA: out-of-range rows, columns and K are zero-filled by the copy engine, so no masks. A GLU
            # a-tile past F reads gate rows; those output columns are masked at the store.
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                off_k = k * BLOCK_K
                a_t = a.load([off_m, off_k])  # [BM, BK]
                if CAST_F32:
                    a_t = a_t.to(tl.float32)
                if B_NK:
                    b_t = b.load([off_n, off_k])  # [BN, BK]
                    if CAST_F32:
                        b_t = b_t.to(tl.float32)
                    acc = tl.dot(a_t, b_t.T, acc, input_precision=DOT_PRECISION)
                    if TWO_B:
                        g_t = b.load([N + off_n, off_k])  # [BN, BK]: the gate rows
                        if CAST_F32:
                            g_t = g_t.to(tl.float32)
                        acc_g = tl.dot(a_t, g_t.T, acc_g, input_precision=DOT_PRECISION)
                else:
                    b_t = b.load([off_k, off_n])  # [BK, BN]
                    if CAST_F32:
                        b_t = b_t.to(tl.float32)
                    acc = tl.dot(a_t, b_t, acc, input_precision=DOT_PRECISION)
        else:
            offs_m = off_m + tl.arange(0, BLOCK_M)  # [BM]
            offs_n = off_n + tl.arange(0, BLOCK_N)  # [BN]
            offs_k = tl.arange(0, BLOCK_K)  # [BK]
            # Masks, not wrapped indices, on M and N: with M, N, K multiples of 16 the compiler still proves
            # the contiguity it needs for vectorised async copies.
            mask_m = (offs_m < M)[:, None]  # [BM, 1]
            mask_n = (offs_n < N)[None, :]  # [1, BN]
            a_ptrs = a + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
            b_ptrs = b + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # [BK, BN]
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                if EVEN_K:
                    mask_a = mask_m
                    mask_b = mask_n
                else:
                    k_left = K - k * BLOCK_K
                    mask_a = mask_m & (offs_k[None, :] < k_left)
                    mask_b = mask_n & (offs_k[:, None] < k_left)
                a_t = tl.load(a_ptrs, mask=mask_a, other=0.0)  # [BM, BK]
                b_t = tl.load(b_ptrs, mask=mask_b, other=0.0)  # [BK, BN]
                if CAST_F32:
                    a_t = a_t.to(tl.float32)
                    b_t = b_t.to(tl.float32)
                acc = tl.dot(a_t, b_t, acc, input_precision=DOT_PRECISION)
                if TWO_B:
                    g_t = tl.load(b_ptrs + N * stride_bn, mask=mask_b, other=0.0)  # [BK, BN]: gate columns
                    if CAST_F32:
                        g_t = g_t.to(tl.float32)
                    acc_g = tl.dot(a_t, g_t, acc_g, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk
        return acc, acc_g

    @triton.jit
    def _epilogue(acc, acc_g, pid_m, pid_n, c, h, M, N, stride_cm, stride_cn, stride_hm, stride_hn,
                  EPILOGUE: tl.constexpr, SAVE_PREACT: tl.constexpr, CAST_F32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One output tile. Forward: store h (if asked) and the activation into c = y. Backward (acc = dY):
        read h, store the pre-activation gradient into c = dh. GLU halves sit N columns apart in h and dh."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]  # [BM, BN]
        rows = offs_m.to(tl.int64)[:, None]
        cols = offs_n.to(tl.int64)[None, :]
        h_ptrs = h + rows * stride_hm + cols * stride_hn  # [BM, BN]; the gate half at + N * stride_hn
        c_ptrs = c + rows * stride_cm + cols * stride_cn  # [BM, BN]
        out_dtype = c.dtype.element_ty
        if EPILOGUE == 1:  # FWD_GELU. Round h first: the activation sees the h the backward will read.
            h_t = _to_storage(acc, h.dtype.element_ty, CAST_F32)
            if SAVE_PREACT:
                tl.store(h_ptrs, h_t, mask=mask)
            out = _gelu_f32(h_t.to(tl.float32))
        elif EPILOGUE == 2:  # FWD_GEGLU
            a_h = _to_storage(acc, h.dtype.element_ty, CAST_F32)
            g_h = _to_storage(acc_g, h.dtype.element_ty, CAST_F32)
            if SAVE_PREACT:
                tl.store(h_ptrs, a_h, mask=mask)
                tl.store(h_ptrs + N * stride_hn, g_h, mask=mask)
            out = _gelu_f32(g_h.to(tl.float32)) * a_h.to(tl.float32)
        elif EPILOGUE == 3:  # BWD_GELU: acc = dY in fp32
            h_t = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            out = acc * _gelu_grad_f32(h_t)
        else:  # BWD_GEGLU
            a_h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            g_h = tl.load(h_ptrs + N * stride_hn, mask=mask, other=0.0).to(tl.float32)
            dgate = acc * a_h * _gelu_grad_f32(g_h)
            tl.store(c_ptrs + N * stride_cn, _to_storage(dgate, out_dtype, CAST_F32), mask=mask)
            out = acc * _gelu_f32(g_h)  # da
        tl.store(c_ptrs, _to_storage(out, out_dtype, CAST_F32), mask=mask)

    @triton.jit
    def _ffn_gemm_kernel(
        a, b, c, h,  # A [M, K] and B: pointers, or tensor descriptors (USE_DESC); c, h: pointers
        M, N, K,  # N: output columns of one half (F); GLU tensors have 2N columns
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn,
        EPILOGUE: tl.constexpr,  # FWD_GELU, FWD_GEGLU, BWD_GELU, BWD_GEGLU
        SAVE_PREACT: tl.constexpr,  # forward: write h
        USE_DESC: tl.constexpr,
        B_NK: tl.constexpr,  # B's descriptor is [N, K] (w_in as stored), else [K, N] (w_out as stored)
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
                acc, acc_g = _mma_tile(a, b, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                       EPILOGUE == 2, USE_DESC, B_NK, CAST_F32, DOT_PRECISION, EVEN_K,
                                       BLOCK_M, BLOCK_N, BLOCK_K)
                tile_out += step
                pid_m, pid_n = _tile_coords(tile_out, num_m, num_n, GROUP_M)
                _epilogue(acc, acc_g, pid_m, pid_n, c, h, M, N, stride_cm, stride_cn, stride_hm, stride_hn,
                          EPILOGUE, SAVE_PREACT, CAST_F32, BLOCK_M, BLOCK_N)
        else:
            pid_m, pid_n = _tile_coords(tl.program_id(0), num_m, num_n, GROUP_M)
            acc, acc_g = _mma_tile(a, b, pid_m, pid_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                   EPILOGUE == 2, USE_DESC, B_NK, CAST_F32, DOT_PRECISION, EVEN_K,
                                   BLOCK_M, BLOCK_N, BLOCK_K)
            _epilogue(acc, acc_g, pid_m, pid_n, c, h, M, N, stride_cm, stride_cn, stride_hm, stride_hn,
                      EPILOGUE, SAVE_PREACT, CAST_F32, BLOCK_M, BLOCK_N)

    def _even_k(args) -> bool:
        return args["K"] % args["BLOCK_K"] == 0

    def _smem_bytes(config: "triton.Config", elt: int, glu_fwd: bool, capability: tuple[int, int]) -> int:
        """Shared memory a config needs, as Triton 3.9 allocates it (read off compiled cubins for sm_90a and
        sm_80, within 1 KB): the pipeline's buffers of the A tile and the B tile(s), num_stages of them on
        sm_90 and num_stages - 1 before, plus one output tile of staging in the persistent loop."""
        kw = config.kwargs
        tiles = kw["BLOCK_M"] * kw["BLOCK_K"] + (2 if glu_fwd else 1) * kw["BLOCK_K"] * kw["BLOCK_N"]
        buffers = config.num_stages if capability >= (9, 0) else config.num_stages - 1
        staging = kw["BLOCK_M"] * kw["BLOCK_N"] if kw["PERSISTENT"] else 0
        return (buffers * tiles + staging) * elt + 1024

    def _acc_per_thread(config: "triton.Config", glu_fwd: bool) -> int:
        kw = config.kwargs
        return kw["BLOCK_M"] * kw["BLOCK_N"] * (2 if glu_fwd else 1) // (32 * config.num_warps)

    def prune_configs(configs: list, capability: tuple[int, int], smem_limit: int, dtype: torch.dtype,
                      glu_fwd: bool) -> list:
        """The configs worth trying on one GPU. fp32 inputs: one small tile. Before sm_90 (mma.sync keeps both
        operands in registers) tiles with more than 64 fp32 accumulators per thread spill (the GLU's
        128 x 2*128 and 256 x 2*64 on sm_80); and a pipeline that needs more shared memory than the GPU
        gives a block cannot launch (none of today's lists on sm_80's 163 KB; some on GPUs with 99 KB)."""
        if dtype == torch.float32:
            return [FP32_CONFIG]
        elt = torch.empty((), dtype=dtype).element_size()
        kept = [cfg for cfg in configs if _smem_bytes(cfg, elt, glu_fwd, capability) <= smem_limit
                and (capability >= (9, 0) or _acc_per_thread(cfg, glu_fwd) <= 64)]
        return kept or [min(configs, key=lambda cfg: _smem_bytes(cfg, elt, glu_fwd, capability))]

    def _prune(configs, named_args, **kwargs):
        c = named_args["c"]
        if interpreting() or c.device.type not in ("cuda", "meta"):
            return configs
        if c.dtype == torch.float32:
            return [FP32_CONFIG]  # a choice, not a limit: one exact-FMA tile for the (test-only) fp32 inputs
        kept = prune_configs(configs, capability(c.device), max_shared_memory(c.device), c.dtype,
                             kwargs["EPILOGUE"] == FWD_GEGLU)
        return prune(configs, kept, "_ffn_gemm_kernel", c.device, kwargs)  # the GPU's limits: noted for the report

    _even_k_heuristic = triton.heuristics({"EVEN_K": _even_k})(_ffn_gemm_kernel)
    # + tensor dtypes (the autotuner adds those of pointer arguments: c and h)
    _AUTOTUNE_KEY = ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "USE_DESC",
                     "SAVE_PREACT"]

    def _autotuned(configs: list):
        return triton.autotune(configs=[INTERPRETER_CONFIG] if interpreting() else configs, key=_AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune})(_even_k_heuristic)

    _KERNELS = {
        FWD_GEGLU: _autotuned(FWD_GEGLU_CONFIGS), FWD_GELU: _autotuned(FWD_GELU_CONFIGS),
        BWD_GEGLU: _autotuned(BWD_GEGLU_CONFIGS), BWD_GELU: _autotuned(BWD_GELU_CONFIGS),
    }


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _alloc(shape, like: torch.Tensor) -> torch.Tensor:
    """Every kernel output is allocated here (tests swap it for a NaN-filled allocation)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _glu(kind: str) -> bool:
    if kind not in KINDS:
        raise ValueError(f"ffn: kind must be one of {KINDS} (ModelConfig.ffn), got {kind!r}")
    return kind == "geglu"


def _check(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, glu: bool) -> None:
    if w_in.dim() != 2 or w_out.dim() != 2:
        raise ValueError(f"ffn: w_in and w_out must be 2-D, got shapes {tuple(w_in.shape)} and "
                         f"{tuple(w_out.shape)}")
    d = w_in.shape[1]
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"ffn: x's last dimension {tuple(x.shape)[-1:]} must equal w_in.shape[1] = {d}")
    n_in = 2 * w_out.shape[1] if glu else w_out.shape[1]
    if w_out.shape[0] != d or w_in.shape[0] != n_in:
        kind = "geglu: w_in [2F, D], w_out [D, F]" if glu else "gelu: w_in [F, D], w_out [D, F]"
        raise ValueError(f"ffn ({kind}): got w_in {tuple(w_in.shape)} and w_out {tuple(w_out.shape)}")
    if x.dtype not in _DTYPES or not x.dtype == w_in.dtype == w_out.dtype:
        raise ValueError(f"ffn: x, w_in and w_out must share a dtype in {_DTYPES} (or run under autocast), "
                         f"got {x.dtype}, {w_in.dtype} and {w_out.dtype}")
    if not x.device == w_in.device == w_out.device:
        raise ValueError(f"ffn: x, w_in and w_out must be on one device, got {x.device}, {w_in.device} and "
                         f"{w_out.device}")
    _check_device(x)


def _check_device(t: torch.Tensor) -> None:
    why = triton_unavailable_reason(t.device.type)
    if why:
        raise ValueError(f"ffn: got a tensor on {t.device}: {why}; use the torch backend (--kernels torch)")


def _persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (2 in the interpreter, to exercise the tile loop)."""
    if device.type == "cpu":
        return 2
    return multiprocessor_count(device)


def descriptors_fit(*tensors: torch.Tensor) -> bool:
    """Whether TMA can read these 2-D tensors as they are: a 16-byte-aligned base, a unit last stride and a
    row stride that is a multiple of 16 bytes (the copy engine's rules), rows that do not overlap (an
    expanded gradient, row stride 0, takes pointers)."""
    return all(t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]
               and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def use_descriptors(capability: tuple[int, int] | None, *tensors: torch.Tensor) -> bool:
    """The load path. On a GPU: tensor descriptors on sm_90 and newer for 16-bit inputs (wgmma's operands;
    fp32 inputs take the exact FMA path, where descriptor tiles spill) when every operand fits them. In the
    interpreter (capability None): whenever they fit, any dtype, so the fp32 tests cover that path too."""
    if capability is not None and (capability < (9, 0) or any(t.element_size() != 2 for t in tensors)):
        return False
    return descriptors_fit(*tensors)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is the default and ignored for 16-bit inputs


def _launch(epilogue: int, a: torch.Tensor, b: torch.Tensor, b_nk: bool, c: torch.Tensor,
            h: torch.Tensor | None, n: int) -> None:
    """The GEMM a @ B with one of the epilogues. a: [M, K]; b as stored: [N or 2N, K] when b_nk (w_in),
    else [K, N] (w_out); c: the epilogue's output; h: the pre-activation, written (forward, when given) or
    read (backward)."""
    M, K = a.shape
    if M == 0 or n == 0:
        return
    save = h is not None
    hh = h if save else c  # an unused pointer when nothing is saved
    stride_bk, stride_bn = (b.stride(1), b.stride(0)) if b_nk else (b.stride(0), b.stride(1))
    desc = use_descriptors(None if a.device.type == "cpu" else capability(a.device), a, b)
    if desc:  # the block shapes are set per config by _set_descriptor_blocks
        a_arg = TensorDescriptor.from_tensor(a, [16, 16])
        b_arg = TensorDescriptor.from_tensor(b, [16, 16])
    else:
        a_arg, b_arg = a, b
    max_programs = _persistent_programs(a.device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(tiles, max_programs) if meta["PERSISTENT"] else tiles,)

    _KERNELS[epilogue][grid](
        a_arg, b_arg, c, hh, M, n, K,
        a.stride(0), a.stride(1), stride_bk, stride_bn, c.stride(0), c.stride(1), hh.stride(0), hh.stride(1),
        EPILOGUE=epilogue, SAVE_PREACT=save, USE_DESC=desc, B_NK=b_nk, CAST_F32=interpreting(),
        DOT_PRECISION=_dot_precision(a.dtype),
    )


def _ffn_fwd(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, glu: bool, save: bool):
    """(out [..., D], h [M, N] or empty, y [M, F] or empty)."""
    _check(x, w_in, w_out, glu)
    d, f = w_out.shape
    x2 = x.reshape(-1, x.shape[-1])  # [M, D]
    m = x2.shape[0]
    y = _alloc((m, f), x)  # [M, F]
    h = _alloc((m, w_in.shape[0]), x) if save else None  # [M, N]
    _launch(FWD_GEGLU if glu else FWD_GELU, x2, w_in, True, y, h, f)
    out = torch.mm(y, w_out.t()).view(*x.shape[:-1], d)  # [..., D]: the down projection on cuBLAS
    if not save:
        return out, x.new_empty((0,)), x.new_empty((0,))
    return out, h, y


def _preact_grad(dout: torch.Tensor, w_out: torch.Tensor, h: torch.Tensor, glu: bool) -> torch.Tensor:
    """dh [M, N] = the activation's backward applied to dY = dout @ w_out, without writing dY."""
    _check_device(dout)
    d, f = w_out.shape
    m = h.shape[0]
    dout2 = dout.reshape(m, d)  # [M, D]
    dh = _alloc((m, h.shape[1]), h)  # [M, N]
    _launch(BWD_GEGLU if glu else BWD_GELU, dout2, w_out, False, dh, h, f)
    return dh


def compile_plan(cfg, micro_batch: int) -> None:
    """Every GEMM launch of the FFN at one micro-batch, forward (with and without saving for backward) and
    backward, in bf16 (training under autocast) and fp32, for the preset's FFN kind and the other one, on
    meta tensors: for `fastcram bench compile`. The sparse last layer's FFN sees K rows instead of M."""
    from ..config import DataConfig

    rows = micro_batch * cfg.seq_len
    masked = micro_batch * DataConfig(seq_len=cfg.seq_len).masked_per_seq
    for glu in (True, False):
        f = cfg.intermediate // 2 if glu else cfg.intermediate
        for dtype in (torch.bfloat16, torch.float32):
            w_in = torch.empty(cfg.intermediate, cfg.hidden, dtype=dtype, device="meta")  # [N, D]
            w_out = torch.empty(cfg.hidden, f, dtype=dtype, device="meta")  # [D, F]
            for m in (rows, masked):
                x = torch.empty(m, cfg.hidden, dtype=dtype, device="meta")  # [M, D]
                _ffn_fwd(x, w_in, w_out, glu, save=False)
                _, h, _ = _ffn_fwd(x, w_in, w_out, glu, save=True)
                _preact_grad(torch.empty(m, cfg.hidden, dtype=dtype, device="meta"), w_out, h, glu)


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcram::ffn_fwd", mutates_args=())
def _ffn_fwd_op(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, glu: bool,
                save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ffn_fwd(x, w_in, w_out, glu, save)


@_ffn_fwd_op.register_fake
def _(x, w_in, w_out, glu, save):
    d, f = w_out.shape
    m = math.prod(x.shape[:-1])
    out = x.new_empty((*x.shape[:-1], d))
    if not save:
        return out, x.new_empty((0,)), x.new_empty((0,))
    return out, x.new_empty((m, w_in.shape[0])), x.new_empty((m, f))


@torch.library.custom_op("fastcram::ffn_preact_grad", mutates_args=())
def _preact_grad_op(dout: torch.Tensor, w_out: torch.Tensor, h: torch.Tensor, glu: bool) -> torch.Tensor:
    return _preact_grad(dout, w_out, h, glu)


@_preact_grad_op.register_fake
def _(dout, w_out, h, glu):
    return h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    x, w_in, w_out, glu, save = inputs
    _, h, y = output
    ctx.mark_non_differentiable(h, y)  # saved buffers, not results
    ctx.save_for_backward(x, w_in, w_out, h, y)
    ctx.glu = glu
    ctx.save = save


def _backward(ctx, dout: torch.Tensor, _dh_unused, _dy_unused):
    x, w_in, w_out, h, y = ctx.saved_tensors
    if not ctx.save:
        raise RuntimeError("ffn: backward needs the saved pre-activation; call the op with save=True (the "
                           "public ffn does so whenever a gradient is needed)")
    need_x, need_in, need_out = ctx.needs_input_grad[:3]
    dout2 = dout.reshape(-1, dout.shape[-1])  # [M, D]
    dx = dw_in = dw_out = None
    if need_out:
        dw_out = torch.mm(dout2.t(), y)  # [D, M] @ [M, F] -> [D, F]
    if need_x or need_in:
        dh = torch.ops.fastcram.ffn_preact_grad(dout2, w_out, h, ctx.glu)  # [M, N]
        if need_x:
            dx = torch.mm(dh, w_in).view(x.shape)  # [M, N] @ [N, D] -> [..., D]
        if need_in:
            dw_in = torch.mm(dh.t(), x.reshape(-1, x.shape[-1]))  # [N, M] @ [M, D] -> [N, D]
    return dx, dw_in, dw_out, None, None


_ffn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------
def ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, kind: str) -> torch.Tensor:
    """The FFN of `kind` ("geglu" | "gelu"). x: [..., D], w_in: [N, D], w_out: [D, F] -> [..., D]."""
    glu = _glu(kind)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # cast like F.linear: only 32/16-bit floats
        dtype = torch.get_autocast_dtype(device_type)
        x, w_in, w_out = (t.to(dtype) if t.dtype in _DTYPES else t for t in (x, w_in, w_out))
    save = torch.is_grad_enabled() and (x.requires_grad or w_in.requires_grad or w_out.requires_grad)
    out, _, _ = torch.ops.fastcram.ffn_fwd(x, w_in, w_out, glu, save)
    return out
