"""What one microbenchmark case is: an op, a mode, a shape, and the providers that implement it.

Each op contributes its cases from `fastcram/benchmarks/cases_<op file>.py` through a function
`cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]`. The runner (kernels.py) times every
provider of every case side by side, against the device's measured ceilings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

MODES = ("fwd", "bwd", "fwd+bwd")


class Unavailable(Exception):
    """Raised by a provider's setup when it cannot run here; the message is the reason shown in the table."""


class Disagrees(Exception):
    """Raised by a peer's setup when its output differs from the reference on the same inputs: the row says
    so and the peer is never timed (a fast wrong answer is not a win)."""


@dataclass
class Case:
    op: str  # layer_norm | add_layer_norm | ffn | mlm_loss
    mode: str  # one of MODES
    shape: str  # human-readable, e.g. "65536x768"
    dtype: str  # "bf16" | "fp32"
    bound: str  # "memory" (compare to copy GB/s) or "compute" (compare to matmul TFLOP/s)
    bytes: int  # minimal bytes moved by the op in this mode
    flops: int  # useful FLOPs of the op in this mode
    # provider name ("triton", "torch", "torch.compile", "torch.compile-max-autotune", "cuda", "apex", ...)
    # -> setup() that builds fresh inputs (several sets, rotated so they do not sit in L2) and returns a
    #    zero-argument function to time; setup raises Unavailable(reason) when the provider cannot run.
    #    A peer's setup checks its output against the reference first (fastcram/benchmarks/peer_check.py):
    #    it raises Disagrees(why) on a mismatch, else the function it returns carries the verdict as `.check`.
    providers: dict[str, Callable[[], Callable[[], object]]] = field(default_factory=dict)


def rotating(fn: Callable, input_sets: list) -> Callable[[], object]:
    """A zero-argument callable that calls fn(*inputs) on the next input set each time."""
    state = {"i": 0}

    def call():
        args = input_sets[state["i"] % len(input_sets)]
        state["i"] += 1
        return fn(*args)

    return call
