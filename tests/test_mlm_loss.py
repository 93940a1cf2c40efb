"""fastcram.ops.mlm_loss: the Triton sparse-prediction MLM loss against float64 and the reference.

CPU runs use the Triton interpreter (set by conftest.py) with V=1001 and D=24, neither a multiple of any
tile. Every kernel-written buffer is allocated NaN-filled (the `poisoned` fixture), so an element that a
kernel fails to write shows up as NaN in the loss or a gradient.
"""
import pytest
import torch
import torch.nn.functional as F

from fastcram.ops import get_op
from fastcram.ops import mlm_loss as mod
from fastcram.ops.mlm_loss import IGNORE_INDEX, mlm_loss, mlm_loss_ref

pytestmark = pytest.mark.skipif(not mod.HAVE_TRITON, reason="triton is not installed")

V, D = 1001, 24
TOL = dict(rtol=1e-5, atol=1e-5)  # DESIGN: fp32 against the reference


@pytest.fixture
def seed() -> int:
    return torch.seed()  # fresh inputs each run; the value is printed on failure


@pytest.fixture
def poisoned(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mod, "_empty", nan_empty)


def make_inputs(n, k, device, dtype=torch.float32, vocab=V, dim=D, repeat=False):
    hidden = torch.randn(n, dim, device=device).to(dtype)  # [N, D]
    weight = (2.5 / dim**0.5 * torch.randn(vocab, dim, device=device)).to(dtype)  # [V, D], logits ~ 2.5
    if repeat:  # every row predicted more than once on average, and row 0 at least twice
        positions = torch.randint(0, n, (k,), device=device)
        positions[: min(k, 3)] = 0
    else:
        positions = torch.randperm(n, device=device)[:k]
    labels = torch.randint(0, vocab, (k,), device=device)
    labels[0] = vocab - 1 if k == 1 else 0  # both ends of the vocabulary
    labels[-1] = vocab - 1
    return hidden, positions, labels, weight


def float64_reference(hidden, positions, labels, weight, grad_scale):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h[positions] @ w.t(), labels)  # [K, V] logits in float64
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def gathered(fn):
    """The op's public form takes the K predicted rows; the tests keep hidden states + positions."""
    return lambda hidden, positions, labels, weight: fn(hidden.index_select(0, positions), labels, weight)


def run_triton(hidden, positions, labels, weight, grad_scale):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = gathered(mlm_loss)(h, positions, labels, w)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def assert_matches(got, want, seed):
    for name, g, r in zip(("loss", "d_hidden", "d_weight"), got, want):
        assert torch.isfinite(g).all(), f"{name} has non-finite values (unwritten?) seed={seed}"
        torch.testing.assert_close(g.double(), r, **TOL, msg=lambda m: f"{name} seed={seed}: {m}")


@pytest.mark.parametrize("n,k,repeat", [(13, 1, False), (37, 37, False), (45, 29, False), (20, 33, True)],
                         ids=["K=1", "K=N", "K<N", "repeated-positions"])
def test_matches_float64(n, k, repeat, seed, poisoned):
    inputs = make_inputs(n, k, "cpu", repeat=repeat)
    grad_scale = 0.5 + torch.rand(()).item()  # upstream gradient != 1
    got = run_triton(*inputs, grad_scale)
    assert_matches(got, float64_reference(*inputs, grad_scale), seed)
    unpredicted = torch.ones(n, dtype=torch.bool)
    unpredicted[inputs[1]] = False
    assert (got[1][unpredicted] == 0).all(), "rows that are not predicted must get zero gradient"


@pytest.mark.parametrize("splits,v_chunk", [(1, V), (3, 256), (64, 100)],
                         ids=["1split-1chunk", "3splits-4chunks", "empty-splits-11chunks"])
def test_splits_and_chunks(splits, v_chunk, seed, poisoned):
    """Launcher knobs: vocabulary splits in the forward (some empty) and vocabulary chunks in backward."""
    hidden, positions, labels, weight = make_inputs(30, 21, "cpu")
    grad_scale = torch.tensor(1.7)
    loss, lse = mod._forward(hidden, positions, labels, weight, num_splits=splits)
    d_hidden, d_weight = mod._backward(grad_scale, hidden, positions, labels, weight, lse, v_chunk=v_chunk)
    want = float64_reference(hidden, positions, labels, weight, grad_scale)
    assert_matches((loss, d_hidden, d_weight), want, seed)
    lse_ref = torch.logsumexp(hidden.double()[positions] @ weight.double().t(), dim=1)
    torch.testing.assert_close(lse.double(), lse_ref, **TOL)


def test_ignore_index_like_reference(seed, poisoned):
    """Labels equal to -100 are skipped and excluded from the mean, as in the reference."""
    inputs = make_inputs(25, 19, "cpu")
    inputs[2][[2, 5, 11]] = IGNORE_INDEX
    got = run_triton(*inputs, 1.0)
    assert_matches(got, float64_reference(*inputs, 1.0), seed)
    hidden, positions, labels, weight = inputs
    torch.testing.assert_close(got[0], mlm_loss_ref(hidden[positions], labels, weight), **TOL)


def test_out_of_range_values_raise_on_cpu():
    hidden, positions, labels, weight = make_inputs(10, 4, "cpu")
    for bad_label in (V, -1):
        with pytest.raises(ValueError, match="labels must lie"):
            mlm_loss(hidden[positions], torch.full_like(labels, bad_label), weight)
    with pytest.raises(ValueError, match="positions must lie"):
        mod._forward(hidden, torch.full_like(positions, 10), labels, weight)


def test_bad_arguments_raise():
    hidden, positions, labels, weight = make_inputs(10, 4, "cpu")
    cases = [
        (hidden.unsqueeze(0), positions, labels, weight, "must be \\[N, D\\]"),
        (hidden, positions, labels, weight[:, :-1], "D="),
        (hidden, positions, labels, weight.bfloat16(), "one dtype"),
        (hidden.half(), positions, labels, weight.half(), "one dtype"),
        (hidden, positions[:0], labels[:0], weight, "non-empty"),
        (hidden, positions, labels[:-1], weight, "one length"),
        (hidden, positions.float(), labels, weight, "int32 or int64"),
    ]
    for h, p, lab, w, match in cases:
        with pytest.raises(ValueError, match=match):
            mod._forward(h, p, lab, w)


def test_opcheck():
    hidden, positions, labels, weight = make_inputs(11, 6, "cpu")
    torch.library.opcheck(torch.ops.fastcram.mlm_loss_fwd.default,
                          (hidden.requires_grad_(), positions, labels, weight.requires_grad_()))
    _, lse = mod._forward(hidden.detach(), positions, labels, weight.detach())
    torch.library.opcheck(torch.ops.fastcram.mlm_loss_bwd.default,
                          (torch.tensor(0.8), hidden.detach(), positions, labels, weight.detach(), lse))


def test_compile_fullgraph_matches_eager():
    inputs = make_inputs(16, 7, "cpu")
    compiled = gathered(torch.compile(mlm_loss, fullgraph=True, dynamic=False))  # a graph break raises here
    got = run_triton(*inputs, 1.0)
    h = inputs[0].clone().requires_grad_()
    w = inputs[3].clone().requires_grad_()
    loss = compiled(h, inputs[1], inputs[2], w)
    loss.backward()
    for a, b in zip((loss.detach(), h.grad, w.grad), got):
        torch.testing.assert_close(a, b, **TOL)


def test_ops_bundle_takes_the_public_function():
    assert get_op("mlm_loss", "triton") is mlm_loss
    assert get_op("mlm_loss", "torch") is mlm_loss_ref


# ------------------------------------------------------------------------------------------------- GPU
def bf16_errors(inputs, use_autocast):
    """max |error| against float64 of (loss, d_hidden, d_weight) for triton and for PyTorch in bf16."""
    want = float64_reference(*inputs, 1.0)
    errors = {}
    for name, fn in (("triton", gathered(mlm_loss)), ("torch", gathered(mlm_loss_ref))):
        hidden, positions, labels, weight = inputs
        dtype = torch.float32 if use_autocast else torch.bfloat16
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss = fn(h, positions, labels, w)
        loss.backward()
        assert h.grad.dtype == dtype and w.grad.dtype == dtype
        errors[name] = [(g.double() - r).abs().max().item() for g, r in zip((loss, h.grad, w.grad), want)]
    scale = [r.abs().max().item() for r in want]
    return errors, scale


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,dim", [(32768, 768), (30011, 200)])
@pytest.mark.parametrize("use_autocast", [False, True], ids=["bf16", "autocast"])
def test_gpu_bf16_error_at_most_twice_torch(vocab, dim, use_autocast):
    # inputs rounded to bf16 first, so both sides see the same values and only the arithmetic differs
    inputs = make_inputs(2048, 509, "cuda", torch.bfloat16, vocab=vocab, dim=dim)
    errors, scale = bf16_errors([t.float() if t.is_floating_point() else t for t in inputs], use_autocast)
    for i, name in enumerate(("loss", "d_hidden", "d_weight")):
        ours, theirs = errors["triton"][i], errors["torch"][i]
        assert ours <= 2 * theirs + 1e-3 * scale[i], f"{name}: triton {ours:.3g} vs torch {theirs:.3g}"


@pytest.mark.gpu
def test_gpu_fp32_matches_float64(seed):
    inputs = make_inputs(300, 211, "cuda")
    assert_matches(run_triton(*inputs, 1.3), float64_reference(*inputs, 1.3), seed)


@pytest.mark.gpu
def test_gpu_compile_under_autocast_matches_eager():
    hidden, positions, labels, weight = make_inputs(1024, 256, "cuda", vocab=32768, dim=768)
    compiled = gathered(torch.compile(mlm_loss, fullgraph=True, dynamic=False))
    results = []
    for fn in (gathered(mlm_loss), compiled):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, positions, labels, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)  # same kernels on the same bf16 casts


@pytest.mark.gpu
def test_gpu_peak_memory_below_quarter_of_fp32_logits():
    k, vocab, dim = 16384, 32768, 768
    hidden, positions, labels, weight = make_inputs(4 * k, k, "cuda", torch.bfloat16, vocab=vocab, dim=dim)
    hidden.requires_grad_()
    weight.requires_grad_()

    def step():
        return torch.autograd.grad(gathered(mlm_loss)(hidden, positions, labels, weight), (hidden, weight))

    step()  # autotuning allocates scratch; measure the second call
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert all(torch.isfinite(g).all() for g in grads)
    assert extra <= k * vocab, f"peak extra {extra / 2**20:.0f} MiB > fp32 logits / 4"
