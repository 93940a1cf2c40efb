"""Guarded Triton import shared by the op files: the package imports (and the torch backend runs)
without Triton installed."""
import os

try:  # pragma: no cover - exercised by whichever environment runs it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why triton kernels cannot run on `device_type`, or None when they can."""
    if not HAVE_TRITON:
        return "triton is not installed (pip install triton)"
    if device_type == "cuda" or interpreting():
        return None
    return "triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter)"
