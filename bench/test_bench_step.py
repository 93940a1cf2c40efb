"""One training step of the tiny preset through pytest-benchmark (the `fastcram bench step` variants).

The torch variant runs everywhere; the triton variant needs a GPU (the CPU interpreter is for tests, not
timing); the Hugging Face variant needs transformers; the liger variant (Liger-Kernel in fastcram) a GPU and
Liger-Kernel. Compiled on a GPU, eager on the CPU.
"""
import pytest
import torch

from fastcram.benchmarks.case import Unavailable
from fastcram.benchmarks.step import StepSettings, build_variant, parse
from fastcram.config import preset

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MICRO_BATCH = 8


@pytest.mark.parametrize("backend", ["torch", "triton", "hf", "liger"])
def test_step(benchmark, backend, synced):
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("triton kernels are timed on a GPU only")
    cfg = preset("tiny").model
    s = StepSettings(preset="tiny", device=DEVICE, micro_batch=MICRO_BATCH, steps=1, warmup=1, repeats=1,
                     compile=DEVICE == "cuda", variants=(backend,))
    try:
        v = build_variant(parse([backend])[0], cfg, s)
    except Unavailable as e:
        pytest.skip(f"unavailable: {e}")
    loss = v.step()  # warm-up: compiles on a GPU
    assert torch.isfinite(loss).item()
    benchmark.group = "training step (tiny)"
    benchmark.extra_info.update(backend=backend, tokens_per_step=MICRO_BATCH * cfg.seq_len,
                                flops_per_token=v.flops_per_token)
    benchmark.pedantic(synced(v.step), rounds=5, iterations=1, warmup_rounds=1)
    torch._dynamo.reset()
