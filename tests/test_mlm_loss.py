"""fastcram.ops.mlm_loss: the sparse-prediction MLM loss against float64 and the reference.

CPU runs use the Triton interpreter (set by conftest.py) with V=1001 and D=24, neither a multiple of any
block, and odd K. Every buffer the op writes is allocated NaN-filled (the `poisoned` fixture), so an element
that a kernel or GEMM fails to write shows up as NaN in the loss or a gradient.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastcram.ops import get_op, get_ops
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


def make_inputs(k, device, dtype=torch.float32, vocab=V, dim=D):
    rows = torch.randn(k, dim, device=device).to(dtype)  # [K, D]
    weight = (2.5 / dim**0.5 * torch.randn(vocab, dim, device=device)).to(dtype)  # [V, D], logits ~ 2.5
    labels = torch.randint(0, vocab, (k,), device=device)  # [K]
    labels[0] = vocab - 1 if k == 1 else 0  # both ends of the vocabulary
    labels[-1] = vocab - 1
    return rows, labels, weight


def float64_reference(rows, labels, weight, grad_scale):
    r = rows.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(r @ w.t(), labels)  # [K, V] logits in float64
    (loss * grad_scale).backward()
    return loss.detach(), r.grad, w.grad


def run_op(fn, rows, labels, weight, grad_scale):
    r = rows.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(r, labels, w)
    (loss * grad_scale).backward()
    return loss.detach(), r.grad, w.grad


def assert_matches(got, want, seed):
    for name, g, r in zip(("loss", "d_rows", "d_weight"), got, want):
        assert torch.isfinite(g).all(), f"{name} has non-finite values (unwritten?) seed={seed}"
        torch.testing.assert_close(g.double(), r, **TOL, msg=lambda m: f"{name} seed={seed}: {m}")


@pytest.mark.parametrize("k", [1, 37, 129])
def test_matches_float64(k, seed, poisoned):
    """K=1, an odd K under 128 (one chunk row at a time) and K=129 (16 rows a chunk + a last row alone)."""
    inputs = make_inputs(k, "cpu")
    grad_scale = 0.5 + torch.rand(()).item()  # upstream gradient != 1
    assert_matches(run_op(mlm_loss, *inputs, grad_scale), float64_reference(*inputs, grad_scale), seed)


@pytest.mark.parametrize("row_chunk,block_v", [(1, 128), (7, 256), (29, None)],
                         ids=["1row-8blocks", "7rows-4blocks-last-short", "whole-K-1block"])
def test_row_chunks_and_blocks(row_chunk, block_v, seed, poisoned):
    """Launcher knobs: rows a chunk (the last chunk shorter) and vocabulary columns a kernel step."""
    rows, labels, weight = make_inputs(29, "cpu")
    loss, d_rows, d_weight = mod._forward(rows, labels, weight, True, True, row_chunk=row_chunk,
                                          block_v=block_v)
    assert_matches((loss, d_rows, d_weight), float64_reference(rows, labels, weight, 1.0), seed)


def test_default_row_chunk_is_half_the_budget():
    """Kc*V*e <= K*V/2 bytes (a quarter of the fp32 logits is K*V bytes); 64-row multiples at real sizes."""
    for k in (1, 7, 129, 1000, 8192, 65536):
        for dtype, e in ((torch.float32, 4), (torch.bfloat16, 2)):
            kc = mod.default_row_chunk(k, dtype)
            assert 1 <= kc <= max(1, k // (2 * e)), (k, dtype, kc)
            assert kc < 128 or kc % 64 == 0, (k, dtype, kc)
    assert mod.default_row_chunk(8192, torch.bfloat16) == 2048  # crammed-bert, micro-batch 256


def test_ignore_index_like_reference(seed, poisoned):
    """Labels equal to -100 are skipped and excluded from the mean, as in the reference."""
    inputs = make_inputs(19, "cpu")
    inputs[1][[2, 5, 11]] = IGNORE_INDEX
    got = run_op(mlm_loss, *inputs, 1.0)
    assert_matches(got, float64_reference(*inputs, 1.0), seed)
    assert (got[1][[2, 5, 11]] == 0).all(), "an ignored row gets no gradient"
    torch.testing.assert_close(got[0], mlm_loss_ref(*inputs), **TOL)


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)],
                         ids=["rows-only", "weight-only", "no-grad"])
def test_only_the_gradients_asked_for(need, seed, poisoned):
    """Each gradient is formed only when its input requires grad; the loss is the same either way."""
    rows, labels, weight = make_inputs(23, "cpu")
    r = rows.clone().requires_grad_(need[0])
    w = weight.clone().requires_grad_(need[1])
    with FlopCounterMode(display=False) as counter:
        loss = mlm_loss(r, labels, w)
        if any(need):
            loss.backward()
    want = float64_reference(rows, labels, weight, 1.0)
    torch.testing.assert_close(loss.double(), want[0], **TOL)
    for t, wanted, g in ((r, need[0], want[1]), (w, need[1], want[2])):
        if wanted:
            torch.testing.assert_close(t.grad.double(), g, **TOL)
        else:
            assert t.grad is None
    assert counter.get_total_flops() == 2 * 23 * V * D * (1 + sum(need))


def test_flop_counter_counts_the_work():
    """FlopCounterMode sees 6*K*V*D with grad (forward op; the backward only scales) and 2*K*V*D without."""
    k = 31
    rows, labels, weight = make_inputs(k, "cpu")
    rows.requires_grad_()
    weight.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(mlm_loss(rows, labels, weight), (rows, weight))
    assert counter.get_total_flops() == 6 * k * V * D
    with FlopCounterMode(display=False) as ref_counter:
        torch.autograd.grad(mlm_loss_ref(rows, labels, weight), (rows, weight))
    assert ref_counter.get_total_flops() == 6 * k * V * D  # the reference's three GEMMs: the same work
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mlm_loss(rows, labels, weight)
    assert counter.get_total_flops() == 2 * k * V * D


def test_model_flops_equal_with_either_backend():
    """The whole model's forward + backward counts the same FLOPs with the decoder loss on either backend."""
    from fastcram.config import ModelConfig
    from fastcram.model import CrammedBert

    cfg = ModelConfig(vocab_size=333, hidden=32, layers=1, heads=2, intermediate=64, seq_len=16)
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))  # [B, L]
    positions = torch.randperm(3 * cfg.seq_len)[:11]  # K = 11 predicted rows
    labels = torch.randint(0, cfg.vocab_size, (11,))
    counts = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = CrammedBert(cfg, get_ops("torch", per_op={"mlm_loss": backend}))
        with FlopCounterMode(display=False) as counter:
            model(ids, positions, labels).backward()
        counts[backend] = counter.get_total_flops()
    assert counts["triton"] == counts["torch"] > 6 * 11 * cfg.vocab_size * cfg.hidden


def test_out_of_range_labels_raise_on_cpu():
    rows, labels, weight = make_inputs(4, "cpu")
    for bad_label in (V, -1):
        with pytest.raises(ValueError, match="labels must lie"):
            mlm_loss(rows, torch.full_like(labels, bad_label), weight)


def test_bad_arguments_raise():
    rows, labels, weight = make_inputs(4, "cpu")
    cases = [
        (rows.unsqueeze(0), labels, weight, "must be \\[K, D\\]"),
        (rows, labels, weight[:, :-1], "D="),
        (rows, labels, weight.bfloat16(), "one dtype"),
        (rows.half(), labels, weight.half(), "one dtype"),
        (rows[:0], labels[:0], weight, "non-empty"),
        (rows, labels[:-1], weight, "one length"),
        (rows, labels.float(), weight, "int32 or int64"),
    ]
    for r, lab, w, match in cases:
        with pytest.raises(ValueError, match=match):
            mod._forward(r, lab, w, True, True)


def test_second_backward_raises():
    """The backward scales the stored gradients in place, so a second pass must fail loudly, not double."""
    rows, labels, weight = make_inputs(5, "cpu")
    loss = mlm_loss(rows.requires_grad_(), labels, weight.requires_grad_())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_opcheck():
    rows, labels, weight = make_inputs(11, "cpu")
    op = torch.ops.fastcram.mlm_loss_fwd.default
    torch.library.opcheck(op, (rows, labels, weight, False, False))
    # With gradients, the backward scales the op's own gradient outputs in place. That is sound only because
    # the public function never hands them out; AOTAutograd cannot partition a graph that also returns them
    # to the caller, which is what opcheck's aot_dispatch test builds. The compiled public function is
    # tested below instead (test_compile_fullgraph_matches_eager).
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(op, (rows.clone().requires_grad_(need[0]), labels,
                                   weight.clone().requires_grad_(need[1]), *need),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    _, d_rows, d_weight = mod._forward(rows, labels, weight, True, True)
    torch.library.opcheck(torch.ops.fastcram.mlm_loss_scale_.default, (torch.tensor(0.8), d_rows, d_weight))


def test_compile_fullgraph_matches_eager():
    inputs = make_inputs(7, "cpu")
    compiled = torch.compile(mlm_loss, fullgraph=True, dynamic=False)  # a graph break raises here
    for scale in (1.0, 0.6):
        torch.testing.assert_close(run_op(compiled, *inputs, scale), run_op(mlm_loss, *inputs, scale), **TOL)
    with torch.no_grad():  # the evaluation path compiles too
        torch.testing.assert_close(compiled(*inputs), mlm_loss(*inputs), **TOL)


def test_ops_bundle_takes_the_public_function():
    assert get_op("mlm_loss", "triton") is mlm_loss
    assert get_op("mlm_loss", "torch") is mlm_loss_ref


# ------------------------------------------------------------------------------------------ peak memory
def peak_allocated_bytes(fn):
    """(result, peak bytes that torch's CPU allocator held during fn beyond what it held before).

    From torch.profiler's allocation events. Frees of blocks allocated before fn (the Triton interpreter
    keeps the previous launch's arguments alive until the next launch) are not subtracted, so the figure
    can only be too high, never too low."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr))
        stack.extend(e.children)
    mine, live, peak = set(), 0, 0
    for _, size, ptr in sorted(events):
        if size > 0:
            mine.add(ptr)
        elif ptr not in mine:
            continue
        else:
            mine.discard(ptr)
        live += size
        peak = max(peak, live)
    return out, peak


def test_peak_extra_memory_at_most_a_quarter_of_the_fp32_logits():
    """K >= 4*D: beyond the inputs, the loss and the returned gradients, forward + backward hold at most
    K*V bytes (a quarter of the fp32 [K, V] logits). The reference, measured the same way, holds several
    times the logits, which shows the measurement sees them."""
    k, vocab, dim = 4 * 16 + 3, 517, 16
    rows, labels, weight = make_inputs(k, "cpu", vocab=vocab, dim=dim)
    rows.requires_grad_()
    weight.requires_grad_()
    budget = k * vocab  # bytes: a quarter of 4*K*V
    extra = {}
    for name, fn in (("op", mlm_loss), ("reference", mlm_loss_ref)):
        fn(rows, labels, weight)  # warm up (first-call caches)
        grads, peak = peak_allocated_bytes(lambda: torch.autograd.grad(fn(rows, labels, weight), (rows, weight)))
        assert all(torch.isfinite(g).all() for g in grads)
        extra[name] = peak - sum(g.numel() * g.element_size() for g in grads)
    assert extra["op"] <= budget, f"op holds {extra['op']} bytes > {budget} (a quarter of the fp32 logits)"
    assert extra["reference"] >= 4 * budget, extra  # the logits and their gradient, at least


# ------------------------------------------------------------------------------------------ previous design
def test_previous_design_matches_float64(seed):
    """The benchmark-only previous design (fastcram/benchmarks/mlm_loss_previous.py) stays correct while kept."""
    from fastcram.benchmarks.mlm_loss_previous import mlm_loss_previous

    inputs = make_inputs(21, "cpu")
    assert_matches(run_op(mlm_loss_previous, *inputs, 1.3), float64_reference(*inputs, 1.3), seed)


# ------------------------------------------------------------------------------------------------- GPU
def bf16_errors(inputs, use_autocast):
    """max |error| against float64 of (loss, d_rows, d_weight) for the op and for PyTorch in bf16."""
    want = float64_reference(*inputs, 1.0)
    errors = {}
    for name, fn in (("op", mlm_loss), ("torch", mlm_loss_ref)):
        rows, labels, weight = inputs
        dtype = torch.float32 if use_autocast else torch.bfloat16
        r = rows.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss = fn(r, labels, w)
        loss.backward()
        assert r.grad.dtype == dtype and w.grad.dtype == dtype
        errors[name] = [(g.double() - ref).abs().max().item() for g, ref in zip((loss, r.grad, w.grad), want)]
    scale = [ref.abs().max().item() for ref in want]
    return errors, scale


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,dim,k", [(32768, 768, 8192), (30011, 200, 509)])
@pytest.mark.parametrize("use_autocast", [False, True], ids=["bf16", "autocast"])
def test_gpu_bf16_error_at_most_twice_torch(vocab, dim, k, use_autocast):
    # inputs rounded to bf16 first, so both sides see the same values and only the arithmetic differs
    inputs = make_inputs(k, "cuda", torch.bfloat16, vocab=vocab, dim=dim)
    errors, scale = bf16_errors([t.float() if t.is_floating_point() else t for t in inputs], use_autocast)
    for i, name in enumerate(("loss", "d_rows", "d_weight")):
        ours, theirs = errors["op"][i], errors["torch"][i]
        assert ours <= 2 * theirs + 1e-3 * scale[i], f"{name}: op {ours:.3g} vs torch {theirs:.3g}"


@pytest.mark.gpu
def test_gpu_fp32_matches_float64(seed):
    inputs = make_inputs(211, "cuda")
    got = run_op(mlm_loss, *inputs, 1.3)
    assert_matches(got, float64_reference(*inputs, 1.3), seed)


@pytest.mark.gpu
def test_gpu_deterministic_and_compiled_under_autocast():
    """Bit-identical run to run; the compiled op under autocast equals the eager one."""
    rows, labels, weight = make_inputs(1024, "cuda", vocab=32768, dim=768)
    compiled = torch.compile(mlm_loss, fullgraph=True, dynamic=False)
    results = []
    for fn in (mlm_loss, mlm_loss, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(run_op(fn, rows, labels, weight, 0.7))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b), "two eager runs differ"
    for a, b in zip(results[0], results[2]):
        torch.testing.assert_close(a, b)  # same kernels on the same bf16 casts


@pytest.mark.gpu
def test_gpu_peak_memory_at_most_a_quarter_of_fp32_logits():
    """crammed-bert's shape in bf16: every byte beyond inputs and returned gradients counted, the fp32
    d_weight accumulator included."""
    k, vocab, dim = 8192, 32768, 768
    rows, labels, weight = make_inputs(k, "cuda", torch.bfloat16, vocab=vocab, dim=dim)
    rows.requires_grad_()
    weight.requires_grad_()

    def step():
        return torch.autograd.grad(mlm_loss(rows, labels, weight), (rows, weight))

    step()  # first-call compilation allocates scratch; measure the second call
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(g.numel() * g.element_size() for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert extra <= k * vocab, f"peak extra {extra / 2**20:.0f} MiB > fp32 logits / 4"
