"""The fake (meta) implementations of the custom ops describe the real outputs exactly, strides included,
on transposed, sliced and expanded inputs: eagerly (FakeTensorMode against the real launch) and under
torch.compile(fullgraph=True), whose generated code asserts the strides the fakes promised.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastcram.ops import layer_norm as ln

pytestmark = pytest.mark.skipif(not ln.HAVE_TRITON, reason="triton is not installed")

N = 40  # features (not a power of two)


def views(rows: int = 12, device: str = "cpu"):
    """Inputs [rows, N] whose memory is laid out in three non-contiguous ways (fresh values every call)."""
    return {
        "transposed": torch.randn(N, rows, device=device).t(),  # strides (1, rows)
        "sliced": torch.randn(rows, 2 * N, device=device)[:, ::2],  # strides (2N, 2)
        "rows-sliced": torch.randn(2 * rows, N, device=device)[::2],  # strides (2N, 1)
        "expanded": torch.randn(1, N, device=device).expand(rows, N),  # strides (0, 1)
    }


def params(device: str = "cpu"):
    return torch.randn(N, device=device), torch.randn(N, device=device)


def fake_and_real(op, *args):
    """The op's outputs for real, and as its fake implementation describes them."""
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    return real, fake


def assert_same_layout(real, fake):
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype
        assert r.stride() == f.stride(), f"real strides {r.stride()} != fake strides {f.stride()}"


@pytest.mark.parametrize("view", list(views()))
def test_layer_norm_fakes_match_real_outputs(view):
    x = views()[view]
    w, b = params()
    real, fake = fake_and_real(torch.ops.fastcram.layer_norm_fwd, x, w, b, 1e-5)
    assert_same_layout(real, fake)
    r = views()[view]
    real, fake = fake_and_real(torch.ops.fastcram.add_layer_norm_fwd, x, r, w, b, 1e-5)
    assert_same_layout(real, fake)
    dy = views()[view]
    y, mean, rstd = torch.ops.fastcram.layer_norm_fwd(x, w, b, 1e-5)
    real, fake = fake_and_real(torch.ops.fastcram.layer_norm_bwd, dy, None, x, w, mean, rstd, x.dtype, None)
    assert_same_layout(real, fake)


@pytest.mark.gpu
@pytest.mark.parametrize("view", list(views()))
def test_native_norm_fakes_match_real_outputs(view):
    """The CMake-built CUDA norm's custom ops (--norm-kernels cuda), where the library is built."""
    from fastcram.ops import native_norm

    if not native_norm.HAVE_NATIVE:
        pytest.skip(native_norm.NATIVE_REASON)
    x, r, dy = (views(device="cuda")[view] for _ in range(3))
    w, b = params("cuda")
    assert_same_layout(*fake_and_real(torch.ops.fastcram.native_ln_fwd, x, w, b, 1e-5))
    assert_same_layout(*fake_and_real(torch.ops.fastcram.native_add_ln_fwd, x, r, w, b, 1e-5))
    _, mean, rstd = torch.ops.fastcram.native_ln_fwd(x, w, b, 1e-5)
    assert_same_layout(*fake_and_real(torch.ops.fastcram.native_ln_bwd, dy, x, w, mean, rstd, None))


# The views made inside the compiled function, from contiguous graph inputs: [rows, N] each.
ROWS = 12
IN_GRAPH_VIEWS = {
    "transposed": (lambda: torch.randn(N, ROWS), lambda t: t.t()),
    "sliced": (lambda: torch.randn(ROWS, 2 * N), lambda t: t[:, ::2]),
    "rows-sliced": (lambda: torch.randn(2 * ROWS, N), lambda t: t[::2]),
    "expanded": (lambda: torch.randn(1, N), lambda t: t.expand(ROWS, N)),
}


@pytest.mark.parametrize("view", list(IN_GRAPH_VIEWS))
def test_compiled_layer_norm_on_strided_views(view):
    """layer_norm(x.t()) and friends compiled with fullgraph: forward and backward equal eager. Inductor
    asserts that each custom op's output has the strides its fake promised (caches off: a graph compiled
    with an older fake must not hide a wrong one)."""
    make, take = IN_GRAPH_VIEWS[view]
    bases = [make(), make()]
    w, b = params()

    def f(x, r, w, b):
        y = ln.layer_norm(take(x), w, b, 1e-5)
        s, y2 = ln.add_layer_norm(y, take(r), w, b, 1e-5)
        return (y * y2).sum() + s.square().sum()

    results = []
    with torch._inductor.config.patch(force_disable_caches=True):
        for fn in (f, torch.compile(f, fullgraph=True, dynamic=False)):
            args = [t.detach().clone().requires_grad_() for t in (*bases, w, b)]
            loss = fn(*args)
            results.append((loss.detach(), *torch.autograd.grad(loss, args)))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ ffn and mlm_loss
from fastcram.ops import ffn as ffn_mod  # noqa: E402
from fastcram.ops import mlm_loss as mlm_mod  # noqa: E402

D, F = 24, 20  # hidden, GLU width (w_in [2F, D], w_out [D, F])


def strided(make_view: str, rows: int, cols: int) -> torch.Tensor:
    """A [rows, cols] tensor laid out as `make_view` says (fresh values)."""
    if make_view == "transposed":
        return torch.randn(cols, rows).t()
    if make_view == "sliced":
        return torch.randn(rows, 2 * cols)[:, ::2]
    if make_view == "rows-sliced":
        return torch.randn(2 * rows, cols)[::2]
    return torch.randn(1, cols).expand(rows, cols)


@pytest.mark.parametrize("view", ["transposed", "sliced", "rows-sliced", "expanded"])
def test_ffn_and_mlm_loss_fakes_match_real_outputs(view):
    x = strided(view, 13, D)
    w_in, w_out = strided(view, 2 * F, D), strided(view, D, F)
    real, fake = fake_and_real(torch.ops.fastcram.ffn_fwd, x, w_in, w_out, True, True)
    assert_same_layout(real, fake)
    _, h, _ = real
    real, fake = fake_and_real(torch.ops.fastcram.ffn_preact_grad, strided(view, 13, D), w_out, h, True)
    assert_same_layout([real], [fake])
    rows, weight = strided(view, 13, D), strided(view, 37, D)
    labels = torch.randint(0, 37, (13,))
    real, fake = fake_and_real(torch.ops.fastcram.mlm_loss_fwd, rows, labels, weight, True, True)
    assert_same_layout(real, fake)


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded"])
def test_compiled_ffn_and_mlm_loss_on_strided_views(view):
    """The FFN and the loss on views made inside a compiled graph: forward and every gradient equal eager."""
    make, take = IN_GRAPH_VIEWS[view]
    base = make()
    w_in, w_out, weight = 0.3 * torch.randn(2 * F, N), 0.3 * torch.randn(N, F), 0.3 * torch.randn(37, N)
    labels = torch.randint(0, 37, (ROWS,))

    def f(x, w_in, w_out, weight):
        h = take(x)  # [ROWS, N], strided
        out = ffn_mod.ffn(h, w_in, w_out, "geglu")  # [ROWS, N]
        return mlm_mod.mlm_loss(out + h, labels, weight)

    results = []
    with torch._inductor.config.patch(force_disable_caches=True):
        for fn in (f, torch.compile(f, fullgraph=True, dynamic=False)):
            args = [t.detach().clone().requires_grad_() for t in (base, w_in, w_out, weight)]
            loss = fn(*args)
            results.append((loss.detach(), *torch.autograd.grad(loss, args)))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
