"""ctypes loader of the native CUDA LayerNorm kernels (kernels/, built by CMake into libfastcram_native.so).

The library is looked for at $FASTCRAM_NATIVE_LIB (only there when the variable is set), else at
build/libfastcram_native.so under the repository root, else next to this package. Nothing is loaded at
import: `available()` loads it on first use and says whether the kernels can run here, and why not.

The functions take CUDA tensors only: activations in fp32 or bf16 (normalised over the last dim, at most
8192 features), parameters of any float dtype (the kernels read them as fp32; dweight and dbias come
back in the parameters' dtype). Statistics are fp32 with the shape x.shape[:-1]. Every call runs on
torch.cuda.current_stream() of the tensors' device and never synchronises with the host. These are
plain functions, not autograd ops: the ops layer wires them into a backend.

Semantics are those of fastcram/ops/layer_norm.py:
  layer_norm(x, w, b, eps) = F.layer_norm(x, (C,), w, b, eps)
  add_layer_norm(x, residual, w, b, eps) = (s, LN(s)) with s = x + residual (in x's dtype)
  layer_norm_bwd(dy, x, w, mean, rstd, ds=None) = (dx, dweight, dbias); for add + LayerNorm pass s as x
  and the gradient of s as ds: dx is then the gradient of both x and residual.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

LIB_NAME = "libfastcram_native.so"
ENV_VAR = "FASTCRAM_NATIVE_LIB"
ABI_VERSION = 1  # must equal FC_ABI_VERSION in kernels/fastcram_native.h
MAX_COLS = 8192
BUILD_HINT = "cmake -S . -B build && cmake --build build --parallel 2"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # enum fc_dtype


class NativeUnavailable(RuntimeError):
    """The native library cannot run here; the message says why."""


def candidate_paths() -> list[Path]:
    """Where the library is looked for, in order."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env)]
    package = Path(__file__).resolve().parent
    return [package.parent / "build" / LIB_NAME, package / LIB_NAME]


_LOADED: dict[tuple[str, ...], tuple[ctypes.CDLL | None, str]] = {}


def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, reason); cached per search path so a changed $FASTCRAM_NATIVE_LIB is seen."""
    paths = candidate_paths()
    key = tuple(str(p) for p in paths)
    if key not in _LOADED:
        _LOADED[key] = _open(paths)
    return _LOADED[key]


def _open(paths: list[Path]) -> tuple[ctypes.CDLL | None, str]:
    found = [p for p in paths if p.is_file()]
    if not found:
        where = ", ".join(str(p) for p in paths)
        if os.environ.get(ENV_VAR):
            return None, f"{ENV_VAR} points to {where}, which is not a file (unset it or build the library)"
        return None, f"native library not built (looked at {where}); build it with: {BUILD_HINT}"
    path = found[0]
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as err:
        return None, f"could not load {path}: {err}"
    version = lib.fc_abi_version()
    if version != ABI_VERSION:
        return None, f"{path} has ABI version {version}, this loader wants {ABI_VERSION}; rebuild it: {BUILD_HINT}"
    if lib.fc_probe() != 0:
        why = lib.fc_last_error().decode(errors="replace")
        torch_too = "" if torch.cuda.is_available() else "; torch sees no CUDA device either"
        return None, f"{path} loaded, but its CUDA runtime cannot run here: {why}{torch_too}"
    return lib, ""


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of the C ABI (kernels/fastcram_native.h)."""
    i32, i64, f32, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for name in ("fc_abi_version", "fc_max_cols", "fc_probe"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [], i32
    lib.fc_last_error.argtypes, lib.fc_last_error.restype = [], ctypes.c_char_p
    # dtype, rows, cols, x, residual, weight, bias, eps, y, s, mean, rstd, stream
    lib.fc_layer_norm_fwd.argtypes = [i32, i64, i32, ptr, ptr, ptr, ptr, f32, ptr, ptr, ptr, ptr, ptr]
    lib.fc_layer_norm_fwd.restype = i32
    lib.fc_layer_norm_bwd_workspace_floats.argtypes = [i32, i64, i32]
    lib.fc_layer_norm_bwd_workspace_floats.restype = i64
    # dtype, rows, cols, dy, ds, x, weight, mean, rstd, dx, dweight, dbias, workspace, workspace_floats, stream
    lib.fc_layer_norm_bwd.argtypes = [i32, i64, i32] + [ptr] * 10 + [i64, ptr]
    lib.fc_layer_norm_bwd.restype = i32


def available() -> tuple[bool, str]:
    """(True, "") when the native kernels can run here, else (False, reason)."""
    lib, reason = _load()
    return lib is not None, reason


def require() -> ctypes.CDLL:
    """The loaded library, or NativeUnavailable with the reason."""
    lib, reason = _load()
    if lib is None:
        raise NativeUnavailable(f"fastcram native kernels unavailable: {reason}")
    return lib


# ---- argument checks ----

def _check_cuda(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastcram.native: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"fastcram.native: {name} must be a CUDA tensor, got device {t.device}; "
                         f"the native kernels run on CUDA only (fastcram.ops has the CPU reference)")


def _check_activation(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    _check_cuda(name, t)
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"fastcram.native: {name} must be float32 or bfloat16, got {t.dtype}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"fastcram.native: {name} must match x ({tuple(like.shape)}, {like.dtype}, {like.device}), "
                         f"got ({tuple(t.shape)}, {t.dtype}, {t.device})")
    if t.dim() < 1 or not 1 <= t.shape[-1] <= MAX_COLS:
        raise ValueError(f"fastcram.native: {name} must have a last dim in [1, {MAX_COLS}], got shape {tuple(t.shape)}")


def _check_param(name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The parameter as a contiguous fp32 [C] tensor on x's device."""
    _check_cuda(name, t)
    if t.shape != (x.shape[-1],) or t.device != x.device or not t.is_floating_point():
        raise ValueError(f"fastcram.native: {name} must be a float tensor of shape ({x.shape[-1]},) on {x.device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t.detach().to(torch.float32).contiguous()


def _check_stats(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    _check_cuda(name, t)
    rows = x.numel() // x.shape[-1]
    if t.dtype != torch.float32 or t.numel() != rows or t.device != x.device or not t.is_contiguous():
        raise ValueError(f"fastcram.native: {name} must be a contiguous float32 tensor of {rows} elements on "
                         f"{x.device} (as the forward returns it), got {tuple(t.shape)} {t.dtype} on {t.device}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _raise_on(status: int, lib: ctypes.CDLL, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"fastcram.native {what} failed (status {status}): "
                           f"{lib.fc_last_error().decode(errors='replace')}")


@functools.lru_cache(maxsize=256)
def _workspace_floats(device_index: int, dtype_code: int, rows: int, cols: int) -> int:
    lib = require()
    with torch.cuda.device(device_index):
        n = lib.fc_layer_norm_bwd_workspace_floats(dtype_code, rows, cols)
    if n < 0:
        raise RuntimeError(f"fastcram.native workspace query failed: {lib.fc_last_error().decode(errors='replace')}")
    return n


# ---- writing into given buffers (the tests poison them first) ----

def forward_into(x, residual, weight, bias, eps: float, *, y, s=None, mean=None, rstd=None) -> None:
    """Forward into preallocated contiguous buffers: y (and s = x + residual) like x; mean, rstd fp32 [rows]."""
    _check_activation("x", x)
    if (residual is None) != (s is None):
        raise ValueError("fastcram.native: residual and s go together (add + LayerNorm) or are both None")
    for name, t in (("residual", residual), ("y", y), ("s", s)):
        if t is not None:
            _check_activation(name, t, like=x)
    for name, t in (("y", y), ("s", s)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"fastcram.native: {name} must be contiguous")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is not None:
            _check_stats(name, t, x)
    if not eps >= 0:
        raise ValueError(f"fastcram.native: eps must be >= 0, got {eps}")
    w, b = _check_param("weight", weight, x), _check_param("bias", bias, x)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    lib = require()
    cols = x.shape[-1]
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        status = lib.fc_layer_norm_fwd(_DTYPE_CODES[x.dtype], x.numel() // cols, cols, _ptr(x), _ptr(residual),
                                       _ptr(w), _ptr(b), float(eps), _ptr(y), _ptr(s), _ptr(mean), _ptr(rstd),
                                       stream)
    _raise_on(status, lib, "layer_norm forward")


def backward_into(dy, x, weight, mean, rstd, *, dx, dweight, dbias, ds=None) -> None:
    """Backward into preallocated buffers: dx contiguous like x; dweight, dbias contiguous fp32 [C]."""
    _check_activation("x", x)
    for name, t in (("dy", dy), ("ds", ds), ("dx", dx)):
        if t is not None:
            _check_activation(name, t, like=x)
    if not dx.is_contiguous():
        raise ValueError("fastcram.native: dx must be contiguous")
    _check_stats("mean", mean, x)
    _check_stats("rstd", rstd, x)
    w = _check_param("weight", weight, x)
    for name, t in (("dweight", dweight), ("dbias", dbias)):
        _check_cuda(name, t)
        if t.dtype != torch.float32 or t.shape != (x.shape[-1],) or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"fastcram.native: {name} must be a contiguous float32 tensor of shape "
                             f"({x.shape[-1]},) on {x.device}")
    x, dy = x.contiguous(), dy.contiguous()
    ds = None if ds is None else ds.contiguous()
    lib = require()
    cols = x.shape[-1]
    rows = x.numel() // cols
    code = _DTYPE_CODES[x.dtype]
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    n_ws = _workspace_floats(index, code, rows, cols)
    with torch.cuda.device(x.device):
        workspace = torch.empty(n_ws, dtype=torch.float32, device=x.device)  # per-block partial sums
        stream = torch.cuda.current_stream(x.device).cuda_stream
        status = lib.fc_layer_norm_bwd(code, rows, cols, _ptr(dy), _ptr(ds), _ptr(x), _ptr(w), _ptr(mean),
                                       _ptr(rstd), _ptr(dx), _ptr(dweight), _ptr(dbias), _ptr(workspace), n_ws,
                                       stream)
    _raise_on(status, lib, "layer_norm backward")


# ---- the public functions ----

def _forward(x, residual, weight, bias, eps, stats: bool):
    _check_activation("x", x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [..., C], contiguous
    s = None if residual is None else torch.empty_like(y)
    mean = rstd = None
    if stats:
        mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)  # [...]
        rstd = torch.empty_like(mean)
    forward_into(x, residual, weight, bias, eps, y=y, s=s, mean=mean, rstd=rstd)
    return s, y, mean, rstd


def layer_norm(x, weight, bias, eps: float) -> torch.Tensor:
    """y = LayerNorm(x) over the last dim (no statistics saved)."""
    return _forward(x, None, weight, bias, eps, stats=False)[1]


def layer_norm_fwd(x, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): the forward with the fp32 statistics the backward needs."""
    _, y, mean, rstd = _forward(x, None, weight, bias, eps, stats=True)
    return y, mean, rstd


def add_layer_norm(x, residual, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) with s = x + residual and y = LayerNorm(s) (no statistics saved)."""
    s, y, _, _ = _forward(x, residual, weight, bias, eps, stats=False)
    return s, y


def add_layer_norm_fwd(x, residual, weight, bias, eps: float):
    """(s, y, mean, rstd): the add + LayerNorm forward with the statistics of s."""
    return _forward(x, residual, weight, bias, eps, stats=True)


def layer_norm_bwd(dy, x, weight, mean, rstd, ds=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias). For add + LayerNorm pass x = s and ds = the gradient of s; dx is then the
    gradient of both x and residual. dweight and dbias come back in weight's dtype."""
    _check_activation("x", x)
    _check_cuda("weight", weight)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [..., C]
    dw = torch.empty(x.shape[-1], dtype=torch.float32, device=x.device)  # [C]
    db = torch.empty_like(dw)
    backward_into(dy, x, weight, mean, rstd, dx=dx, dweight=dw, dbias=db, ds=ds)
    return dx, dw.to(weight.dtype), db.to(weight.dtype)
