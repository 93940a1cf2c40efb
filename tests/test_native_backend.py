"""The native CUDA LayerNorm as an ops backend for the two norm ops."""
import pytest
import torch

from fastcram.ops import OpsError, get_op, get_ops
from fastcram.ops.layer_norm import add_layer_norm_ref, layer_norm_ref


def test_only_the_norm_ops_have_a_cuda_backend():
    for op in ("ffn", "mlm_loss"):
        with pytest.raises(OpsError, match="no native CUDA implementation"):
            get_op(op, "cuda")


def test_absent_library_is_a_clear_reason_not_a_crash():
    from fastcram.ops import native_norm
    if native_norm.HAVE_NATIVE:
        pytest.skip("the native library runs here")
    with pytest.raises(OpsError, match="native CUDA library is not available: .+"):
        get_ops("torch", per_op={"layer_norm": "cuda"})


def _native_or_skip():
    from fastcram.ops import native_norm
    if not native_norm.HAVE_NATIVE:
        pytest.skip(f"native library: {native_norm.NATIVE_REASON}")
    return native_norm


@pytest.mark.gpu
@pytest.mark.parametrize("n", [768, 1000, 17])
def test_native_backend_matches_reference_fp32(n):
    nn = _native_or_skip()
    x = torch.randn(37, n, device="cuda", requires_grad=True)
    r = torch.randn(37, n, device="cuda", requires_grad=True)
    w = torch.randn(n, device="cuda", requires_grad=True)
    b = torch.randn(n, device="cuda", requires_grad=True)
    g1, g2 = torch.randn(37, n, device="cuda"), torch.randn(37, n, device="cuda")
    outs = {}
    for name, fn in (("ref", add_layer_norm_ref), ("native", nn.add_layer_norm)):
        s, y = fn(x, r, w, b, 1e-12)
        grads = torch.autograd.grad((s * g1).sum() + (y * g2).sum(), (x, r, w, b))
        outs[name] = (s, y, *grads)
    for a, c in zip(outs["native"], outs["ref"]):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    y_ref = layer_norm_ref(x, w, b, 1e-12)
    torch.testing.assert_close(nn.layer_norm(x, w, b, 1e-12), y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_native_backend_opcheck_and_compile():
    nn = _native_or_skip()
    x = torch.randn(64, 768, device="cuda", requires_grad=True)
    w = torch.randn(768, device="cuda", requires_grad=True)
    b = torch.randn(768, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fastcram.native_ln_fwd.default, (x, w, b, 1e-12))
    f = torch.compile(lambda x, r: nn.add_layer_norm(x, r, w, b, 1e-12)[1].sum(), fullgraph=True)
    torch.testing.assert_close(f(x, x * 2), nn.add_layer_norm(x, x * 2, w, b, 1e-12)[1].sum(), rtol=1e-5,
                               atol=1e-3)


@pytest.mark.gpu
def test_native_backend_mixed_dtypes_under_autocast():
    nn = _native_or_skip()
    x = torch.randn(128, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(128, 768, device="cuda", requires_grad=True)
    w = torch.ones(768, device="cuda", requires_grad=True)
    b = torch.zeros(768, device="cuda", requires_grad=True)
    s, y = nn.add_layer_norm(x, r, w, b, 1e-12)
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    (s.sum() + y.float().sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32
