"""Triton layer_norm / add_layer_norm against the PyTorch reference.

CPU: the Triton interpreter, fp32, atol = rtol = 1e-5 for outputs and every gradient. Every buffer the
launchers allocate is NaN-poisoned, so an element a kernel fails to write shows up as a NaN mismatch.
GPU (marker gpu): bf16 error vs an fp32 reference <= 2x PyTorch's own bf16 error + a small atol.
"""
import pytest
import torch

from fastcram.ops import layer_norm as L

pytestmark = pytest.mark.skipif(not L.HAVE_TRITON, reason="triton is not installed")

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Launchers allocate through L._alloc: hand them NaN-filled buffers."""
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(L, "_alloc", nan_alloc)


def params(n, device, dtype=torch.float32):
    w = (1 + 0.5 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    return w, b


def leaf(shape, device, dtype=torch.float32, scale=1.0, shift=0.0):
    return (scale * torch.randn(shape, device=device) + shift).to(dtype).requires_grad_()


def grads(outs, ins, douts):
    """Gradients w.r.t. ins, with None where an input gets none."""
    pairs = [(o, d) for o, d in zip(outs, douts) if d is not None]
    return torch.autograd.grad([o for o, _ in pairs], ins, [d for _, d in pairs], allow_unused=True)


def assert_all_close(got, want, **tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


# --- fp32, interpreter on CPU (also runs on GPU) ---------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 768), (3, 13, 1000), (2, 3, 7, 17)])
def test_layer_norm_matches_reference(shape, device):
    n = shape[-1]
    x = leaf(shape, device, scale=2.0, shift=0.3)
    w, b = params(n, device)
    y = L.layer_norm(x, w, b, 1e-5)
    y_ref = L.layer_norm_ref(x, w, b, 1e-5)
    torch.testing.assert_close(y, y_ref, **TOL)
    dy = torch.randn_like(y)
    assert_all_close(grads([y], [x, w, b], [dy]), grads([y_ref], [x, w, b], [dy]), **TOL)


@pytest.mark.parametrize("shape", [(37, 768), (3, 13, 1000), (5, 7, 17)])
def test_add_layer_norm_matches_reference(shape, device):
    n = shape[-1]
    x, r = leaf(shape, device), leaf(shape, device, scale=3.0)
    w, b = params(n, device)
    s, y = L.add_layer_norm(x, r, w, b, 1e-12)  # the recipe's eps
    s_ref, y_ref = L.add_layer_norm_ref(x, r, w, b, 1e-12)
    torch.testing.assert_close(s, s_ref, **TOL)
    torch.testing.assert_close(y, y_ref, **TOL)
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    want = grads([s_ref, y_ref], [x, r, w, b], [ds, dy])
    assert_all_close(grads([s, y], [x, r, w, b], [ds, dy]), want, **TOL)


@pytest.mark.parametrize("used", ["y only", "s only"])
def test_add_layer_norm_one_output_used(used, device):
    """The unused output's grad arrives as None (not materialised); the result must still be right."""
    x, r = leaf((29, 100), device), leaf((29, 100), device)
    w, b = params(100, device)
    s, y = L.add_layer_norm(x, r, w, b, 1e-5)
    s_ref, y_ref = L.add_layer_norm_ref(x, r, w, b, 1e-5)
    d = torch.randn_like(s)
    douts = [None, d] if used == "y only" else [d, None]
    ins = [x, r, w, b]
    got = grads([s, y], ins, douts)
    want = grads([s_ref, y_ref], ins, douts)
    zero_if_none = lambda gs: [g if g is not None else torch.zeros_like(t) for g, t in zip(gs, ins)]  # noqa: E731
    assert_all_close(zero_if_none(got), zero_if_none(want), **TOL)


@pytest.mark.parametrize("tile", [(1, 1), (2, 2), (8, 4)])
@pytest.mark.parametrize("n", [1000, 17])
def test_every_tile_shape(tile, n, device):
    """Launchers with explicit (BLOCK_M, num_warps): the GPU autotuner may pick any of these."""
    m = 37  # not a multiple of any BLOCK_M > 1
    x, r = torch.randn(m, n, device=device), torch.randn(m, n, device=device)
    w, b = params(n, device)
    w, b = w.detach(), b.detach()
    s, y, mean, rstd = L.add_layer_norm_fwd_launch(x, r, w, b, 1e-5, tile=tile)
    s_ref, y_ref = L.add_layer_norm_ref(x, r, w, b, 1e-5)
    torch.testing.assert_close(s, s_ref, **TOL)
    torch.testing.assert_close(y, y_ref, **TOL)
    y1, mean1, rstd1 = L.layer_norm_fwd_launch(s, w, b, 1e-5, tile=tile)
    torch.testing.assert_close(y1, y_ref, **TOL)
    torch.testing.assert_close(mean1, mean, **TOL)
    torch.testing.assert_close(rstd1, rstd, **TOL)

    dy, ds = torch.randn_like(y), torch.randn_like(s)
    dx, dr, dw, db = L.layer_norm_bwd_launch(dy, ds, s, w, mean, rstd, torch.float32, torch.float64, tile=tile)
    sv, wv, bv = s.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    yv = L.layer_norm_ref(sv, wv, bv, 1e-5)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(yv, (sv, wv, bv), dy)
    assert_all_close([dx, dr.float(), dw, db], [dx_ref + ds, dx_ref + ds, dw_ref, db_ref], **TOL)


def test_non_contiguous_inputs_are_handled(device):
    base = torch.randn(40, 2 * 768, device=device)
    x = base[:, ::2].requires_grad_()  # stride 2 in the feature dim
    r = torch.randn(768, 40, device=device).t().requires_grad_()  # transposed
    w, b = params(768, device)
    y, y_ref = L.layer_norm(x, w, b, 1e-5), L.layer_norm_ref(x, w, b, 1e-5)
    torch.testing.assert_close(y, y_ref, **TOL)
    s, y2 = L.add_layer_norm(x, r, w, b, 1e-5)
    s_ref, y2_ref = L.add_layer_norm_ref(x, r, w, b, 1e-5)
    torch.testing.assert_close(y2, y2_ref, **TOL)
    dy = torch.randn(768, 40, device=device).t()  # a non-contiguous incoming grad too
    want = grads([s_ref, y2_ref], [x, r, w, b], [dy, dy])
    assert_all_close(grads([s, y2], [x, r, w, b], [dy, dy]), want, **TOL)


def test_mixed_dtypes_like_autocast(device):
    """bf16 branch output + fp32 residual stream: s stays fp32, y is bf16, grads keep each input's dtype."""
    x = leaf((19, 200), device, dtype=torch.bfloat16)
    r = leaf((19, 200), device)
    w, b = params(200, device)
    s, y = L.add_layer_norm(x, r, w, b, 1e-12)
    assert (s.dtype, y.dtype) == (torch.float32, torch.bfloat16)
    xf = x.detach().float().requires_grad_()
    s_ref, y_ref = L.add_layer_norm_ref(xf, r, w, b, 1e-12)
    torch.testing.assert_close(s, s_ref, **TOL)
    # bf16 stores: one bf16 ulp (the CPU interpreter truncates where the GPU rounds to nearest).
    torch.testing.assert_close(y.float(), y_ref, atol=1e-2, rtol=2 ** -7)
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    dx, dr, dw, db = grads([s, y], [x, r, w, b], [ds, dy])
    assert (dx.dtype, dr.dtype, dw.dtype, db.dtype) == (torch.bfloat16,) + (torch.float32,) * 3
    want = grads([s_ref, y_ref], [xf, r, w, b], [ds, dy.float()])
    torch.testing.assert_close(dx.float(), want[0], atol=1e-2, rtol=2 ** -7)
    assert_all_close([dr, dw, db], want[1:], atol=1e-4, rtol=1e-4)


def test_opcheck(device):
    x = leaf((3, 5, 17), device)
    r = leaf((3, 5, 17), device)
    w, b = params(17, device)
    torch.library.opcheck(torch.ops.fastcram.layer_norm_fwd.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.fastcram.add_layer_norm_fwd.default, (x, r, w, b, 1e-5))
    _, mean, rstd = L.layer_norm_fwd_launch(x.detach(), w.detach(), b.detach(), 1e-5)
    dy = torch.randn_like(x)
    for ds, dr_dtype in ((None, None), (torch.randn_like(x), torch.float64)):
        torch.library.opcheck(torch.ops.fastcram.layer_norm_bwd.default,
                              (dy, ds, x.detach(), w.detach(), mean, rstd, torch.float32, dr_dtype))


class TwoNorms(torch.nn.Module):
    """A pre-LN block in miniature: LN -> Linear -> fused add + LN."""

    def __init__(self, fns, d):
        super().__init__()
        self.ln, self.add_ln = fns
        self.w1, self.b1 = (torch.nn.Parameter(t.detach()) for t in params(d, "cpu"))
        self.w2, self.b2 = (torch.nn.Parameter(t.detach()) for t in params(d, "cpu"))
        self.lin = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        h = self.ln(x, self.w1, self.b1, 1e-12)
        s, h = self.add_ln(self.lin(h), x, self.w2, self.b2, 1e-12)
        return (s * h).sum() + h.square().sum()


def test_torch_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    m = TwoNorms((L.layer_norm, L.add_layer_norm), 24).to(device)
    x = leaf((2, 9, 24), device)
    ins = [x, *m.parameters()]
    eager = m(x)
    want = torch.autograd.grad(eager, ins)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)  # fullgraph: any graph break raises
    out = compiled(x)
    torch.testing.assert_close(out, eager, **TOL)
    assert_all_close(torch.autograd.grad(out, ins), want, **TOL)


@pytest.mark.parametrize("bad", ["too wide", "weight shape", "residual shape", "int input"])
def test_bad_input_is_refused_clearly(bad, device):
    n = 8193 if bad == "too wide" else 16
    x = torch.randn(4, n, device=device)
    w, b = torch.randn(n, device=device), torch.randn(n, device=device)
    r = torch.randn(4, n, device=device)
    if bad == "weight shape":
        w = torch.randn(n + 1, device=device)
    if bad == "residual shape":
        r = torch.randn(1, n, device=device)
    if bad == "int input":
        x = torch.ones(4, n, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="add_layer_norm"):
        L.add_layer_norm_fwd_launch(x, r, w, b, 1e-5)


# --- bf16 on the GPU ------------------------------------------------------------------------------------

def bf16_errors(fused, ref, inputs32):
    """Max abs error of the fused bf16 op and of PyTorch's bf16 op vs the fp32 reference, per output/grad."""
    ins16 = [t.detach().to(torch.bfloat16).requires_grad_() for t in inputs32]
    ins32 = [t.detach().float().requires_grad_() for t in ins16]  # the same values, in fp32
    outs32 = ref(*ins32, 1e-12)
    outs32 = outs32 if isinstance(outs32, tuple) else (outs32,)
    douts = [torch.randn_like(o).bfloat16() for o in outs32]
    want = [*outs32, *grads(outs32, ins32, [d.float() for d in douts])]
    errs = {}
    for name, fn in (("fused", fused), ("torch", ref)):
        outs = fn(*ins16, 1e-12)
        outs = outs if isinstance(outs, tuple) else (outs,)
        got = [*outs, *grads(outs, ins16, douts)]
        errs[name] = [(g.float() - w).abs().max().item() for g, w in zip(got, want)]
    return errs


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4099, 768), (2, 517, 1000), (1023, 17), (33, 8192)])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_bf16_error_within_twice_torch(shape, op):
    n = shape[-1]

    x = torch.randn(shape, device="cuda") * 2 + 0.5
    acts = [x, torch.randn(shape, device="cuda") * 3] if op == "add_layer_norm" else [x]
    errs = bf16_errors(getattr(L, op), getattr(L, f"{op}_ref"), [*acts, *params(n, "cuda")])
    for i, (e_fused, e_torch) in enumerate(zip(errs["fused"], errs["torch"])):
        assert e_fused <= 2 * e_torch + 1e-2, f"output/grad #{i}: fused {e_fused:.3g} vs torch {e_torch:.3g}"


@pytest.mark.gpu
def test_gpu_autotuned_fp32_and_mixed():
    """The autotuned GPU path at the model's shape, fp32 and the autocast mix."""
    x, r = leaf((8 * 128, 768), "cuda", dtype=torch.bfloat16), leaf((8 * 128, 768), "cuda")
    w, b = params(768, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s, y = L.add_layer_norm(x, r, w, b, 1e-12)
    assert (s.dtype, y.dtype) == (torch.float32, torch.bfloat16)
    xf = x.detach().float()
    s_ref, y_ref = L.add_layer_norm_ref(xf, r.detach(), w.detach(), b.detach(), 1e-12)
    torch.testing.assert_close(s, s_ref, **TOL)
    torch.testing.assert_close(y.float(), y_ref, atol=1e-2, rtol=2 ** -7)
    y32 = L.layer_norm(s_ref, w.detach(), b.detach(), 1e-12)
    torch.testing.assert_close(y32, y_ref, **TOL)
