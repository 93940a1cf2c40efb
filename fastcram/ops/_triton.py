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


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of the GPU the kernels launch on (the compile-only target's for meta tensors)."""
    if device.type == "meta" and COMPILE_ONLY_TARGETS:
        return divmod(COMPILE_ONLY_TARGETS[-1].arch.capability, 10)
    return torch.cuda.get_device_capability(device)


def compile_only_target(device: torch.device):
    """The compile-only target in force for launches on `device` (meta tensors), else None."""
    return COMPILE_ONLY_TARGETS[-1] if device.type == "meta" and COMPILE_ONLY_TARGETS else None


def prune(configs: list, kept: list, kernel: str, device: torch.device, launch: dict | None = None) -> list:
    """An autotuner's early prune: `kept` of `configs` are tried. Under `fastcram bench compile` the others
    are noted for the report (with the launch's constexprs `launch`, which tell launches of one kernel
    apart) and, with --all-configs, compiled too (to show why they were dropped)."""
    target = compile_only_target(device)
    if target is not None:
        target.note_pruned(kernel, [c for c in configs if c not in kept], launch or {})
        if target.keep_all_configs:
            return configs
    return kept
