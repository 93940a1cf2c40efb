"""The ctypes loader of the native CUDA LayerNorm (fastcram/ops/native.py) and, on a GPU, its kernels.

CPU: a missing or broken library gives (False, reason) and nothing raises at import; CPU tensors are
refused with a clear error; a built library loads and reports why it cannot run without a GPU.
GPU (built library): forward and every gradient against the torch reference in fp32 and bf16, with
outputs and gradient buffers poisoned with NaN before each call.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastcram.ops.native as native
from fastcram.ops.layer_norm import add_layer_norm_ref, layer_norm_ref

BUILT = Path(native.__file__).resolve().parent.parent / "build" / native.LIB_NAME


def test_missing_library_reports_a_reason(monkeypatch, tmp_path):
    nowhere = tmp_path / "nowhere" / native.LIB_NAME
    monkeypatch.setenv(native.ENV_VAR, str(nowhere))
    # A fresh copy of the module (sys.modules untouched): importing never raises, whatever the library's state.
    spec = importlib.util.spec_from_file_location("fastcram_native_fresh", native.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    ok, reason = fresh.available()
    assert ok is False
    assert str(nowhere) in reason and native.ENV_VAR in reason
    with pytest.raises(fresh.NativeUnavailable, match="unavailable"):
        fresh.require()


def test_unloadable_library_reports_a_reason(monkeypatch, tmp_path):
    junk = tmp_path / native.LIB_NAME
    junk.write_bytes(b"not a shared library")
    monkeypatch.setenv(native.ENV_VAR, str(junk))
    ok, reason = native.available()
    assert ok is False and reason.startswith("could not load") and str(junk) in reason


def test_default_search_path_without_the_variable(monkeypatch):
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    paths = native.candidate_paths()
    assert paths[0] == BUILT and paths[1].parent == Path(native.__file__).resolve().parent
    ok, reason = native.available()
    assert ok or reason  # never (False, "")


def test_cpu_tensors_are_refused():
    x, w, b = torch.randn(3, 5), torch.rand(5) + 0.5, torch.randn(5)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        native.layer_norm(x, w, b, 1e-5)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        native.add_layer_norm(x, x.clone(), w, b, 1e-5)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        native.layer_norm_bwd(x, x, w, torch.zeros(3), torch.ones(3))


@pytest.mark.skipif(not BUILT.is_file(), reason="native library not built (cmake -S . -B build && cmake --build build)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message seen without a GPU")
def test_built_library_loads_and_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, str(BUILT))
    ok, reason = native.available()
    assert ok is False
    assert "loaded, but its CUDA runtime cannot run here" in reason and "torch sees no CUDA device" in reason


# ---- GPU: the kernels against the torch reference ----

def _need_native():
    ok, reason = native.available()
    if not ok:
        pytest.skip(reason)


def _inputs(shape, dtype, add):
    c = shape[-1]
    x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype)  # a mean for the norm to remove
    residual = (torch.randn(shape, device="cuda") - 1).to(dtype) if add else None
    w = torch.randn(c, device="cuda") * 0.5 + 1
    b = torch.randn(c, device="cuda") * 0.5
    dy = torch.randn(shape, device="cuda").to(dtype)
    ds = torch.randn(shape, device="cuda").to(dtype) if add else None
    return x, residual, w, b, dy, ds


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _grads_ref(s, w, b, dy, eps, ds, dtype):
    """LayerNorm of s (float64, or torch's own computation in `dtype`) and its gradients."""
    s_ = s.detach().to(dtype).requires_grad_()
    w_ = w.detach().to(dtype).requires_grad_()
    b_ = b.detach().to(dtype).requires_grad_()
    y = F.layer_norm(s_, (s.shape[-1],), w_, b_, eps)
    y.backward(dy.to(dtype))
    dx = s_.grad + (0 if ds is None else ds.to(dtype))
    mean = s.double().mean(-1)
    rstd = (s.double().var(-1, unbiased=False) + eps).rsqrt()
    return y.double(), dx.double(), w_.grad.double(), b_.grad.double(), mean, rstd


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


SHAPES = [(37, 768), (4, 5, 771), (3, 8192), (600, 64), (6, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("add", [False, True], ids=["ln", "add_ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_the_reference(shape, dtype, add):
    _need_native()
    eps = 1e-5
    x, residual, w, b, dy, ds = _inputs(shape, dtype, add)
    rows = x.numel() // shape[-1]

    y, s = _nan(shape, dtype), (_nan(shape, dtype) if add else None)
    mean, rstd = _nan((rows,), torch.float32), _nan((rows,), torch.float32)
    native.forward_into(x, residual, w, b, eps, y=y, s=s, mean=mean, rstd=rstd)
    dx, dw, db = _nan(shape, dtype), _nan((shape[-1],), torch.float32), _nan((shape[-1],), torch.float32)
    normed = s if add else x
    native.backward_into(dy, normed, w, mean, rstd, dx=dx, dweight=dw, dbias=db, ds=ds)
    torch.cuda.synchronize()

    if add:  # the sum is stored in the activation dtype exactly as torch rounds it
        s_ref, _ = add_layer_norm_ref(x, residual, w.to(dtype), b.to(dtype), eps)
        assert torch.equal(s, s_ref)
    want = _grads_ref(normed, w, b, dy, eps, ds, torch.float64)
    got = (y, dx, dw, db, mean.view(shape[:-1]), rstd.view(shape[:-1]))
    names = ("y", "dx", "dweight", "dbias", "mean", "rstd")
    for name, g in zip(names, got):
        assert not g.isnan().any(), f"{name} has unwritten (NaN) elements"
    for name, g, r in zip(names[4:], got[4:], want[4:]):  # fp32 statistics in both dtypes
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=name)
    if dtype == torch.float32:
        torch.testing.assert_close(y, layer_norm_ref(normed, w, b, eps), rtol=1e-5, atol=1e-5)
        for name, g, r in zip(names[:4], got[:4], want[:4]):
            scale = max(r.abs().max().item(), 1.0)  # sums over rows: relative to their size
            torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5 * scale, msg=name)
    else:  # bf16: at most twice torch's own bf16 error against the float64 reference, plus a small atol
        theirs = _grads_ref(normed, w, b, dy, eps, ds, torch.bfloat16)
        for name, g, r, t in zip(names[:4], got[:4], want[:4], theirs[:4]):
            assert _max_err(g, r) <= 2 * _max_err(t, r) + 1e-3, f"{name}: {_max_err(g, r)} vs torch {_max_err(t, r)}"


@pytest.mark.gpu
def test_public_functions_shapes_dtypes_and_determinism():
    _need_native()
    x, residual, w, b, dy, ds = _inputs((2, 9, 768), torch.bfloat16, add=True)
    w16, b16 = w.to(torch.bfloat16), b.to(torch.bfloat16)  # parameters of another dtype are accepted
    y = native.layer_norm(x, w16, b16, 1e-12)
    y2, mean, rstd = native.layer_norm_fwd(x, w16, b16, 1e-12)
    assert y.shape == x.shape and y.dtype == x.dtype and mean.shape == (2, 9) and mean.dtype == torch.float32
    assert torch.equal(y, y2)
    s, ya = native.add_layer_norm(x, residual, w16, b16, 1e-12)
    s2, ya2, mean_s, rstd_s = native.add_layer_norm_fwd(x, residual, w16, b16, 1e-12)
    assert torch.equal(s, x + residual) and torch.equal(ya, ya2) and torch.equal(s, s2)
    first = native.layer_norm_bwd(dy, s, w16, mean_s, rstd_s, ds=ds)
    again = native.layer_norm_bwd(dy, s, w16, mean_s, rstd_s, ds=ds)
    assert first[1].dtype == torch.bfloat16 and first[0].shape == x.shape
    for a, b_ in zip(first, again):  # no atomics: the same bits every time
        assert torch.equal(a, b_)
    ref = layer_norm_ref(x.float(), w16.float(), b16.float(), 1e-12)
    assert _max_err(y, ref) < 0.1
    with pytest.raises(ValueError, match="last dim"):
        native.layer_norm(torch.randn(4, 8193, device="cuda"), torch.ones(8193, device="cuda"),
                          torch.zeros(8193, device="cuda"), 1e-5)
