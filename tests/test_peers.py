"""The peers in the benchmarks (fastcram/benchmarks/peers.py, peer_check.py, liger_ops.py): every peer without
its library is unavailable with the reason; a peer is checked against the reference before it is timed and
a disagreeing one is reported, never timed; Liger-Kernel's fused linear cross-entropy is checked in the
Triton interpreter (its LayerNorm and GEGLU kernels do not run there: they are checked on a GPU before
timing); fastcram's time as a ratio to the best peer, for kernels and for the step. No timing is asserted."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from fastcram.benchmarks import cases_ffn, cases_layer_norm, cases_mlm_loss, kernels, peer_check, peers, step
from fastcram.benchmarks.case import Case, Disagrees, rotating
from fastcram.benchmarks.ceilings import Ceilings
from fastcram.ops.ffn import ffn_ref
from fastcram.ops.mlm_loss import mlm_loss_ref

CEIL = Ceilings(copy_gbps=5.0, matmul_tflops=0.05, matmul_dtype="fp32", how="fixed for tests")
HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None
PEERS = ("apex", "liger", "quack", f"liger({peers.TANH})", f"apex({peers.TANH})")
LIBRARIES = {"liger_kernel": "Liger-Kernel", "quack": "QuACK", "apex": "apex"}


@pytest.fixture(autouse=True)
def fresh_verdicts():
    peer_check.forget()  # each test checks anew
    yield
    peer_check.forget()


def hide_libraries(monkeypatch, names=tuple(LIBRARIES)) -> None:
    """Make the peers' libraries (and anything already imported from them) unimportable."""
    for name in list(sys.modules):
        if any(name == n or name.startswith(n + ".") for n in names) or name == "fastcram.benchmarks.liger_ops":
            monkeypatch.delitem(sys.modules, name, raising=False)
    for n in names:
        monkeypatch.setitem(sys.modules, n, None)  # import raises ImportError, as if not installed


def settings(device: str, **kw) -> kernels.Settings:
    return kernels.Settings(**{"device": device, "dtype": torch.float32, "quick": True, "compile": False, **kw})


# ---------------------------------------------------------------- unavailable, with the reason

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_peer_without_its_library_is_unavailable_with_the_reason(monkeypatch, device):
    """With none of the libraries, every peer row of every case says which library is missing and how to get
    it, on the CPU and (as a GPU machine without them would) on "cuda": the import is tried first, so
    nothing is allocated on a device this machine lacks."""
    hide_libraries(monkeypatch)
    cases, _ = kernels.collect_cases(settings(device))
    seen = set()
    for case in cases:
        for provider in case.providers:
            if provider not in PEERS:
                continue
            row = kernels.measure_provider(case, provider, settings(device), CEIL, {})
            assert row.status.startswith("unavailable: "), (case.op, provider, row.status)
            assert row.time_ms is None and row.role == "peer"
            covered = not ((provider.startswith("liger(") and case.shape.startswith("gelu:"))
                           or (provider.startswith("apex(") and case.shape.startswith("geglu:")))
            if covered and not (provider == "apex" and device == "cpu"):
                library = next(v for k, v in LIBRARIES.items() if provider.startswith(k.split("_")[0]))
                assert "not importable" in row.status and library in row.status, row.status
            seen.add(provider)
    assert seen == set(PEERS)


def test_peer_reasons_name_the_fix_and_the_case_they_do_not_cover(monkeypatch):
    hide_libraries(monkeypatch)
    with pytest.raises(peers.Unavailable, match="tools/fetch_wheels.sh"):
        peers.liger_mlm_loss("cpu")
    with pytest.raises(peers.Unavailable, match="CUTLASS DSL"):
        peers.quack_mlm_loss("cuda")
    with pytest.raises(peers.Unavailable, match="no wheel"):
        peers.apex_ffn("gelu", "cuda")
    with pytest.raises(peers.Unavailable, match="no kernel for the classic GELU FFN"):
        peers.liger_ffn("gelu", "cuda")  # what a peer does not cover is said before the library is needed
    with pytest.raises(peers.Unavailable, match="no fused GEGLU"):
        peers.apex_ffn("geglu", "cuda")


def test_liger_step_variant_without_liger_is_unavailable(monkeypatch, tmp_path):
    hide_libraries(monkeypatch, ("liger_kernel",))
    s = step.StepSettings(preset="tiny", device="cpu", micro_batch=2, steps=1, warmup=1, repeats=1, compile=False,
                          variants=("liger",))
    (row,) = step.run(s, str(tmp_path / "step.csv"), log=open(os.devnull, "w"))
    assert row.variant == "fastcram+liger" and row.role == "peer"
    assert row.status.startswith("unavailable: Liger-Kernel is not importable here") and "fetch_wheels" in row.status


# ---------------------------------------------------------------- the output check

def _ffn_inputs(m=37, d=24, f=20, glu=True):
    x = torch.randn(m, d, requires_grad=True)
    w_in = (torch.randn(2 * f if glu else f, d) * d ** -0.5).requires_grad_()
    w_out = (torch.randn(d, f) * f ** -0.5).requires_grad_()
    return [x, w_in, w_out]


def test_check_agrees_with_the_same_math_and_catches_tanh_for_erf():
    """A differently written but equal FFN agrees; GELU's tanh approximation disagrees with the exact erf
    reference (which is why the tanh peers are checked against the tanh reference)."""
    inputs = _ffn_inputs()

    def same(x, w_in, w_out):  # the GLU with the halves computed by two GEMMs, as the Liger provider does
        f = w_in.shape[0] // 2
        return F.linear(F.gelu(F.linear(x, w_in[f:])) * F.linear(x, w_in[:f]), w_out)

    assert peer_check.compare(same, lambda *t: ffn_ref(*t, "geglu"), inputs, grad=True).startswith("agrees")
    tanh = lambda *t: peers.ffn_tanh_ref(*t, "geglu")  # noqa: E731
    assert peer_check.compare(tanh, tanh, inputs, grad=True).startswith("agrees")
    with pytest.raises(Disagrees, match="max error"):
        peer_check.compare(tanh, lambda *t: ffn_ref(*t, "geglu"), inputs, grad=True)


def test_check_catches_a_wrong_gradient_and_a_wrong_shape():
    class WrongGrad(torch.autograd.Function):
        """LayerNorm forward, but the input's gradient off by 1%."""

        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w, b)
            return F.layer_norm(x, (x.shape[-1],), w, b, 1e-12)

        @staticmethod
        def backward(ctx, dy):
            x, w, b = ctx.saved_tensors
            with torch.enable_grad():
                xx, ww, bb = (t.detach().requires_grad_() for t in (x, w, b))
                dx, dw, db = torch.autograd.grad(F.layer_norm(xx, (x.shape[-1],), ww, bb, 1e-12), (xx, ww, bb), dy)
            return dx * 1.01, dw, db

    inputs = cases_layer_norm.make_inputs("layer_norm", 53, 47, "cpu", torch.float32, requires_grad=True)
    ref = cases_layer_norm.ref_fn("layer_norm")
    assert peer_check.compare(lambda x, w, b: (WrongGrad.apply(x, w, b),), ref, inputs, grad=False).startswith(
        "agrees (outputs")  # the forward alone is right
    with pytest.raises(Disagrees, match="grad of input 0"):
        peer_check.compare(lambda x, w, b: (WrongGrad.apply(x, w, b),), ref, inputs, grad=True)
    with pytest.raises(Disagrees, match="shape"):
        peer_check.compare(lambda x, w, b: (ref(x, w, b)[0][:-1],), ref, inputs, grad=False)
    with pytest.raises(Disagrees):  # NaN never passes
        peer_check.compare(lambda x, w, b: (ref(x, w, b)[0] * float("nan"),), ref, inputs, grad=False)


def test_gradients_far_below_one_are_not_passed_by_zeros():
    """The MLM loss's gradients are ~1e-4: an allowance of 2e-3 x max(1, |ref|) in bf16 would pass a peer that
    returns zeros. The bound is at most half the tensor's own size (unless PyTorch's own error is larger)."""
    class ZeroGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rows, labels, weight):
            ctx.shapes = rows.shape, weight.shape
            return mlm_loss_ref(rows, labels, weight)

        @staticmethod
        def backward(ctx, dloss):
            rows_shape, weight_shape = ctx.shapes
            return dloss.new_zeros(rows_shape), None, dloss.new_zeros(weight_shape)

    rows = torch.randn(257, 48, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1031, (257,))
    weight = (0.02 * torch.randn(1031, 48, dtype=torch.bfloat16)).requires_grad_()
    inputs = [rows, labels, weight]
    with pytest.raises(Disagrees, match="grad of input 0"):
        peer_check.compare(ZeroGrad.apply, mlm_loss_ref, inputs, grad=True)
    assert peer_check.compare(mlm_loss_ref, mlm_loss_ref, inputs, grad=True).startswith("agrees")


def test_a_disagreeing_peer_is_reported_and_never_timed():
    """The runner: a peer whose check fails gets a "disagrees" row with no time, and is no best peer."""
    rows_n, n = 61, 29
    calls = {"timed": 0}

    def wrong_peer_setup():
        def wrong(x, w, b):
            return (F.layer_norm(x, (n,), w, b, 1e-12) + 1e-3,)

        fn, verdict = peers.checked("liger", ("t", rows_n), lambda: wrong, cases_layer_norm.ref_fn("layer_norm"),
                                    lambda: cases_layer_norm.make_inputs("layer_norm", rows_n, n, "cpu",
                                                                         torch.float32, True), grad=True)
        calls["timed"] += 1  # never reached
        return peers.with_check(rotating(fn, []), verdict)

    def torch_setup():
        sets = [cases_layer_norm.make_inputs("layer_norm", rows_n, n, "cpu", torch.float32, False)]
        return rotating(cases_layer_norm.ref_fn("layer_norm"), sets)

    case = Case(op="layer_norm", mode="fwd", shape=f"{rows_n}x{n}", dtype="fp32", bound="memory", bytes=1,
                flops=1, providers={"torch": torch_setup, "quack": wrong_peer_setup})
    rows = [kernels.measure_provider(case, p, settings("cpu", quick=False), CEIL, {}) for p in case.providers]
    kernels.add_speedups(rows)
    tor, bad = rows
    assert bad.status.startswith("disagrees: output 0: max error") and bad.time_ms is None
    assert bad.check == "disagrees" and calls["timed"] == 0
    assert tor.status == "ok" and tor.role == "peer"


def test_best_peer_ratio_counts_only_timed_peers():
    """Only peers timed after their output check agreed (or the eager reference itself) can be the best peer:
    a faster peer row without a verdict does not count."""
    agrees = "agrees (outputs and gradients; worst output 0 at 0.10 of its bound)"

    def row(provider, t, status="ok", check=""):
        return kernels.Row("ffn", provider, "fwd", "s", "bf16", status, time_ms=t, role=kernels.role(provider),
                           check=check)

    rows = [row("triton", 2.0), row("triton(row_chunk=K/2)", 0.5), row("cuda", 0.1), row("torch", 4.0),
            row("torch.compile", 3.0, check=agrees), row("liger", None, "disagrees: output 0", "disagrees"),
            row("quack", 2.5, check=agrees), row("apex", None, "unavailable: apex runs on CUDA only"),
            row("linear_cross_entropy", 1.0)]  # timed, but never checked
    kernels.add_speedups(rows)
    head = rows[0]
    assert (head.role, head.best_peer, head.vs_best_peer) == ("fastcram", "quack", pytest.approx(2.0 / 2.5))
    assert all(r.vs_best_peer is None for r in rows[1:])
    assert [kernels.role(p) for p in ("triton", "triton(previous design)", "cuda", "liger(gelu=tanh)",
                                      "torch.compile", "linear_cross_entropy")] == [
        "fastcram", "own", "own", "peer", "peer", "peer"]
    table = kernels.table_cells(rows)
    assert table[0][10] == "0.80 (quack)"
    only_reference = [row("triton", 2.0), row("torch", 4.0), row("torch.compile", 1.0)]  # the compile unchecked
    kernels.add_speedups(only_reference)
    assert (only_reference[0].best_peer, only_reference[0].vs_best_peer) == ("torch", pytest.approx(0.5))


# ---------------------------------------------------------------- every peer is checked before it is timed

CHECKED_PEERS = {"torch.compile", "torch.compile-max-autotune", "cublas+compiled-epilogue", "linear_cross_entropy",
                 *PEERS}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_peer_but_the_reference_goes_through_the_output_check(monkeypatch, device):
    """Every provider of every case that counts toward vs_best_peer (role "peer"), except the eager reference
    it is checked against, sets up through peers.checked under its own name, before anything is built or
    compiled (the stand-in check refuses, so nothing is allocated on a device this machine lacks)."""
    calls = []

    def refuse(name, key, make_peer, reference, make_inputs, grad):
        calls.append(name)
        raise peers.Unavailable("stand-in check")

    monkeypatch.setattr(peers, "checked", refuse)
    cases, _ = kernels.collect_cases(settings(device, quick=False))
    assert {c.op for c in cases} == set(kernels.ALL_OPS)
    seen = set()
    for case in cases:
        for provider in case.providers:
            if kernels.role(provider) != "peer" or provider == kernels.REFERENCE:
                continue
            calls.clear()
            with pytest.raises(peers.Unavailable, match="stand-in check"):
                case.providers[provider]()
            assert calls == [provider], (case.op, case.shape, provider)
            seen.add(provider)
    assert seen == CHECKED_PEERS


def _lce_case(mode: str, monkeypatch):
    monkeypatch.setattr(cases_mlm_loss, "V", 997)
    monkeypatch.setattr(cases_mlm_loss, "D", 40)
    return cases_mlm_loss._case(29, mode, "cpu", torch.float32)


needs_lce = pytest.mark.skipif(getattr(torch.nn, "LinearCrossEntropyOptions", None) is None,
                               reason=f"torch {torch.__version__} has no chunked F.linear_cross_entropy")


@needs_lce
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_linear_cross_entropy_is_checked_then_timed(monkeypatch, mode):
    """PyTorch's chunked linear cross-entropy agrees with the reference on the CPU (fp32, odd sizes) and is timed
    with its verdict in the row; with a wrong loss (labels off by one) it disagrees and is not timed; with a
    wrong gradient (none for the rows) its forward still agrees, and fwd+bwd catches the gradient."""
    real = F.linear_cross_entropy
    run = settings("cpu", quick=False)
    row = kernels.measure_provider(_lce_case(mode, monkeypatch), "linear_cross_entropy", run, CEIL, {})
    assert row.status == "ok" and row.time_ms > 0, row.status
    assert row.check.startswith("agrees (outputs and gradients" if mode == "fwd+bwd" else "agrees (outputs;")

    def shifted(input, linear_weight, target, *, options=None):
        return real(input, linear_weight, (target + 1) % linear_weight.shape[0], options=options)

    def no_row_grad(input, linear_weight, target, *, options=None):
        return real(input.detach(), linear_weight, target, options=options)

    peer_check.forget()
    monkeypatch.setattr(F, "linear_cross_entropy", shifted)
    row = kernels.measure_provider(_lce_case(mode, monkeypatch), "linear_cross_entropy", run, CEIL, {})
    assert row.status.startswith("disagrees: output 0: max error") and row.time_ms is None
    assert row.check == "disagrees"

    peer_check.forget()
    monkeypatch.setattr(F, "linear_cross_entropy", no_row_grad)
    row = kernels.measure_provider(_lce_case(mode, monkeypatch), "linear_cross_entropy", run, CEIL, {})
    if mode == "fwd":
        assert row.status == "ok" and row.check.startswith("agrees (outputs;")
    else:
        assert row.status.startswith("disagrees: grad of input 0: max error") and row.time_ms is None


def _small_case(op: str, mode: str, monkeypatch) -> Case:
    """One case of `op` at odd, CPU-sized shapes, built by its cases file."""
    if op == "ffn":
        monkeypatch.setattr(cases_ffn, "D_MODEL", 24)
        monkeypatch.setattr(cases_ffn, "N_IN", 38)
        return cases_ffn._case("geglu", 37, mode, "cpu", torch.float32)
    if op == "mlm_loss":
        return _lce_case(mode, monkeypatch)
    return Case(op=op, mode=mode, shape="53x47", dtype="fp32", bound="memory", bytes=1, flops=1,
                providers=cases_layer_norm.providers(op, mode, 53, 47, "cpu", torch.float32))


COMPILED = [("layer_norm", "torch.compile"), ("add_layer_norm", "torch.compile"), ("ffn", "torch.compile"),
            ("ffn", "cublas+compiled-epilogue"), ("mlm_loss", "torch.compile")]


@pytest.mark.parametrize("op,provider", COMPILED)
def test_compiled_peers_are_checked_then_timed(monkeypatch, op, provider):
    """The compiled peers (inductor on the CPU, small odd shapes) agree with the reference, outputs and
    gradients, and are timed with the verdict in their row."""
    row = kernels.measure_provider(_small_case(op, "fwd+bwd", monkeypatch), provider,
                                   settings("cpu", quick=False, compile=True), CEIL, {})
    assert row.status == "ok" and row.time_ms > 0, row.status
    assert row.check.startswith("agrees (outputs and gradients"), row.check


def _off_by_a_little(out):
    return tuple(o * 1.001 for o in out) if isinstance(out, (tuple, list)) else out * 1.001


@pytest.mark.parametrize("op,provider", COMPILED)
def test_a_wrong_compiled_peer_disagrees_and_is_not_timed(monkeypatch, op, provider):
    """A compiler that returned a wrong function (outputs 0.1% off), or for cublas+compiled-epilogue a GLU
    epilogue with its halves swapped, is reported as disagreeing, never timed, and is no best peer."""
    if provider == "cublas+compiled-epilogue":
        monkeypatch.setattr(cases_ffn, "_glu_epilogue", lambda h: F.gelu(h.chunk(2, dim=-1)[0]) * h.chunk(2, -1)[1])
    else:
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a: _off_by_a_little(fn(*a))))
    case = _small_case(op, "fwd", monkeypatch)
    run = settings("cpu", quick=False, compile=True)
    head = kernels.Row(op, "triton", "fwd", case.shape, "fp32", "ok", time_ms=1.0, role="fastcram")
    tor, bad = (kernels.measure_provider(case, p, run, CEIL, {}) for p in ("torch", provider))
    kernels.add_speedups([head, tor, bad])
    assert bad.status.startswith("disagrees: output 0: max error") and bad.time_ms is None, bad.status
    assert bad.check == "disagrees" and tor.status == "ok" and head.best_peer == "torch"


# ---------------------------------------------------------------- Liger-Kernel on the CPU (interpreter)

needs_liger = pytest.mark.skipif(not HAVE_LIGER, reason="Liger-Kernel is not installed (pip install liger-kernel)")


@needs_liger
@pytest.mark.parametrize("grad", [True, False])
def test_liger_cross_entropy_is_checked_in_the_interpreter(monkeypatch, grad):
    """Liger's fused linear cross-entropy runs in the Triton interpreter: its loss and both gradients agree
    with the reference (fp32, odd sizes), so the check a GPU run makes before timing it is exercised here."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k, d, v = 37, 48, 1001
    inputs = [torch.randn(k, d, requires_grad=grad), torch.randint(0, v, (k,)),
              (0.2 * torch.randn(v, d)).requires_grad_(grad)]
    verdict = peer_check.compare(peers.liger_mlm_loss("cpu"), mlm_loss_ref, inputs, grad=grad)
    assert verdict.startswith("agrees (outputs and gradients" if grad else "agrees (outputs;")


@needs_liger
def test_liger_mlm_loss_provider_row_on_the_cpu(monkeypatch):
    """Through the runner: the liger provider of an mlm_loss case sets up in the interpreter, passes its
    check, and is skipped for timing (a CPU), with the verdict in the row."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cases_mlm_loss, "V", 997)
    monkeypatch.setattr(cases_mlm_loss, "D", 40)
    case = cases_mlm_loss._case(29, "fwd+bwd", "cpu", torch.float32)
    row = kernels.measure_provider(case, "liger", settings("cpu", quick=False), CEIL, {})
    assert row.status.startswith("skipped: liger set up on the CPU through the Triton interpreter")
    assert row.check.startswith("agrees (outputs and gradients") and row.time_ms is None
    assert "(output check: agrees)" in kernels.table_cells([row])[0][-1]


@needs_liger
def test_liger_layer_norm_and_geglu_are_checked_on_a_gpu_only():
    for make in (lambda: peers.liger_layer_norm("layer_norm", "cpu"), lambda: peers.liger_ffn("geglu", "cpu")):
        with pytest.raises(peers.Unavailable, match="needs a CUDA GPU .*checked and timed on a GPU"):
            make()


@needs_liger
def test_liger_ops_mlm_loss_custom_op(monkeypatch):
    """The step variant's Liger cross-entropy op: loss and gradients equal the reference's, opcheck passes, and
    a fullgraph compile sees no graph break (Liger's own autograd Function would break on its .item())."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fastcram.benchmarks import liger_ops

    k, d, v = 23, 40, 613
    rows = torch.randn(k, d, requires_grad=True)
    labels = torch.randint(0, v, (k,))
    weight = (0.3 * torch.randn(v, d)).requires_grad_()
    want = torch.autograd.grad(1.7 * mlm_loss_ref(rows, labels, weight), (rows, weight))
    for fn in (liger_ops.mlm_loss, torch.compile(liger_ops.mlm_loss, fullgraph=True, backend="aot_eager")):
        loss = fn(rows, labels, weight)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss, mlm_loss_ref(rows, labels, weight), atol=1e-5, rtol=1e-5)
        for g, w in zip(torch.autograd.grad(1.7 * loss, (rows, weight)), want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(liger_ops._mlm_fwd, (rows.detach().requires_grad_(), labels,
                                               weight.detach().requires_grad_()))
    assert liger_ops.bundle().choice == peers.LIGER_STEP_OPS


# ---------------------------------------------------------------- the step benchmark's peers

def test_step_peers_roles_and_ratio(tmp_path, monkeypatch):
    """fastcram (as a CPU run starts: torch kernels), cramming's torch way and the Liger variant side by side:
    roles, the fastcram variant's note, the headline's step time over the best peer's, the CSV rewritten
    with the ratio once the peer has run."""
    s = step.StepSettings(preset="tiny", device="cpu", micro_batch=2, steps=1, warmup=1, repeats=2, compile=False,
                          variants=("fastcram", "torch", "liger"))
    path = tmp_path / "step.csv"
    head, tor, lig = step.run(s, str(path), log=open(os.devnull, "w"))
    assert (head.variant, head.role, head.switches, head.status) == ("fastcram", "fastcram", "kernels=torch", "ok")
    assert "CPU" in head.note and tor.role == "peer" and lig.role == "peer"
    assert lig.status.startswith("unavailable: ")
    assert head.best_peer == "fastcram torch"
    assert head.vs_best_peer == pytest.approx(tor.tokens_per_s_mean / head.tokens_per_s_mean)
    assert tor.speedup_vs_torch == pytest.approx(1.0)  # the baseline is the peer row, not the headline
    import csv

    with open(path, newline="") as f:
        written = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(written["fastcram"]["vs_best_peer"]) == pytest.approx(head.vs_best_peer, rel=1e-5)
    assert written["fastcram"]["best_peer"] == "fastcram torch" and written["fastcram+liger"]["role"] == "peer"


def test_fastcram_variant_takes_the_tuning_cache(tmp_path, monkeypatch):
    """On a GPU the `fastcram` variant is what the auto-tuner cached for this request, else kernels=triton."""
    from fastcram.config import DataConfig, TrainConfig, preset
    from fastcram.train import autotune, tune_cache

    model_cfg = preset("tiny").model
    request = TrainConfig(kernels="auto", attention="auto", compile_mode="auto", compile=True, device="cpu",
                          micro_batch=2)
    choice, path = autotune.cached_choice(model_cfg, request, "cpu", DataConfig().mask_prob, cache_root=str(tmp_path))
    assert choice is None and path.startswith(str(tmp_path))
    key = tune_cache.result_key("cpu", model_cfg, 2, 1, autotune._requested(model_cfg, request),
                                DataConfig().mask_prob)
    tuned = {"kernels.ffn": "triton", "kernels.mlm_loss": "torch", "attention": "flash", "compile_mode": "default"}
    tune_cache.save_result(key, {"choice": tuned}, str(tmp_path))
    assert autotune.cached_choice(model_cfg, request, "cpu", DataConfig().mask_prob,
                                  cache_root=str(tmp_path))[0] == tuned

    seen = {}

    def fake_cached(m, t, device, mask_prob):
        seen.update(kernels=t.kernels, attention=t.attention, compile_mode=t.compile_mode, device=device)
        return (tuned if seen.get("hit") else None), "/cache/x.json"

    monkeypatch.setattr(autotune, "cached_choice", fake_cached)
    s = step.StepSettings(preset="tiny", device="cuda:0", micro_batch=2, steps=1, warmup=1, repeats=1, compile=True)
    v, note = step.tuned_variant(model_cfg, s)
    assert v.settings == {"kernels": "triton"} and "not tuned on this machine yet" in note
    assert seen == {"kernels": "auto", "attention": "auto", "compile_mode": "auto", "device": "cuda:0"}
    seen["hit"] = True
    v, note = step.tuned_variant(model_cfg, s)
    assert v.settings == tuned and "/cache/x.json" in note


def test_step_parse_knows_the_peer_shorthands():
    vs = step.parse(["fastcram", "torch", "hf", "liger", "kernels=triton+residual=bf16"])
    assert [(v.name, v.settings) for v in vs] == [("fastcram", {}), ("torch", {"kernels": "torch"}), ("hf", {}),
                                                  ("liger", {}), ("kernels=triton+residual=bf16",
                                                                  {"kernels": "triton", "residual": "bf16"})]
    assert [step.role(v) for v in vs] == ["own", "peer", "peer", "peer", "own"]  # run() marks the headline


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_ops_layer_norm_on_a_gpu(dtype):
    """The step variant's Liger LayerNorm op (and add + LayerNorm) against the reference, with the bf16 rule
    of the output check; opcheck on the op. Its kernels do not run in the CPU interpreter."""
    from fastcram.benchmarks import liger_ops
    from fastcram.ops.layer_norm import add_layer_norm_ref, layer_norm_ref

    x, r = (torch.randn(3, 41, 300, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    w = (1 + 0.1 * torch.randn(300, device="cuda")).requires_grad_()  # fp32, as autocast keeps parameters
    b = (0.1 * torch.randn(300, device="cuda")).requires_grad_()
    eps = 1e-12
    peer_check.compare(lambda *t: (liger_ops.layer_norm(*t, eps),), lambda *t: (layer_norm_ref(*t, eps),),
                       [x, w, b], grad=True)
    peer_check.compare(lambda *t: liger_ops.add_layer_norm(*t, eps), lambda *t: add_layer_norm_ref(*t, eps),
                       [x, r, w, b], grad=True)
    torch.library.opcheck(liger_ops._ln_fwd, (x.detach().reshape(-1, 300).contiguous().requires_grad_(),
                                              w.detach().requires_grad_(), b.detach().requires_grad_(), eps))


def test_report_shows_fastcram_against_its_peers():
    """The GPU report's peers section, from CSV rows as the benchmarks write them."""
    from fastcram.benchmarks import gpu_report

    def k(provider, status="ok", t="", role="peer", **kw):
        return {"op": "mlm_loss", "mode": "fwd+bwd", "shape": "K=8192", "dtype": "bf16", "provider": provider,
                "status": status, "time_ms": t, "role": role, "best_peer": "", "vs_best_peer": "", "check": "",
                **kw}

    krows = [k("triton", t="1.5", role="fastcram", best_peer="liger", vs_best_peer="0.75"),
             k("torch", t="4.0"), k("liger", t="2.0", check="agrees (outputs and gradients; ...)"),
             k("quack", "unavailable: QuACK is not importable here"),
             k("apex(gelu=tanh)", "disagrees: output 0: max error 0.1"),
             k("triton(row_chunk=K/2)", t="1.4", role="own")]
    srows = [{"variant": "fastcram", "role": "fastcram", "preset": "crammed-bert", "micro_batch": "256",
              "switches": "kernels=triton", "step_ms_mean": "100.0", "status": "ok", "best_peer": "hf bert",
              "vs_best_peer": "0.8", "note": "not tuned on this machine yet"},
             {"variant": "hf bert", "role": "peer", "step_ms_mean": "125.0", "status": "ok"},
             {"variant": "fastcram+liger", "role": "peer", "step_ms_mean": "", "status": "error: RuntimeError: x"}]
    md = gpu_report.peers_section(krows, srows)
    assert "| mlm_loss | fwd+bwd | K=8192 | 1.5 | liger | 2 | 0.75 |" in md
    assert "| crammed-bert, micro-batch 256 | fastcram (kernels=triton) | 100.00 | hf bert | 125.00 | 0.80 |" in md
    assert "not tuned on this machine yet" in md and "output check passed: liger" in md
    assert "- apex(gelu=tanh): disagrees: output 0: max error 0.1 (mlm_loss fwd+bwd K=8192)" in md
    assert "- quack: unavailable: QuACK is not importable here" in md
    assert "- step fastcram+liger: error: RuntimeError: x" in md and "triton(row_chunk" not in md
