"""The output check a peer passes before it is timed: same inputs, the matching reference, a fair tolerance.

`check(peer, reference, make_inputs, dtype, grad)` runs the peer and the reference on one set of inputs
(the case's own shape and dtype) and compares every output and, with `grad`, the gradient of every input that
requires one, for the same random upstream gradients. The yardstick is the reference computed in higher
precision (fp64 for fp32 inputs, fp32 for bf16/fp16): the peer's largest error against it may be at most
twice PyTorch's own error in the case dtype (the reference run on the same low-precision inputs) plus a small
absolute term scaled by the tensor's magnitude (DESIGN.md, "Tests": the bf16 rule). A peer over that raises
Disagrees, and the runner reports the row as disagreeing instead of timing it. Verdicts are remembered per
key, so the three modes of one shape check once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .case import Disagrees

ATOL = {torch.float32: 1e-5, torch.float64: 1e-7}  # relative to the tensor's largest magnitude
ATOL_LOW = 2e-3  # bf16 / fp16: a small absolute term, relative to the magnitude (bf16's step is 2^-8)
_VERDICTS: dict = {}  # key -> verdict string, or the Disagrees message (prefixed "!")


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _high(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _copy(inputs: Sequence, dtype: torch.dtype | None = None) -> list:
    """Fresh leaves with the same values (and requires_grad); floats cast to dtype when given."""
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            out.append(t)
            continue
        c = t.detach().to(dtype or t.dtype).clone()
        out.append(c.requires_grad_(t.requires_grad))
    return out


def _run(fn: Callable, inputs: list, upstream: list | None) -> list[torch.Tensor]:
    """Forward outputs, then (upstream given) the gradients of the inputs that require grad."""
    if upstream is None:
        with torch.no_grad():
            return [o.detach() for o in _outputs(fn(*inputs)) if isinstance(o, torch.Tensor)]
    outs = [o for o in _outputs(fn(*inputs)) if isinstance(o, torch.Tensor)]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, upstream) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    return [o.detach() for o in outs] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wrt)]


def _names(inputs: Sequence, n_out: int) -> list[str]:
    wrt = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    return [f"output {i}" for i in range(n_out)] + [f"grad of input {i}" for i in wrt]


def compare(peer: Callable, reference: Callable, inputs: Sequence, grad: bool) -> str:
    """The verdict string when the peer agrees; raises Disagrees naming the worst tensor when it does not."""
    dtype = next(t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    high = _high(dtype)
    with torch.no_grad():
        probe = _outputs(reference(*_copy(inputs)))
    upstream = [torch.randn(o.shape, device=o.device) for o in probe if isinstance(o, torch.Tensor)] if grad else None
    want = _run(reference, _copy(inputs, high), upstream)  # the yardstick, in higher precision
    own = _run(reference, _copy(inputs), upstream)  # PyTorch's own result in the case dtype
    got = _run(peer, _copy(inputs), upstream)
    if len(got) != len(want):
        raise Disagrees(f"it returned {len(got)} tensors (outputs and gradients), the reference {len(want)}")
    atol = ATOL.get(dtype, ATOL_LOW)
    worst, worst_ratio = "", 0.0
    for name, w, o, g in zip(_names(inputs, len(probe)), want, own, got):
        if g.shape != w.shape:
            raise Disagrees(f"{name} has shape {tuple(g.shape)}, the reference {tuple(w.shape)}")
        w = w.double()
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        err = float((g.double() - w).abs().max()) if w.numel() else 0.0
        own_err = float((o.double() - w).abs().max()) if w.numel() else 0.0
        bound = 2 * own_err + atol * scale
        # A tensor far below 1 (a loss gradient: ~1e-4) gets an absolute allowance larger than itself, which
        # zeros would pass: an error of half its own size is wrong whatever the dtype, unless PyTorch's own is.
        magnitude = float(w.abs().max()) if w.numel() else 0.0
        if magnitude > 0:
            bound = min(bound, max(0.5 * magnitude, 2 * own_err))
        if not err <= bound:  # NaN fails too
            raise Disagrees(f"{name}: max error {err:.3g} against the {str(high).split('.')[-1]} reference, "
                            f"over the bound {bound:.3g} (2x PyTorch's own {str(dtype).split('.')[-1]} error "
                            f"+ {atol:g} x {scale:.3g}, at most half the reference's largest value)")
        if err / bound > worst_ratio or not worst:
            worst, worst_ratio = name, err / bound
    return f"agrees ({'outputs and gradients' if grad else 'outputs'}; worst {worst} at {worst_ratio:.2f} of its bound)"


def check(key: tuple, peer: Callable, reference: Callable, make_inputs: Callable[[], Sequence],
          grad: bool) -> str:
    """compare(), once per key (peer, op, shape, dtype, device, grad): later calls repeat the verdict."""
    if key not in _VERDICTS:
        try:
            _VERDICTS[key] = compare(peer, reference, make_inputs(), grad)
        except Disagrees as e:
            _VERDICTS[key] = "!" + str(e)
    verdict = _VERDICTS[key]
    if verdict.startswith("!"):
        raise Disagrees(verdict[1:])
    return verdict


def forget() -> None:
    """Drop remembered verdicts (tests; a new run re-checks)."""
    _VERDICTS.clear()
