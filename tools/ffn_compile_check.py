"""Compile every autotune config of the FFN's Triton GEMM for a GPU target on this machine (no GPU needed).

    python tools/ffn_compile_check.py [--arch 90a] [--micro-batch 256] [--kinds geglu gelu]

For each kernel (forward / backward, GLU / classic), config and load path (tensor descriptors, pointers) it
specialises the kernel exactly as a launch at crammed-bert's shape would (Triton's own binder: dtypes,
constexprs, the divisibility-by-16 and equal-to-1 specialisations of the integer arguments, 16-byte pointer
alignment, the descriptors' block shapes), compiles it with `triton.compile` for the target, and prints
registers, local (spill) bytes and shared memory (cuobjdump -res-usage on the cubin, shipped with Triton) and
whether the PTX uses wgmma, TMA (cp.async.bulk.tensor) and cp.async. Exit code 1 when a config fails to
compile or spills. It checks compiler output only: it says nothing about speed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("ffn_compile_check: unset TRITON_INTERPRET (the check compiles real GPU code)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from fastcram.ops import ffn  # noqa: E402

D_MODEL = 768
KERNELS = {  # name -> (epilogue, configs, GLU)
    "fwd_geglu": (ffn.FWD_GEGLU, ffn.FWD_GEGLU_CONFIGS, True),
    "fwd_gelu": (ffn.FWD_GELU, ffn.FWD_GELU_CONFIGS, False),
    "bwd_geglu": (ffn.BWD_GEGLU, ffn.BWD_GEGLU_CONFIGS, True),
    "bwd_gelu": (ffn.BWD_GELU, ffn.BWD_GELU_CONFIGS, False),
}


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in fields.items()}


def _operands(epilogue: int, glu: bool, m: int, desc: bool, dtype: torch.dtype):
    """Launch arguments with the real shapes' strides; the tensors are tiny (only dtype and alignment of a
    pointer matter to the specialisation), the integer arguments are the real ones."""
    f = 1536 if glu else 3072
    n_in = 2 * f if glu else f
    fwd = epilogue in (ffn.FWD_GEGLU, ffn.FWD_GELU)
    k = D_MODEL
    tiny = torch.empty(64, dtype=dtype)
    if fwd:  # a = x [M, D]; b = w_in [N, D] as stored; c = y [M, F]; h [M, N]
        a_shape, b_shape = (m, k), (n_in, k)
        stride_bk, stride_bn = 1, k
        c_stride, h_stride = (f, 1), (n_in, 1)
    else:  # a = dOut [M, D]; b = w_out [D, F]; c = dh [M, N]; h [M, N]
        a_shape, b_shape = (m, k), (k, f)
        stride_bk, stride_bn = f, 1
        c_stride, h_stride = (n_in, 1), (n_in, 1)
    if desc:
        a = TensorDescriptor(tiny, list(a_shape), [a_shape[1], 1], [16, 16])
        b = TensorDescriptor(tiny, list(b_shape), [b_shape[1], 1], [16, 16])
    else:
        a = b = tiny
    args = [a, b, tiny, tiny, m, f, k, a_shape[1], 1, stride_bk, stride_bn, *c_stride, *h_stride]
    return args, fwd


def compile_one(target: GPUTarget, name: str, cfg, m: int, desc: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    epilogue, _, glu = KERNELS[name]
    args, fwd = _operands(epilogue, glu, m, desc, dtype)
    kernel = ffn._ffn_gemm_kernel
    backend = make_backend(target)
    meta = dict(cfg.kwargs, EPILOGUE=epilogue, SAVE_PREACT=True, USE_DESC=desc, B_NK=fwd,
                CAST_F32=False, DOT_PRECISION=ffn._dot_precision(dtype), EVEN_K=D_MODEL % cfg.kwargs["BLOCK_K"] == 0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    named = dict(zip(kernel.arg_names, args))
    ffn._set_descriptor_blocks({**named, **meta})
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    seconds = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    res = _resources(compiled.asm["cubin"])
    return {"regs": res.get("REG"), "local": res.get("LOCAL", 0) + res.get("STACK", 0),
            "smem": compiled.metadata.shared, "wgmma": "wgmma.mma_async" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx, "cp.async": "cp.async.cg" in ptx or "cp.async.ca" in ptx,
            "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="90a", help="90a (Hopper, default) or 80 (Ampere)")
    p.add_argument("--micro-batch", type=int, default=256, help="sequences of 128 tokens (M = 128 x this)")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--paths", nargs="+", default=["desc", "pointer"], choices=["desc", "pointer"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                   help="bf16 (every config of each list) or fp32 (the one config fp32 inputs are given)")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cap = int(args.arch.rstrip("a"))
    target = GPUTarget("cuda", cap, 32)
    m = 128 * args.micro_batch
    print(f"triton {triton.__version__}, target sm_{args.arch}, M = {m}, D = {D_MODEL}, {args.dtype}")
    print(f"{'kernel':10} {'path':7} {'config (BM BN BK stages warps persistent)':44} {'regs':>4} {'spill':>5} "
          f"{'smem':>6} {'wgmma':>5} {'tma':>3} {'cp.async':>8} {'s':>5}")
    bad = 0
    for name in args.kernels:
        for cfg in KERNELS[name][1] if args.dtype == "bf16" else [ffn.FP32_CONFIG]:
            for path in args.paths if args.dtype == "bf16" else ["pointer"]:  # fp32 never takes descriptors
                kw = cfg.kwargs
                desc = (f"{kw['BLOCK_M']} {kw['BLOCK_N']} {kw['BLOCK_K']} {cfg.num_stages} {cfg.num_warps} "
                        f"{kw['PERSISTENT']}")
                try:
                    r = compile_one(target, name, cfg, m, path == "desc", dtype)
                except Exception as e:  # noqa: BLE001 - a config that fails is a row, not the end of the run
                    bad += 1
                    print(f"{name:10} {path:7} {desc:44} failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
                    continue
                bad += r["local"] > 0
                print(f"{name:10} {path:7} {desc:44} {r['regs']:>4} {r['local']:>5} {r['smem']:>6} "
                      f"{'yes' if r['wgmma'] else 'no':>5} {'yes' if r['tma'] else 'no':>3} "
                      f"{'yes' if r['cp.async'] else 'no':>8} {r['seconds']:>5.1f}", flush=True)
    print(f"{bad} config(s) failed or spilled" if bad else "every config compiled without spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
