"""ffn: the fused FFN op against its reference (interpreter on CPU, bf16 on GPU), and its load-path rule."""
import pytest
import torch

from fastcram.ops import ffn as ffn_mod

pytestmark = pytest.mark.skipif(not ffn_mod.HAVE_TRITON, reason="triton is not installed")

ATOL = RTOL = 1e-5  # fp32 kernels vs reference (DESIGN "Tests")
KINDS = ("geglu", "gelu")


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the comparison."""

    def alloc(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(ffn_mod, "_alloc", alloc)


@pytest.fixture
def paths(monkeypatch):
    """The load path each kernel launch took (True: tensor descriptors), in launch order."""
    taken = []
    rule = ffn_mod.use_descriptors

    def spy(capability, *tensors):
        taken.append(rule(capability, *tensors))
        return taken[-1]

    monkeypatch.setattr(ffn_mod, "use_descriptors", spy)
    return taken


def _weights(kind, d, f, device, dtype=torch.float32):
    n = 2 * f if kind == "geglu" else f
    w_in = torch.randn(n, d, device=device, dtype=dtype) * d ** -0.5  # [N, D]: unit-scale pre-activations
    w_out = torch.randn(d, f, device=device, dtype=dtype) * f ** -0.5  # [D, F]
    return w_in.requires_grad_(), w_out.requires_grad_()


def _inputs(kind, lead, d, f, device, dtype=torch.float32):
    x = torch.randn(*lead, d, device=device, dtype=dtype).requires_grad_()  # [..., D]
    return (x, *_weights(kind, d, f, device, dtype))


def _fwd_bwd(fn, x, w_in, w_out, kind, dout=None):
    out = fn(x, w_in, w_out, kind)
    dout = torch.randn_like(out) if dout is None else dout
    grads = torch.autograd.grad(out, (x, w_in, w_out), dout)
    return (out, *grads), dout


def _assert_matches_reference(kind, x, w_in, w_out, atol=ATOL, rtol=RTOL):
    got, dout = _fwd_bwd(ffn_mod.ffn, x, w_in, w_out, kind)
    want, _ = _fwd_bwd(ffn_mod.ffn_ref, x, w_in, w_out, kind, dout)
    for name, g, w in zip(("out", "dx", "dw_in", "dw_out"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _max_err(got, want):
    return (got.float() - want.float()).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead,d,f", [((40,), 24, 40), ((3, 11), 32, 20)])
def test_descriptor_path_matches_reference_fp32(poisoned, paths, device, kind, lead, d, f):
    """16-byte-aligned strides: both GEMMs read through tensor descriptors (M, N and K not multiples of the
    16-wide tiles, so the copy engine's zero fill at the edges is exercised)."""
    _assert_matches_reference(kind, *_inputs(kind, lead, d, f, device))
    assert paths == [device == "cpu"] * 2  # forward, then backward (fp32 on a GPU takes pointers)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead,d,f", [((37,), 21, 19), ((5, 3), 13, 7)])
def test_pointer_path_matches_reference_fp32(poisoned, paths, device, kind, lead, d, f):
    """Odd M, K and N: row strides are not multiples of 16 bytes, so both GEMMs use pointer loads."""
    _assert_matches_reference(kind, *_inputs(kind, lead, d, f, device))
    assert paths == [False, False]


def test_strided_and_expanded_operands_take_pointers(poisoned, paths, device):
    """A transposed x and an expanded (stride 0) output gradient are read through their strides."""
    kind = "geglu"
    x = torch.randn(24, 37, device=device).t().requires_grad_()  # [37, 24], strides (1, 37)
    w_in, w_out = _weights(kind, 24, 16, device)
    out = ffn_mod.ffn(x, w_in, w_out, kind)
    grads = torch.autograd.grad(out.sum(), (x, w_in, w_out))  # dOut: ones expanded, strides (0, 0)
    ref = ffn_mod.ffn_ref(x, w_in, w_out, kind)
    ref_grads = torch.autograd.grad(ref.sum(), (x, w_in, w_out))
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert paths == [False, False]


def test_path_rule():
    """Descriptors only where TMA can read every operand as it is and (on a GPU) wgmma can use them."""
    aligned = torch.empty(8, 24)  # fp32 row stride 96 bytes
    odd = torch.empty(8, 21)  # 84 bytes
    bf16 = torch.empty(8, 24, dtype=torch.bfloat16)  # 48 bytes
    bf16_odd = torch.empty(8, 12, dtype=torch.bfloat16)  # 24 bytes
    rule = ffn_mod.use_descriptors
    assert rule(None, aligned, aligned) and rule((9, 0), bf16, bf16) and rule((10, 0), bf16, bf16)
    assert not rule(None, aligned, odd) and not rule((9, 0), bf16, bf16_odd)
    assert not rule((8, 0), bf16, bf16)  # no TMA before Hopper
    assert not rule((9, 0), aligned, aligned)  # fp32 on a GPU: the FMA path, where descriptor tiles spill
    assert not rule(None, torch.empty(24, 8).t(), aligned)  # last stride not 1
    assert not rule(None, torch.empty(8, 25)[:, 1:], aligned)  # base 4 bytes past a 16-byte boundary
    assert not rule(None, torch.empty(1, 24).expand(8, 24), aligned)  # rows overlap (stride 0)
    assert rule(None, torch.empty(8, 48)[:, :24], aligned)  # a column slice: rows 192 bytes apart


def test_prune_per_architecture():
    """Per GPU: sm_90 keeps every bf16 config; sm_80 drops the tiles that spill there (more than 64 fp32
    accumulators a thread); a 99 KB GPU also drops what does not fit its shared memory (worked out by hand
    from the buffer model); fp32 gets its one small tile; nothing fitting leaves the smallest config."""
    prune = ffn_mod.prune_configs
    fwd_glu = ffn_mod.FWD_GEGLU_CONFIGS

    def tiles(configs):
        return sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                       c.kwargs["PERSISTENT"]) for c in configs)

    assert prune(fwd_glu, (9, 0), 232448, torch.bfloat16, True) == fwd_glu
    dropped = [c for c in fwd_glu if c not in prune(fwd_glu, (8, 0), 166912, torch.bfloat16, True)]
    assert tiles(dropped) == [(128, 128, 64, 3, False), (128, 128, 64, 4, False), (256, 64, 64, 3, False)]
    assert tiles(prune(fwd_glu, (8, 6), 101376, torch.bfloat16, True)) == \
        [(128, 64, 64, 3, False), (128, 64, 64, 3, True), (128, 64, 64, 4, False)]
    for configs in (fwd_glu, ffn_mod.BWD_GELU_CONFIGS):
        assert prune(configs, (9, 0), 232448, torch.float32, configs is fwd_glu) == [ffn_mod.FP32_CONFIG]
        smallest = prune(configs, (8, 6), 20000, torch.bfloat16, configs is fwd_glu)
        assert len(smallest) == 1 and smallest[0] in configs


@pytest.mark.parametrize("kind", KINDS)
def test_saves_x_weights_preactivation_and_activation_only(device, kind):
    """Activation memory: x, w_in, w_out, h = x @ w_in.T ([M, N]) and y ([M, F], the down projection's
    input): what autograd keeps for the reference too."""
    x, w_in, w_out = _inputs(kind, (3, 5), 16, 8, device)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ffn_mod.ffn(x, w_in, w_out, kind)
    n = 16 if kind == "geglu" else 8
    assert sorted(shapes) == sorted([(3, 5, 16), (n, 16), (16, 8), (15, n), (15, 8)])


@pytest.mark.parametrize("glu", [False, True])
def test_op_writes_preactivation_and_activation_only_when_saving(poisoned, device, glu):
    kind = "geglu" if glu else "gelu"
    x, w_in, w_out = (t.detach() for t in _inputs(kind, (5, 9), 24, 16, device))
    out, h, y = torch.ops.fastcram.ffn_fwd(x, w_in, w_out, glu, True)
    torch.testing.assert_close(h, (x @ w_in.t()).reshape(45, -1), atol=ATOL, rtol=RTOL)
    act = torch.nn.functional.gelu
    a, g = h.chunk(2, dim=-1) if glu else (None, h)
    torch.testing.assert_close(y, act(g) * a if glu else act(h), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out, ffn_mod.ffn_ref(x, w_in, w_out, kind), atol=ATOL, rtol=RTOL)
    out2, h_none, y_none = torch.ops.fastcram.ffn_fwd(x, w_in, w_out, glu, False)
    assert h_none.numel() == 0 and y_none.numel() == 0
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        torch.testing.assert_close(ffn_mod.ffn(x.requires_grad_(), w_in, w_out, kind), out, atol=ATOL, rtol=RTOL)


def test_only_needed_gradients(device):
    kind = "geglu"
    x, w_in, w_out = _inputs(kind, (11,), 16, 12, device)
    for wrt in ((x,), (w_in,), (w_out,), (x, w_out)):
        frozen = [t if any(t is w for w in wrt) else t.detach() for t in (x, w_in, w_out)]
        got = torch.autograd.grad(ffn_mod.ffn(*frozen, kind).sum(), wrt)
        want = torch.autograd.grad(ffn_mod.ffn_ref(*frozen, kind).sum(), wrt)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)


def test_autocast_casts_like_f_linear(device):
    """Under autocast fp32 parameters run the bf16 kernels; weight gradients come back in fp32; the error
    against fp32 is at most twice the reference's own autocast error (the DESIGN bf16 rule)."""
    device_type = "cuda" if device == "cuda" else "cpu"
    kind = "geglu"
    x, w_in, w_out = _inputs(kind, (2, 9), 32, 24, device)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        got, dout = _fwd_bwd(ffn_mod.ffn, x, w_in, w_out, kind)
        autocast_ref, _ = _fwd_bwd(ffn_mod.ffn_ref, x, w_in, w_out, kind, dout)
    want, _ = _fwd_bwd(ffn_mod.ffn_ref, x, w_in, w_out, kind, dout.float())
    assert got[0].dtype == autocast_ref[0].dtype == torch.bfloat16
    assert [g.dtype for g in got[1:]] == [g.dtype for g in autocast_ref[1:]] == [torch.float32] * 3
    for g, a, w in zip(got, autocast_ref, want):
        assert _max_err(g, w) <= 2 * _max_err(a, w) + 1e-3 * w.abs().max().item()


def test_bad_inputs_raise(device):
    x, w_in, w_out = (t.detach() for t in _inputs("geglu", (4,), 16, 8, device))
    with pytest.raises(ValueError, match="kind must be one of"):
        ffn_mod.ffn(x, w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="last dimension"):
        ffn_mod.ffn(x[:, :8], w_in, w_out, "geglu")
    with pytest.raises(ValueError, match=r"gelu: w_in \[F, D\], w_out \[D, F\]\): got w_in \(16, 16\)"):
        ffn_mod.ffn(x, w_in, w_out, "gelu")  # GLU-shaped weights for the classic FFN
    with pytest.raises(ValueError, match="share a dtype"):
        ffn_mod.ffn(x, w_in, w_out.double(), "geglu")
    with pytest.raises(ValueError, match="kind must be one of"):
        ffn_mod.ffn_ref(x, w_in, w_out, "swiglu")


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("d", [16, 13], ids=["descriptors", "pointers"])
def test_opcheck(device, glu, d):
    kind = "geglu" if glu else "gelu"
    x, w_in, w_out = _inputs(kind, (3, 7), d, 8, device)
    torch.library.opcheck(torch.ops.fastcram.ffn_fwd, (x, w_in, w_out, glu, True))
    h = (x @ w_in.t()).detach().reshape(21, -1)
    dout = torch.randn(21, d, device=device)
    torch.library.opcheck(torch.ops.fastcram.ffn_preact_grad, (dout, w_out.detach(), h, glu))


def test_compile_fullgraph_matches_eager(device):
    """No graph break: the custom ops are opaque to inductor; outputs and gradients equal eager."""
    torch._dynamo.reset()
    x, w_in, w_out = _inputs("geglu", (2, 9), 16, 24, device)
    w_in2, w_out2 = _weights("gelu", 16, 24, device)

    def both(x, w_in, w_out, w_in2, w_out2):
        return ffn_mod.ffn(x, w_in, w_out, "geglu") + ffn_mod.ffn(x, w_in2, w_out2, "gelu")

    compiled = torch.compile(both, fullgraph=True)
    args = (x, w_in, w_out, w_in2, w_out2)
    out = compiled(*args)
    dout = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, args, dout))
    eager = both(*args)
    want = (eager, *torch.autograd.grad(eager, args, dout))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_benchmark_bytes_by_construction():
    """The benchmark's bytes column against the traffic of each GEMM listed tensor by tensor, at crammed-bert's
    GLU shape in bf16; the previous backward moved dY [M, 1536] twice more (written, then read back)."""
    from fastcram.benchmarks import cases_ffn

    m, d, n, f, e = 32768, 768, 3072, 1536, 2
    x = dout = dx = m * d
    h = dh = m * n
    y = m * f
    w_in = dw_in = n * d
    w_out = dw_out = d * f
    fwd = (x + w_in + h + y) + (y + w_out + m * d)  # GEMM 1 + epilogue; the down projection
    bwd = (dout + w_out + h + dh) + (dout + y + dw_out) + (dh + w_in + dx) + (dh + x + dw_in)
    case = {c.mode: c for c in cases_ffn.cases(True, "cuda", torch.bfloat16) if c.shape.startswith("geglu:32768")}
    assert (case["fwd"].bytes, case["bwd"].bytes, case["fwd+bwd"].bytes) == (e * fwd, e * bwd, e * (fwd + bwd))
    previous = bwd + 2 * y  # + dY written by its GEMM and read back by the pointwise pass
    assert e * previous - case["bwd"].bytes == 2 * m * 1536 * 2 == cases_ffn.unfused_dy_bytes(m, f, e)


# ---------------------------------------------------------------------------------------------- GPU only
def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead,d", [((2, 2048), 768), ((4, 1031), 768), ((1031,), 767)],
                         ids=["M4096", "M4124", "odd-K"])  # descriptors on Hopper; M not a tile multiple; pointers
def test_bf16_error_within_twice_torch(paths, kind, lead, d):
    """DESIGN rule: error vs an fp32 reference <= 2x PyTorch's own bf16 error + small atol; on Hopper the
    aligned shapes run on tensor descriptors, the odd K on pointers."""
    f = 1536 if kind == "geglu" else 3072
    x32, w_in32, w_out32 = _inputs(kind, lead, d, f, "cuda")
    x16, w_in16, w_out16 = (t.detach().bfloat16().requires_grad_() for t in (x32, w_in32, w_out32))
    got, dout = _fwd_bwd(ffn_mod.ffn, x16, w_in16, w_out16, kind)
    torch16, _ = _fwd_bwd(ffn_mod.ffn_ref, x16, w_in16, w_out16, kind, dout)
    want, _ = _fwd_bwd(ffn_mod.ffn_ref, x32, w_in32, w_out32, kind, dout.float())
    for name, g, t, w in zip(("out", "dx", "dw_in", "dw_out"), got, torch16, want):
        assert g.dtype == torch.bfloat16 and not torch.isnan(g).any(), name
        err, err_torch = _max_err(g, w), _max_err(t, w)
        assert err <= 2 * err_torch + 1e-3 * w.abs().max().item(), (name, err, err_torch)
    assert paths == [_is_hopper() and d % 8 == 0] * 2  # forward, then backward


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_on_gpu_is_not_tf32(kind):
    """fp32 inputs use input_precision="ieee": agreement with cuBLAS fp32 (TF32 off, torch's default) far
    tighter than TF32's ~1e-3 would allow."""
    assert not torch.backends.cuda.matmul.allow_tf32, "the fp32 reference must not use TF32"
    _assert_matches_reference(kind, *_inputs(kind, (517,), 768, 1536), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_compile_fullgraph_on_gpu_under_autocast():
    """The model's setting: fp32 parameters, autocast bf16, torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    x, w_in, w_out = _inputs("geglu", (8, 128), 768, 1536, "cuda")

    def block(x, w_in, w_out, kind):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ffn_mod.ffn(x, w_in, w_out, kind)

    got, dout = _fwd_bwd(torch.compile(block, fullgraph=True), x, w_in, w_out, "geglu")
    want, _ = _fwd_bwd(block, x, w_in, w_out, "geglu", dout)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-2, rtol=1e-2)
