"""Microbenchmark cases of the sparse-prediction MLM loss (fastcram/ops/mlm_loss.py).

Shapes are crammed BERT's decoder: D=768, V=32768, K predicted rows out of N = 4*K tokens (32 of 128 per
sequence). Providers: the Triton op, the eager reference ("torch"), the compiled reference
("torch.compile"), and PyTorch's own F.linear_cross_entropy with its chunked options where the installed
torch has it. Each setup allocates only the inputs (two rotated sets, so the 48 MiB weight is not served
from L2), so the runner's peak memory is the op's own extra memory plus its outputs. The fwd+bwd mode
returns the gradients from torch.autograd.grad instead of accumulating them into .grad, so nothing
outlives a call.
"""
import inspect

import torch
import torch.nn.functional as F

from fastcram.benchmarks.case import Case, Unavailable, rotating

D, V = 768, 32768
K_FULL = (4096, 16384, 65536)
K_QUICK = (16384,)
TOKENS_PER_ROW = 4  # N = 4 * K: masking rate 0.25
N_SETS = 2
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    # CPU: a smoke-sized K, so the torch providers run in seconds (CPU figures say nothing about a GPU)
    for k in (128,) if device == "cpu" else (K_QUICK if quick else K_FULL):
        for mode in ("fwd", "fwd+bwd"):
            out.append(_case(k, mode, device, dtype))
    return out


def _case(k: int, mode: str, device: str, dtype: torch.dtype) -> Case:
    e = torch.empty((), dtype=dtype).element_size()
    n = TOKENS_PER_ROW * k
    read = (k * D + V * D) * e + 8 * k  # gathered rows, weight and labels
    grads = (k * D + V * D) * e  # d_rows and d_weight
    backward = mode == "fwd+bwd"
    providers = {
        "triton": lambda: _setup(_triton_fn(device, dtype), k, device, dtype, backward),
        "torch": lambda: _setup(_reference(), k, device, dtype, backward),
        "torch.compile": lambda: _setup(_compiled_reference(), k, device, dtype, backward),
        "linear_cross_entropy": lambda: _setup(_linear_cross_entropy(), k, device, dtype, backward),
    }
    return Case(op="mlm_loss", mode=mode, shape=f"K={k},N={n},D={D},V={V}", dtype=DTYPE_NAMES[dtype],
                bound="compute", bytes=2 * read + grads if backward else read,
                flops=(3 if backward else 1) * 2 * k * D * V, providers=providers)


def _setup(fn, k: int, device: str, dtype: torch.dtype, backward: bool):
    """Inputs only (N_SETS rotated sets) and the zero-argument call the runner times."""
    sets = []
    for _ in range(N_SETS):
        rows = torch.randn(k, D, device=device, dtype=dtype).requires_grad_(backward)  # [K, D] gathered rows
        labels = torch.randint(0, V, (k,), device=device)  # [K]
        weight = (0.02 * torch.randn(V, D, device=device, dtype=dtype)).requires_grad_(backward)  # [V, D]
        sets.append((rows, labels, weight))

    if backward:
        def call(rows, labels, weight):
            return torch.autograd.grad(fn(rows, labels, weight), (rows, weight))
    else:
        def call(rows, labels, weight):
            with torch.no_grad():
                return fn(rows, labels, weight)

    return rotating(call, sets)


def _triton_fn(device: str, dtype: torch.dtype):
    from fastcram.ops import mlm_loss as op

    if not op.HAVE_TRITON:
        raise Unavailable("triton is not installed")
    if not device.startswith("cuda"):
        raise Unavailable("needs a CUDA GPU (the CPU interpreter is far too slow at these shapes)")
    if dtype not in (torch.bfloat16, torch.float32):
        raise Unavailable(f"the kernel takes bf16 or fp32, not {dtype}")
    return op.mlm_loss


def _reference():
    from fastcram.ops.mlm_loss import mlm_loss_ref

    return mlm_loss_ref


def _compiled_reference():
    return torch.compile(_reference(), fullgraph=True, dynamic=False)


def _linear_cross_entropy():
    """F.linear_cross_entropy on the gathered rows, chunked (it never holds the whole logits)."""
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
    params = inspect.signature(fn).parameters
    if list(params)[:3] != ["input", "linear_weight", "target"]:
        raise Unavailable(f"unexpected F.linear_cross_entropy signature {list(params)}")
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None or "options" not in params:
        raise Unavailable(f"torch {torch.__version__} has no chunked linear_cross_entropy options")

    def run(rows, labels, weight):
        return fn(rows, weight, labels, options=options())

    return run
