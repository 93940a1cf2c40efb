"""Guarded Triton import shared by the op files (the package imports, and the torch backend runs, without
Triton installed), and the facts of the device the kernels launch on."""
import os

import torch

try:  # pragma: no cover - exercised by whichever environment runs it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAVE_TRITON = False

# The compile-only targets in force (innermost last): while one is, kernels "launch" on meta tensors and are
# compiled for its architecture without running (fastcram/ops/compile_only.py, `fastcram bench compile`).
COMPILE_ONLY_TARGETS: list = []


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why triton kernels cannot run on `device_type`, or None when they can."""
    if not HAVE_TRITON:
        return "triton is not installed (pip install triton)"
    if device_type == "cuda" or interpreting():
        return None
    if device_type == "meta" and COMPILE_ONLY_TARGETS:
        return None
    return "triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter)"


def multiprocessor_count(device: torch.device) -> int:
    """SMs of the GPU the kernels launch on (the compile-only target's for meta tensors)."""
    if device.type == "meta" and COMPILE_ONLY_TARGETS:
        return COMPILE_ONLY_TARGETS[-1].arch.sms
    return torch.cuda.get_device_properties(device).multi_processor_count


def max_shared_memory(device: torch.device) -> int:
    """Opt-in shared memory one CTA may use on the GPU the kernels launch on (the compile-only target's)."""
    if device.type == "meta" and COMPILE_ONLY_TARGETS:
        return COMPILE_ONLY_TARGETS[-1].arch.smem_per_block
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def fit_shared_memory(configs: list, kernel: str, shared_bytes, device: torch.device) -> list:
    """The autotune configs whose shared memory (`shared_bytes(config)`) fits one CTA of the device: configs
    that cannot launch are dropped before they are ever tried (at least the smallest is kept). Under
    `fastcram bench compile --all-configs` every config is kept and the dropped ones are noted for the report."""
    limit = max_shared_memory(device)
    dropped = [c for c in configs if shared_bytes(c) > limit]
    if device.type == "meta" and COMPILE_ONLY_TARGETS:
        COMPILE_ONLY_TARGETS[-1].note_pruned(kernel, dropped)
        if COMPILE_ONLY_TARGETS[-1].keep_all_configs:
            return configs
    kept = [c for c in configs if c not in dropped]
    return kept or [min(configs, key=shared_bytes)]
