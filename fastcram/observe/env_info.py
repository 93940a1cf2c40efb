"""What a run or benchmark ran on: versions, git sha, device name. Recorded at the top of every log."""
from __future__ import annotations

import os
import platform
import subprocess

import torch


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def driver_version(device: str) -> str | None:
    """The NVIDIA driver's version (NVML when nvidia-ml-py is installed, else the CUDA driver API version
    torch reports); None without a GPU."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # no nvidia-ml-py, or NVML cannot start: fall back to the CUDA driver API version
        pass
    try:
        v = torch._C._cuda_getDriverVersion()  # e.g. 12040
        return f"cuda driver api {v // 1000}.{v % 1000 // 10}"
    except (AttributeError, RuntimeError):
        return None


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: str) -> dict:
    return {
        "git_sha": git_sha(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device_name(device),
    }
