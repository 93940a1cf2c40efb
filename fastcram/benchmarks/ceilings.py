"""The two ceilings every kernel row is compared with, measured on the device itself (not datasheet numbers):
a large device-to-device copy (GB/s, bytes read + bytes written) for memory-bound ops and a large matmul
(TFLOP/s, on random data, never zeros) for compute-bound ops.

Also the timers: `triton.testing.do_bench` (CUDA events, warm-up, median and 20/80 quantiles) on a GPU,
a median of a few `time.perf_counter` repetitions on the CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str  # "do_bench" | "cuda-events" | "perf_counter"


@dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, counting bytes read plus bytes written
    matmul_tflops: float  # square matmul on random data in `matmul_dtype`
    matmul_dtype: str
    how: str  # what was measured, for the report

    def for_bound(self, bound: str) -> tuple[float, str]:
        """The ceiling a case of this bound is compared with, and its label."""
        if bound == "compute":
            return self.matmul_tflops, f"matmul {self.matmul_dtype} {self.matmul_tflops:.1f} TFLOP/s"
        return self.copy_gbps, f"copy {self.copy_gbps:.1f} GB/s"


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending list (like numpy's default)."""
    if not sorted_values:
        raise ValueError("quantile of no values")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], min_reps: int = 3, max_reps: int = 25, budget_s: float = 0.3) -> Timing:
    """Median of a few perf_counter repetitions after one warm-up call; stops after budget_s of timed work."""
    fn()  # warm-up: first-call allocations and lazy initialisation stay out of the numbers
    times: list[float] = []
    while len(times) < min_reps or (len(times) < max_reps and sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    ms = [1e3 * quantile(times, q) for q in QUANTILES]
    return Timing(*ms, timer="perf_counter")


def _time_cuda_events(fn: Callable[[], object], warmup: int = 5, reps: int = 50) -> Timing:
    """Fallback when triton is not importable: CUDA events around each call, median and quantiles."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(*[quantile(times, q) for q in QUANTILES], timer="cuda-events")


def time_gpu(fn: Callable[[], object]) -> Timing:
    """triton.testing.do_bench: warm-up, L2 flushed between calls, CUDA events, median and 20/80 quantiles."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn)
    med, p20, p80 = do_bench(fn, quantiles=QUANTILES)
    return Timing(med, p20, p80, timer="do_bench")


def time_fn(fn: Callable[[], object], device: str) -> Timing:
    return time_gpu(fn) if device.startswith("cuda") else time_cpu(fn)


def _copy_gbps(device: str, nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=device)  # [n] fp32, random so nothing is special-cased
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


def _matmul_tflops(device: str, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)  # [n, n]
    b = torch.randn(n, n, device=device, dtype=dtype)  # [n, n]
    t = time_fn(lambda: a @ b, device)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def copy_bytes_for(device: str) -> int:
    """1 GiB on a GPU (far beyond any L2), less where free memory is short; 64 MiB on the CPU."""
    if not device.startswith("cuda"):
        return 64 << 20
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(min(1 << 30, free // 8)) // 4 * 4


def measure(device: str, dtype: torch.dtype) -> Ceilings:
    """Both ceilings on `device`; the matmul in the benchmark's dtype (bf16 on a GPU by default)."""
    gpu = device.startswith("cuda")
    nbytes = copy_bytes_for(device)
    n = 8192 if gpu else 1024
    copy = _copy_gbps(device, nbytes)
    mm = _matmul_tflops(device, n, dtype)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    if gpu:
        torch.cuda.empty_cache()
    how = f"copy of {nbytes / 2**20:.0f} MiB device-to-device; {n}x{n}x{n} {name} matmul on random data"
    return Ceilings(copy, mm, name, how)
