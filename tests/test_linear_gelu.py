"""linear_gelu / linear_geglu: Triton kernels against the reference (interpreter on CPU, bf16 on GPU)."""
import pytest
import torch

from fastcram.ops import linear_gelu as lg

pytestmark = pytest.mark.skipif(not lg.HAVE_TRITON, reason="triton is not installed")

FNS = {"gelu": (lg.linear_gelu, lg.linear_gelu_ref), "geglu": (lg.linear_geglu, lg.linear_geglu_ref)}
ATOL = RTOL = 1e-4  # the matmul-path tolerance (blocked fp32 accumulation order differs from torch's)


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the comparison."""

    def alloc(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(lg, "_alloc", alloc)


def _inputs(lead, d, n_out, device, dtype=torch.float32, requires_grad=True):
    x = torch.randn(*lead, d, device=device, dtype=dtype)  # [..., D]
    w = torch.randn(n_out, d, device=device, dtype=dtype) * d ** -0.5  # [N, D], unit-scale pre-activations
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad)


def _max_err(got, want):
    return (got.float() - want.float()).abs().max().item()


def _fwd_bwd(fn, x, w, dy=None, **kw):
    y = fn(x, w, **kw)
    dy = torch.randn_like(y) if dy is None else dy
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw, dy


@pytest.mark.parametrize("kind", ["gelu", "geglu"])
@pytest.mark.parametrize("bwd_gemm", ["torch", "triton"])
@pytest.mark.parametrize("lead,d,f", [((37,), 24, 40), ((3, 7), 40, 24), ((1,), 16, 16)])
def test_matches_reference_fp32(poisoned, device, kind, bwd_gemm, lead, d, f):
    fn, ref = FNS[kind]
    n_out = 2 * f if kind == "geglu" else f
    x, w = _inputs(lead, d, n_out, device)
    y, dx, dw, dy = _fwd_bwd(fn, x, w, bwd_gemm=bwd_gemm)
    y_ref, dx_ref, dw_ref, _ = _fwd_bwd(ref, x, w, dy)
    assert y.shape == (*lead, f) and dx.shape == x.shape and dw.shape == w.shape
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dx, dx_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dw, dw_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("glu", [False, True])
def test_saved_preactivation_and_no_grad(poisoned, device, glu):
    """The forward saves exactly x @ W.T when asked, and nothing in no-grad calls."""
    op = torch.ops.fastcram.linear_geglu_fwd if glu else torch.ops.fastcram.linear_gelu_fwd
    fn, ref = FNS["geglu" if glu else "gelu"]
    x, w = _inputs((5, 9), 24, 48, device, requires_grad=False)
    y, h = op(x, w, True, "torch")
    torch.testing.assert_close(h, (x @ w.t()).reshape(45, 48), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y, ref(x, w), atol=ATOL, rtol=RTOL)
    _, h_none = op(x, w, False, "torch")
    assert h_none.numel() == 0
    with torch.no_grad():
        torch.testing.assert_close(fn(x.requires_grad_(), w), ref(x, w), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["gelu", "geglu"])
def test_saves_only_x_weight_and_preactivation(device, kind):
    """Activation memory: the op keeps x, W and h = x @ W.T ([M, N]) -- what torch.compile of the
    reference keeps too -- and nothing else."""
    x, w = _inputs((3, 5), 16, 32, device)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FNS[kind][0](x, w)
    assert sorted(shapes) == sorted([(3, 5, 16), (32, 16), (15, 32)])


def test_strided_input(poisoned, device):
    """A transposed (non-contiguous) x is read through its strides."""
    x = torch.randn(24, 21, device=device).t().requires_grad_()  # [21, 24], strides (1, 21)
    w = (torch.randn(80, 24, device=device) * 24 ** -0.5).requires_grad_()
    y, dx, dw, dy = _fwd_bwd(lg.linear_geglu, x, w, bwd_gemm="triton")
    y_ref, dx_ref, dw_ref, _ = _fwd_bwd(lg.linear_geglu_ref, x, w, dy)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_weight_only_and_input_only_grads(device):
    x, w = _inputs((11,), 16, 32, device)
    y = lg.linear_geglu(x.detach(), w)
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    (dw_ref,) = torch.autograd.grad(lg.linear_geglu_ref(x.detach(), w).sum(), (w,))
    torch.testing.assert_close(dw, dw_ref, atol=ATOL, rtol=RTOL)
    y = lg.linear_gelu(x, w.detach())
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    (dx_ref,) = torch.autograd.grad(lg.linear_gelu_ref(x, w.detach()).sum(), (x,))
    torch.testing.assert_close(dx, dx_ref, atol=ATOL, rtol=RTOL)


def test_autocast_casts_like_f_linear(device):
    """Under autocast fp32 parameters run the bf16 kernels; W's gradient comes back in fp32; the error vs
    fp32 is at most twice the reference's own autocast error (the DESIGN bf16 rule)."""
    device_type = "cuda" if device == "cuda" else "cpu"
    x, w = _inputs((2, 9), 32, 48, device)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y, dx, dw, dy = _fwd_bwd(lg.linear_geglu, x, w)
        y_ac, dx_ac, dw_ac, _ = _fwd_bwd(lg.linear_geglu_ref, x, w, dy)
    y_32, dx_32, dw_32, _ = _fwd_bwd(lg.linear_geglu_ref, x, w, dy.float())
    assert y.dtype == y_ac.dtype == torch.bfloat16
    assert dw.dtype == dw_ac.dtype == torch.float32 and dx.dtype == dx_ac.dtype
    for got, autocast_ref, want in ((y, y_ac, y_32), (dx, dx_ac, dx_32), (dw, dw_ac, dw_32)):
        assert _max_err(got, want) <= 2 * _max_err(autocast_ref, want) + 1e-3 * want.abs().max().item()


def test_bad_inputs_raise(device):
    x, w = _inputs((4,), 16, 32, device, requires_grad=False)
    with pytest.raises(ValueError, match="last dimension"):
        lg.linear_gelu(x[:, :8], w)
    with pytest.raises(ValueError, match="even number of rows"):
        lg.linear_geglu(x, w[:31])
    with pytest.raises(ValueError, match="share a dtype"):
        lg.linear_gelu(x, w.double())
    with pytest.raises(ValueError, match="bwd_gemm"):
        lg.linear_gelu(x, w, bwd_gemm="cutlass")


@pytest.mark.parametrize("glu", [False, True])
def test_opcheck(device, glu):
    op = torch.ops.fastcram.linear_geglu_fwd if glu else torch.ops.fastcram.linear_gelu_fwd
    x, w = _inputs((3, 7), 16, 32, device)
    torch.library.opcheck(op, (x, w, True, "triton"))
    h = (x @ w.t()).detach().reshape(21, 32)
    dy = torch.randn(21, 16 if glu else 32, device=device)
    torch.library.opcheck(torch.ops.fastcram.linear_gelu_preact_grad, (dy, h, glu))
    torch.library.opcheck(torch.ops.fastcram.linear_gelu_matmul, (h.t(), x.detach().reshape(21, 16)))


def test_compile_fullgraph_matches_eager(device):
    """No graph break: the custom ops are opaque to inductor; outputs and gradients equal eager."""
    torch._dynamo.reset()
    x, w = _inputs((2, 9), 16, 48, device)

    def ffn(x, w):
        return lg.linear_geglu(x, w) + lg.linear_gelu(x, w[:24])

    compiled = torch.compile(ffn, fullgraph=True)
    y, dx, dw, dy = _fwd_bwd(compiled, x, w)
    y_eager, dx_eager, dw_eager, _ = _fwd_bwd(ffn, x, w, dy)
    torch.testing.assert_close(y, y_eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx, dx_eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dw, dw_eager, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gelu", "geglu"])
@pytest.mark.parametrize("bwd_gemm", ["torch", "triton"])
@pytest.mark.parametrize("lead", [(2, 2048), (4, 1031)], ids=["M4096", "M4124"])  # fast path / masked path
def test_bf16_error_within_twice_torch(kind, bwd_gemm, lead):
    """DESIGN rule: error vs an fp32 reference <= 2x PyTorch's own bf16 error + small atol."""
    fn, ref = FNS[kind]
    n_out = 3072 if kind == "geglu" else 1536
    x32, w32 = _inputs(lead, 768, n_out, "cuda")
    x16, w16 = (t.detach().bfloat16().requires_grad_() for t in (x32, w32))
    y, dx, dw, dy = _fwd_bwd(fn, x16, w16, bwd_gemm=bwd_gemm)
    y_t, dx_t, dw_t, _ = _fwd_bwd(ref, x16, w16, dy)
    y_32, dx_32, dw_32, _ = _fwd_bwd(ref, x32, w32, dy.float())
    for name, got, torch16, want in (("y", y, y_t, y_32), ("dx", dx, dx_t, dx_32), ("dw", dw, dw_t, dw_32)):
        assert got.dtype == torch.bfloat16 and not torch.isnan(got).any(), name
        err, err_torch = _max_err(got, want), _max_err(torch16, want)
        assert err <= 2 * err_torch + 1e-3 * want.abs().max().item(), (name, err, err_torch)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gelu", "geglu"])
def test_fp32_on_gpu_is_not_tf32(kind):
    """fp32 inputs use input_precision="ieee": agreement with cuBLAS fp32 (TF32 off, torch's default) far
    tighter than TF32's ~1e-3 would allow."""
    assert not torch.backends.cuda.matmul.allow_tf32, "the fp32 reference must not use TF32"
    fn, ref = FNS[kind]
    x, w = _inputs((517,), 768, 3072, "cuda")
    y, dx, dw, dy = _fwd_bwd(fn, x, w, bwd_gemm="triton")
    y_ref, dx_ref, dw_ref, _ = _fwd_bwd(ref, x, w, dy)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dx, dx_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dw, dw_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.gpu
def test_compile_fullgraph_on_gpu_under_autocast():
    """The model's setting: fp32 parameters, autocast bf16, torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    x, w = _inputs((8, 128), 768, 3072, "cuda")

    def ffn(x, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return lg.linear_geglu(x, w)

    y, dx, dw, dy = _fwd_bwd(torch.compile(ffn, fullgraph=True), x, w)
    y_e, dx_e, dw_e, _ = _fwd_bwd(ffn, x, w, dy)
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    for got, want in ((y, y_e), (dx, dx_e), (dw, dw_e)):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
