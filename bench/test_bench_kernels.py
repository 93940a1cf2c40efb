"""Every case of fastcram/benchmarks/cases_*.py through pytest-benchmark (quick shapes).

Same discovery and the same skip rules as `fastcram bench kernels`: GPU-only providers (triton, cuda, apex,
liger, quack; tests/test_peers.py checks the peers on the CPU where they run there)
are skipped on the CPU, torch.compile is skipped on the CPU unless FASTCRAM_BENCH_COMPILE=1, and on the CPU
a case whose roofline estimate exceeds CPU_CALL_LIMIT_S a call is skipped, so the folder runs in seconds.
A peer whose output check disagrees with the reference is skipped with that reason, never timed.
"""
import os

import pytest
import torch

from fastcram.benchmarks.case import Disagrees, Unavailable
from fastcram.benchmarks.kernels import (Settings, collect_cases, is_compiled, is_gpu_only, skip_after_setup,
                                         skip_before_setup)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_CALL_LIMIT_S = 0.2  # seconds a call, by the roofline estimate; keeps the CPU run at seconds
CPU_ROUNDS, GPU_ROUNDS = 3, 20
SETTINGS = Settings(device=DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32, quick=True,
                    compile=DEVICE == "cuda" or os.environ.get("FASTCRAM_BENCH_COMPILE") == "1",
                    cpu_call_limit_s=CPU_CALL_LIMIT_S)
CASES, PLACEHOLDERS = collect_cases(SETTINGS)
PARAMS = [pytest.param(c, p, id=f"{c.op}-{c.mode}-{c.shape}-{p}") for c in CASES for p in c.providers]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_kernel(benchmark, case, provider, ceilings, synced):
    if DEVICE == "cpu" and is_gpu_only(provider):
        pytest.skip(f"{provider} is GPU-only")
    if is_compiled(provider) and not SETTINGS.compile:
        pytest.skip("torch.compile is slow to build on the CPU (set FASTCRAM_BENCH_COMPILE=1 to include it)")
    why = skip_before_setup(case, provider, SETTINGS, ceilings)
    if why:
        pytest.skip(why.removeprefix("skipped: "))
    try:
        fn = case.providers[provider]()
    except Unavailable as e:
        pytest.skip(f"unavailable: {e}")
    except Disagrees as e:  # a peer whose output check failed: reported, never timed (as `bench kernels` does)
        pytest.skip(f"disagrees: {e}")
    why = skip_after_setup(case, provider, SETTINGS, ceilings)
    if why:
        pytest.skip(why.removeprefix("skipped: "))
    benchmark.group = f"{case.op} {case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape, dtype=case.dtype,
                                provider=provider, bound=case.bound, bytes=case.bytes, flops=case.flops)
    rounds = GPU_ROUNDS if DEVICE == "cuda" else CPU_ROUNDS
    benchmark.pedantic(synced(fn), rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("op,status", [(r.op, r.status) for r in PLACEHOLDERS] or [("-", "")],
                         ids=[r.op for r in PLACEHOLDERS] or ["none"])
def test_ops_without_cases(benchmark, op, status):
    """One visible skip per op whose cases file is missing or empty (nothing to time)."""
    pytest.skip(f"{op}: {status}" if status else "every op has cases")
