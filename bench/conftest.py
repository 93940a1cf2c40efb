"""`pytest bench/ --benchmark-only`: the benchmark cases and the training step through pytest-benchmark.

On the CPU the torch providers run at small cost (cases the roofline says are too large are skipped with
the reason); GPU-only providers are skipped with a reason. As in tests/conftest.py, a run without a GPU
selects the Triton interpreter before any @triton.jit module is imported, so that this folder and tests/
can be collected in one session.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def ceilings():
    """The device's copy and matmul ceilings, measured once per session (they decide the CPU size guard)."""
    from fastcram.benchmarks.ceilings import measure
    from fastcram.benchmarks.kernels import DTYPES

    return measure(DEVICE, DTYPES["bf16" if DEVICE == "cuda" else "fp32"])


@pytest.fixture(scope="session")
def synced():
    """Wraps a call so it waits for the device: pytest-benchmark reads a host clock."""
    def wrap(fn):
        if DEVICE == "cpu":
            return fn

        def call():
            out = fn()
            torch.cuda.synchronize()
            return out

        return call

    return wrap
