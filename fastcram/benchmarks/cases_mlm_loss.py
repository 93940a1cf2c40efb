"""Microbenchmark cases of the sparse-prediction MLM loss (fastcram/ops/mlm_loss.py).

Shapes are crammed BERT's decoder: D=768, V=32768, K predicted rows (32 of 128 tokens a sequence, so
K = 8192 at micro-batch 256, the quick shape). Modes: "fwd" is evaluation (no grad: the op forms no
gradient, 2*K*V*D), "fwd+bwd" is training (6*K*V*D for every provider).

Providers, side by side:
  triton                      the op: chunked cuBLAS GEMMs + the Triton cross-entropy kernel (default chunks)
  triton(row_chunk=K/2|K/8)   the op with larger / smaller row chunks than its default K/4 (bf16), to settle
                              the default on a GPU (K/2 is the largest chunk the memory budget allows)
  triton(previous design)     the design before issue 18 (Triton GEMMs, logits recomputed in the backward,
                              8*K*V*D), fastcram/benchmarks/mlm_loss_previous.py, kept only until a GPU
                              measurement decides whether it wins anywhere
  torch, torch.compile        the reference, eager and compiled (inductor; cuBLAS for the GEMMs)
  linear_cross_entropy        PyTorch's own chunked F.linear_cross_entropy, where the installed torch has it
  liger                       peer: Liger-Kernel's fused linear cross-entropy, eager (peers.py)
  quack                       peer: QuACK's chunked linear cross-entropy (peers.py)
Every provider that counts as a peer (kernels.add_speedups: all but fastcram's triton rows) is checked against
the reference on the case's inputs (loss, and in fwd+bwd both gradients) before it is timed: torch.compile
(inductor writes its own kernels), linear_cross_entropy, liger and quack; one that disagrees is reported as
such and never timed. "torch" is the reference itself and is not checked (it would be compared with itself).
Each setup allocates only the inputs (two rotated sets, so the 48 MiB weight is not served from L2), so the
runner's peak memory is the op's own extra memory plus its outputs. The fwd+bwd mode returns the gradients
from torch.autograd.grad instead of accumulating them into .grad, so nothing outlives a call.
"""
import inspect

import torch
import torch.nn.functional as F

from fastcram.benchmarks import peers
from fastcram.benchmarks.case import Case, Unavailable, rotating

D, V = 768, 32768
K_FULL = (2048, 8192, 32768)
K_QUICK = (8192,)  # crammed-bert at micro-batch 256
TOKENS_PER_ROW = 4  # N = 4 * K tokens: masking rate 0.25
N_SETS = 2
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CHUNK_VARIANTS = {"triton(row_chunk=K/2)": 2, "triton(row_chunk=K/8)": 8}  # provider -> K / rows a chunk


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

    def setup(make_fn):
        return lambda: _setup(make_fn(), k, device, dtype, backward)

    providers = {"triton": setup(lambda: _op(device, dtype))}
    for name, parts in CHUNK_VARIANTS.items():
        providers[name] = setup(lambda parts=parts: _op(device, dtype, row_chunk=max(1, k // parts)))
    providers.update({
        "triton(previous design)": setup(lambda: _previous_design(device, dtype)),
        "torch": setup(_reference),
    })
    for name, make_fn in _peer_fns(device).items():
        providers[name] = _peer_setup(name, make_fn, k, device, dtype, backward)
    return Case(op="mlm_loss", mode=mode, shape=f"K={k},N={n},D={D},V={V}", dtype=DTYPE_NAMES[dtype],
                bound="compute", bytes=2 * read + grads if backward else read,
                flops=(3 if backward else 1) * 2 * k * D * V, providers=providers)


def _peer_fns(device: str) -> dict:
    """Peer name -> maker of fn(rows, labels, weight) -> loss; each is checked against mlm_loss_ref."""
    return {"torch.compile": _compiled_reference, "linear_cross_entropy": _linear_cross_entropy,
            "liger": lambda: peers.liger_mlm_loss(device), "quack": lambda: peers.quack_mlm_loss(device)}


def _inputs(k: int, device: str, dtype: torch.dtype, backward: bool) -> tuple:
    rows = torch.randn(k, D, device=device, dtype=dtype).requires_grad_(backward)  # [K, D] gathered rows
    labels = torch.randint(0, V, (k,), device=device)  # [K]
    weight = (0.02 * torch.randn(V, D, device=device, dtype=dtype)).requires_grad_(backward)  # [V, D]
    return rows, labels, weight


def _peer_setup(name: str, make_fn, k: int, device: str, dtype: torch.dtype, backward: bool):
    """A peer's timed call, after its loss (and gradients) matched the reference on the same inputs."""
    def setup():
        from fastcram.ops.mlm_loss import mlm_loss_ref

        fn, verdict = peers.checked(name, ("mlm_loss", k, str(dtype), device, backward), make_fn, mlm_loss_ref,
                                    lambda: list(_inputs(k, device, dtype, backward)), grad=backward)
        return peers.with_check(_setup(fn, k, device, dtype, backward), verdict)

    return setup


def _setup(fn, k: int, device: str, dtype: torch.dtype, backward: bool):
    """Inputs only (N_SETS rotated sets) and the zero-argument call the runner times."""
    sets = [_inputs(k, device, dtype, backward) for _ in range(N_SETS)]

    if backward:
        def call(rows, labels, weight):
            return torch.autograd.grad(fn(rows, labels, weight), (rows, weight))
    else:
        def call(rows, labels, weight):
            with torch.no_grad():
                return fn(rows, labels, weight)

    return rotating(call, sets)


def _gpu_triton_check(device: str, dtype: torch.dtype, have_triton: bool) -> None:
    if not have_triton:
        raise Unavailable("triton is not installed")
    if not device.startswith("cuda"):
        raise Unavailable("needs a CUDA GPU (the CPU interpreter is far too slow at these shapes)")
    if dtype not in (torch.bfloat16, torch.float32):
        raise Unavailable(f"the kernels take bf16 or fp32, not {dtype}")


def _op(device: str, dtype: torch.dtype, row_chunk: int | None = None):
    from fastcram.ops import mlm_loss as op

    _gpu_triton_check(device, dtype, op.HAVE_TRITON)
    if row_chunk is None:
        return op.mlm_loss

    def run(rows, labels, weight):  # the op's launcher with another chunk size; same backward as the op
        return _ChunkedOp.apply(rows, labels, weight, row_chunk)

    return run


class _ChunkedOp(torch.autograd.Function):
    """The op's forward launcher with a chosen row chunk (a benchmark knob, not a public option)."""

    @staticmethod
    def forward(ctx, rows, labels, weight, row_chunk):
        from fastcram.ops import mlm_loss as op

        loss, d_rows, d_weight = op._forward(rows, labels, weight, rows.requires_grad, weight.requires_grad,
                                             row_chunk=row_chunk)
        ctx.save_for_backward(d_rows, d_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        from fastcram.ops import mlm_loss as op

        d_rows, d_weight = ctx.saved_tensors
        op._scale_(grad_loss, d_rows, d_weight)
        return d_rows, None, d_weight, None


def _previous_design(device: str, dtype: torch.dtype):
    from fastcram.benchmarks import mlm_loss_previous as prev

    _gpu_triton_check(device, dtype, prev.HAVE_TRITON)
    return prev.mlm_loss_previous


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
