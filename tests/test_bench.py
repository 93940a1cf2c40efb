"""The benchmark suite: the kernel runner (fake cases module), ceilings, the step benchmark on the tiny preset,
the bench CLI's errors, plots, the GPU check's report and its --dry-run. No timing is asserted."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from fastcram.benchmarks import kernels, step
from fastcram.benchmarks.case import Case, Unavailable, rotating
from fastcram.benchmarks.ceilings import Ceilings, measure, quantile, time_cpu
from fastcram.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = "cases_fake_for_tests"
CEIL = Ceilings(copy_gbps=5.0, matmul_tflops=0.05, matmul_dtype="fp32", how="fixed for tests")


def _double_provider(rows: int, cols: int):
    def setup():
        sets = [(torch.randn(rows, cols),) for _ in range(3)]  # fresh random inputs, rotated
        return rotating(lambda x: x * 2.0 + 1.0, sets)
    return setup


def _unavailable():
    raise Unavailable("needs a CUDA GPU")


def _broken():
    raise RuntimeError("boom\nsecond line")


def fake_cases(quick, device, dtype, broken=True, huge=False):
    rows, cols = 257, 33  # odd sizes
    providers = {"triton": _unavailable, "torch": _double_provider(rows, cols),
                 "torch.compile": _double_provider(rows, cols)}
    if broken:
        providers["broken"] = _broken
    c = Case(op="layer_norm", mode="fwd", shape=f"{rows}x{cols}", dtype="fp32", bound="memory",
             bytes=2 * rows * cols * 4, flops=2 * rows * cols, providers=providers)
    out = [c]
    if huge:  # a case whose roofline estimate is far over any quick CPU budget
        out.append(Case(op="mlm_loss", mode="fwd", shape="huge", dtype="fp32", bound="compute", bytes=1,
                        flops=10 ** 15, providers={"torch": _double_provider(rows, cols), "triton": _unavailable}))
    return out


@pytest.fixture
def fake_module(monkeypatch):
    mod = types.ModuleType(f"fastcram.benchmarks.{FAKE}")
    mod.cases = fake_cases
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def cpu_settings(**kw) -> kernels.Settings:
    return kernels.Settings(**{"device": "cpu", "dtype": torch.float32, "quick": True, "compile": False, **kw})


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the kernel runner

def test_runner_rows_and_csv(tmp_path, fake_module):
    path = tmp_path / "k.csv"
    modules = {FAKE: ("layer_norm", "add_layer_norm"), "cases_not_written_xyz": ("mlm_loss",)}
    rows, _ = kernels.run(cpu_settings(), str(path), modules=modules, ceilings=CEIL, log=open(os.devnull, "w"))
    by = {(r.op, r.provider): r for r in rows}
    ok = by[("layer_norm", "torch")]
    assert ok.status == "ok" and ok.time_ms > 0 and ok.p20_ms <= ok.time_ms <= ok.p80_ms
    assert ok.gbps == pytest.approx(ok.bytes / (ok.time_ms * 1e-3) / 1e9)
    assert ok.pct_of_ceiling == pytest.approx(100 * ok.gbps / CEIL.copy_gbps)
    assert ok.speedup_vs_torch == pytest.approx(1.0) and ok.timer == "perf_counter" and ok.peak_mem_mib is None
    assert by[("layer_norm", "triton")].status == "unavailable: needs a CUDA GPU"
    assert by[("layer_norm", "torch.compile")].status.startswith("skipped: torch.compile")
    assert by[("layer_norm", "broken")].status == "error: RuntimeError: boom"
    assert by[("add_layer_norm", "-")].status.startswith("no cases yet")  # the module lists none for it
    assert by[("mlm_loss", "-")].status == "no cases yet (cases_not_written_xyz.py not written)"
    assert kernels.failures(rows) == [by[("layer_norm", "broken")]]

    with open(path, newline="") as f:
        assert next(csv.reader(f)) == kernels.CSV_COLUMNS
    written = read_csv(path)
    assert len(written) == len(rows)  # nothing dropped, unavailable rows included
    first = next(r for r in written if r["provider"] == "torch")
    assert first["torch"] == torch.__version__ and first["date"] and first["device"].startswith("cpu")
    assert float(first["time_ms"]) == pytest.approx(ok.time_ms, rel=1e-5)
    assert first["ceiling"] == "copy 5.0 GB/s"


def test_runner_cpu_guard_and_interpreter(monkeypatch, fake_module):
    monkeypatch.setattr(kernels, "CASE_MODULES", {FAKE: ("layer_norm", "mlm_loss")})
    fake_module.cases = lambda q, d, t: fake_cases(q, d, t, broken=False, huge=True)
    cases, _ = kernels.collect_cases(cpu_settings())
    huge = next(c for c in cases if c.shape == "huge")
    assert kernels.predicted_s(huge, CEIL) == pytest.approx(1e15 / 0.05e12)
    row = kernels.measure_provider(huge, "torch", cpu_settings(), CEIL, {})
    assert row.status.startswith("skipped: too large for a quick CPU run") and row.time_ms is None
    # a GPU-only provider still reports why it is unavailable
    assert kernels.measure_provider(huge, "triton", cpu_settings(), CEIL, {}).status == "unavailable: needs a CUDA GPU"
    # a compile provider that runs is released (torch._dynamo.reset) and timed like any other
    small = next(c for c in cases if c.shape != "huge")
    assert kernels.measure_provider(small, "torch.compile", cpu_settings(compile=True), CEIL, {}).status == "ok"
    # without --quick the user asked for the full shapes: no guard
    assert kernels.cpu_too_slow(huge, cpu_settings(quick=False), CEIL) is None
    # a GPU-only provider that sets up on the CPU (the Triton interpreter) is still not timed there
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    huge.providers["triton"] = lambda: (lambda: None)
    row = kernels.measure_provider(huge, "triton", cpu_settings(), CEIL, {})
    assert row.status.startswith("skipped: triton set up on the CPU through the Triton interpreter")


def test_missing_dependency_inside_a_cases_module_is_not_hidden(tmp_path, monkeypatch):
    pkg = tmp_path / "fakebenchpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cases_bad.py").write_text("import a_module_that_does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_module_that_does_not_exist_xyz"):
        kernels.collect_cases(cpu_settings(), {"cases_bad": ("layer_norm",)}, package="fakebenchpkg")


def test_quantile_and_cpu_timer():
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert quantile(vals, 0.5) == 3.0 and quantile(vals, 0.2) == pytest.approx(1.8)
    assert quantile([7.0], 0.8) == 7.0
    calls = []
    t = time_cpu(lambda: calls.append(1), min_reps=3, max_reps=5, budget_s=10.0)
    assert len(calls) == 1 + 5 and 0 <= t.p20_ms <= t.median_ms <= t.p80_ms and t.timer == "perf_counter"


def test_ceilings_on_cpu():
    c = measure("cpu", torch.float32)
    assert c.copy_gbps > 0 and c.matmul_tflops > 0 and c.matmul_dtype == "fp32"
    assert c.for_bound("compute")[0] == c.matmul_tflops and c.for_bound("memory")[0] == c.copy_gbps


# ---------------------------------------------------------------- the CLI

def test_cli_kernels_writes_csv_and_table(tmp_path, monkeypatch, capsys, fake_module):
    fake_module.cases = lambda q, d, t: fake_cases(q, d, t, broken=False)
    monkeypatch.setattr(kernels, "CASE_MODULES", {FAKE: ("layer_norm",)})
    monkeypatch.setattr(kernels, "measure", lambda device, dtype: CEIL)
    path = tmp_path / "out" / "kernels.csv"
    rc = cli_main(["bench", "kernels", "--quick", "--device", "cpu", "--plain", "--ops", "layer_norm",
                   "--csv", str(path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "unavailable: needs a CUDA GPU" in out.out and "GB/s" in out.out
    assert {r["provider"]: r["status"] for r in read_csv(path)}["torch"] == "ok"
    assert f"wrote {path}" in out.err


@pytest.mark.parametrize("argv,needle", [
    (["bench", "kernels", "--ops", "layer_norm,nope"], "--ops nope: unknown op"),
    (["bench", "step", "--variants", "jax"], "--variants: 'jax' in 'jax' is not KEY=VALUE"),
    (["bench", "step", "--variants", "kernels=torch,kernels=triton+residual=bf17"],
     "--variants: residual=bf17 is not a value of residual; choose one of fp32, bf16"),
    (["bench", "step", "--variants", "kernels=torch+warp=9"], "--variants: unknown switch 'warp'"),
    (["bench", "step", "--variants", "kernels.nope=triton"], "--variants: unknown op 'nope'"),
    (["bench", "step", "--variants", "kernels=auto"], "--variants: kernels=auto is not a value of kernels"),
    (["bench", "step", "--variants", "kernels=torch", "kernels=torch"], "--variants: variant 'kernels=torch' is given"),
    (["bench", "step", "--variants", ","], "--variants: no variant given"),
    (["bench", "step", "--preset", "huge-bert", "--device", "cpu"], "--preset huge-bert: unknown"),
    (["bench", "plot", "/nonexistent/x.csv"], "/nonexistent/x.csv: no such CSV file"),
])
def test_cli_user_errors(argv, needle, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_flag_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "step", "--repeats", "0"])
    assert e.value.code == 2 and "--repeats must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------- the step benchmark

def test_step_tiny_on_cpu(tmp_path, monkeypatch):
    import fastcram.train.step

    monkeypatch.setattr(fastcram.train.step, "triton_unavailable_reason", lambda device: "no GPU in this test")
    s = step.StepSettings(preset="tiny", device="cpu", micro_batch=2, steps=1, warmup=1, repeats=3,
                          compile=False, variants=("triton", "torch", "hf"))
    path = tmp_path / "step.csv"
    rows = step.run(s, str(path), log=open(os.devnull, "w"))
    tri, tor, hf = rows
    assert tri.status == "unavailable: --kernels triton: no GPU in this test; use --kernels torch"
    assert tor.status == "ok" and tor.tokens_per_s_mean > 0 and tor.tokens_per_s_std >= 0
    assert tor.tokens_per_s_min <= tor.tokens_per_s_mean <= tor.tokens_per_s_max
    assert tor.step_ms_mean == pytest.approx(1e3 * 2 * 128 / tor.tokens_per_s_mean)
    assert tor.mfu_mean is None and math.isfinite(tor.final_loss) and tor.params_m > 0
    assert tor.speedup_vs_torch == pytest.approx(1.0)
    try:
        import transformers  # noqa: F401
        assert hf.status == "ok" and hf.tokens_per_s_mean > 0
    except ImportError:
        assert hf.status == "unavailable: transformers is not installed (pip install transformers)"
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == step.CSV_COLUMNS
    written = read_csv(path)
    assert [r["variant"] for r in written] == ["fastcram triton", "fastcram torch", "hf bert"]
    assert written[1]["mfu_mean"] == "" and "synthetic" in written[1]["data"]


def test_step_variants_side_by_side(tmp_path):
    """Any combination of switches in one run: each row carries its switch values; an SDPA backend the CPU
    lacks is reported, not fatal; the sparse last layer's FLOPs are counted per variant."""
    s = step.StepSettings(preset="tiny", device="cpu", micro_batch=2, steps=1, warmup=1, repeats=2, compile=False,
                          variants=("kernels=torch", "full:kernels=torch+sparse=off+attention=math",
                                    "kernels=torch+attention=efficient",
                                    "kernels=torch+autocast=bf16+residual=bf16",
                                    "kernels=torch+compile_mode=reduce-overhead"))
    path = tmp_path / "step.csv"
    rows = step.run(s, str(path), log=open(os.devnull, "w"))
    written = {r["variant"]: r for r in read_csv(path)}
    assert list(written) == ["kernels=torch", "full", "kernels=torch+attention=efficient",
                             "kernels=torch+autocast=bf16+residual=bf16", "kernels=torch+compile_mode=reduce-overhead"]
    assert written["kernels=torch+compile_mode=reduce-overhead"]["status"] == (
        "unavailable: compile_mode=reduce-overhead needs a compiled step; run the benchmark with --compile")
    full = written["full"]
    assert (full["status"], full["switches"], full["sparse"], full["attention"], full["residual"]) == (
        "ok", "kernels=torch+sparse=off+attention=math", "off", "math", "fp32")
    assert written["kernels=torch"]["sparse"] == "on" and written["kernels=torch"]["attention"] == "default"
    assert float(full["flops_per_token"]) > float(written["kernels=torch"]["flops_per_token"])
    assert written["kernels=torch+attention=efficient"]["status"].startswith("unavailable: --attention efficient")
    bf16 = written["kernels=torch+autocast=bf16+residual=bf16"]
    assert (bf16["status"], bf16["autocast"], bf16["residual"]) == ("ok", "bf16", "bf16")
    assert rows[0].speedup_vs_torch == pytest.approx(1.0) and rows[1].speedup_vs_torch > 0


def test_variant_grammar():
    from fastcram.train import switches as sw

    vs = sw.parse_variants(["kernels=torch,kernels=triton+residual=bf16", "mine:kernels=triton+kernels.mlm_loss=torch",
                            "triton"])
    assert [(v.name, v.settings) for v in vs] == [
        ("kernels=torch", {"kernels": "torch"}),
        ("kernels=triton+residual=bf16", {"kernels": "triton", "residual": "bf16"}),
        ("mine", {"kernels": "triton", "kernels.mlm_loss": "torch"}),
        ("triton", {"kernels": "triton"})]
    from fastcram.config import TrainConfig, preset

    m, t = sw.apply(vs[2].settings, preset("tiny").model, TrainConfig())
    assert t.kernels == "triton" and t.per_op == {"mlm_loss": "torch"}
    m, t = sw.apply({"sparse": "off", "compile": "off", "compile_mode": "reduce-overhead"}, preset("tiny").model,
                    TrainConfig())
    assert not m.sparse_last_layer and not t.compile and t.compile_mode == "reduce-overhead"
    assert preset("tiny").model.sparse_last_layer  # the preset itself is untouched
    assert sw.current(m, t)["sparse"] == "off" and sw.label({"a": "1", "b": "2"}) == "a=1+b=2"


def test_step_flops_and_mfu():
    from fastcram.config import preset
    from fastcram.observe.metrics import flops_per_token, mfu

    cfg = preset("crammed-bert").model
    ours = flops_per_token(cfg, 0.25)
    assert 0.5e9 < ours < 0.7e9  # the recipe's "about 0.6 GFLOP per token"
    assert step.hf_flops_per_token(cfg) > ours  # HF decodes every token and has a classic FFN
    assert mfu(800e3, ours, 989.4) == pytest.approx(800e3 * ours / 989.4e12)


# ---------------------------------------------------------------- plots

def _kernel_csv(tmp_path, fake_module) -> str:
    path = str(tmp_path / "k.csv")
    kernels.run(cpu_settings(), path, modules={FAKE: ("layer_norm",)}, ceilings=CEIL, log=open(os.devnull, "w"))
    return path


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys, fake_module):
    path = _kernel_csv(tmp_path, fake_module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert cli_main(["bench", "plot", path, "--out", str(tmp_path / "plots")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_plot_writes_a_png_per_op(tmp_path, fake_module):
    pytest.importorskip("matplotlib")
    from fastcram.benchmarks.plot import plot

    out = plot([_kernel_csv(tmp_path, fake_module)], str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in out] == ["layer_norm.png"]
    with open(out[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the GPU check

def test_gpu_report_marks_failures_and_timeouts(tmp_path, fake_module):
    from fastcram.benchmarks import gpu_report

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    kernels.run(cpu_settings(), str(out / "kernels.csv"), modules={FAKE: ("layer_norm",)}, ceilings=CEIL,
                log=open(os.devnull, "w"))
    (work / "stages.tsv").write_text("gpu-tests\t1\t12\t75\tpytest -m gpu\t\n"
                                     "bench-step\t124\t140\t140\tfastcram bench step\ttimed out after 140s\n"
                                     "train\t0\t130\t140\tfastcram train\t\n")
    (work / "gpu-tests.log").write_text("lots of output\nFAILED tests/test_x.py::test_y\n1 failed, 3 passed in 9s\n")
    with open(out / "train_log.jsonl", "w") as f:
        f.write(json.dumps({"event": "start"}) + "\n")
        for i, loss in enumerate([9.0, 8.0, 7.0]):
            f.write(json.dumps({"step": 10 * (i + 1), "loss": loss, "tokens_per_s": 1000.0 * (i + 1),
                                "mfu": 0.1 * (i + 1), "batch_size": 256}) + "\n")
    md, summary = gpu_report.build(str(out), str(work), dry_run=False)
    by = {row[0]: row for row in summary}
    assert by["gpu-tests"][1] == "FAILED (exit 1)" and "1 failed, 3 passed" in by["gpu-tests"][5]
    assert by["bench-step"][1] == "TIMED OUT" and by["bench-step"][5] == "no rows"
    assert by["train"][1] == "ok" and by["train"][5].startswith("loss 9.000 -> 7.000 in 30 steps")
    assert "FAILED tests/test_x.py::test_y" in md  # the log tail is in the report
    assert "unavailable: needs a CUDA GPU" in md and "copy 5.0 GB/s" in md


def test_gpu_report_names_kernels_the_driver_disagrees_on(tmp_path):
    """compile.csv from `bench compile --check-driver`: a row whose registers or spills differ from the
    driver's is named in the report; agreeing rows are counted."""
    from fastcram.benchmarks import compile_report as cr
    from fastcram.benchmarks import gpu_report

    base = {"op": "ffn", "kernel": "_k", "arch": "90a", "config": "BLOCK_M=64", "dtypes": "bf16", "status": "ok",
            "regs": 128, "local_bytes": 0, "spill_stores": 0, "driver_regs": 128, "driver_spills": 0}
    rows = [base, {**base, "config": "BLOCK_M=128", "regs": 200, "driver_regs": 208},
            {**base, "config": "BLOCK_M=256", "local_bytes": 16, "driver_spills": 4}]
    cr.write_csv(rows, str(tmp_path / "compile.csv"))
    md, summary = gpu_report.compile_section(read_csv(tmp_path / "compile.csv"))
    assert summary.startswith("3 kernels checked against the driver, 1 disagree")
    assert "BLOCK_M=128" in md and "BLOCK_M=256" not in md.split("Disagreeing rows:")[1]


def _gpu_check(tmp_path, *args, **extra_env):
    env = {**os.environ, "OUT": str(tmp_path / "gc_out"), "PYTHON": sys.executable, **extra_env}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), *args], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=900)


def _pure_python_wheel(folder, name: str, version: str) -> str:
    """A minimal py3-none-any wheel (one module), as tools/fetch_wheels.sh would leave in the wheel folder."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": f"__version__ = '{version}'\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record + [f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path.name


def test_gpu_check_dry_run_writes_the_report(tmp_path):
    """The dry run: every stage in its CPU form, the peers' rows (each unavailable with its reason here, or
    checked where it runs on the CPU), the wheels of the wheel folder installed and named in the report."""
    wheel = _pure_python_wheel(tmp_path / "wheels", "fastcram_peer_probe", "0.3")
    res = _gpu_check(tmp_path, "--dry-run", GPU_CHECK_WHEELS=str(tmp_path / "wheels"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "gc_out"
    files = sorted(os.listdir(out))
    assert {"report.md", "kernels.csv", "step.csv", "stages.log"} <= set(files) and len(files) <= 8
    report = (out / "report.md").read_text()
    assert "DRY RUN" in report
    for stage in ("data-prep", "native-build", "gpu-tests", "bench-kernels", "bench-step", "compile-check", "train"):
        assert f"| {stage} |" in report
    compiled = read_csv(out / "compile.csv")  # the compile report's CPU form: one op for sm_90a
    assert compiled and {r["arch"] for r in compiled} == {"90a"} and all(r["status"] == "ok" for r in compiled)
    assert "| FAILED" not in report and "TIMED OUT" not in report
    assert "tests collected" in report  # pytest -m gpu collected the GPU tests
    assert read_csv(out / "kernels.csv")
    steps = {r["variant"]: r["status"] for r in read_csv(out / "step.csv")}  # the main variants' CPU forms
    assert [steps[v] for v in ("fastcram", "fastcram torch", "kernels=torch+autocast=bf16+residual=bf16",
                               "kernels=torch+attention=math")] == ["ok"] * 4 and len(steps) == 7
    assert steps["fastcram+liger"].startswith("unavailable: ") and steps["hf bert"] in (
        "ok", "unavailable: transformers is not installed (pip install transformers)")
    peer_rows = [r for r in read_csv(out / "kernels.csv") if r["role"] == "peer" and r["provider"] not in (
        "torch", "torch.compile", "torch.compile-max-autotune", "cublas+compiled-epilogue", "linear_cross_entropy")]
    assert {r["provider"] for r in peer_rows} == {"apex", "liger", "quack", "liger(gelu=tanh)", "apex(gelu=tanh)"}
    assert all(r["status"].startswith("unavailable: ") and r["time_ms"] == "" for r in peer_rows)
    assert "## fastcram against its peers" in report and "| step | fastcram variant |" in report
    assert f"wheels used: {wheel} (from {tmp_path / 'wheels'}, first on the path)" in report
    assert "liger_kernel: " in report and "quack: " in report  # each peer's version, or that it is missing
    tail = res.stdout.strip().splitlines()
    assert any("gpu_check summary (dry run)" in ln for ln in tail[-12:])  # the summary comes last


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_without_gpu_refuses_and_points_to_dry_run(tmp_path):
    res = _gpu_check(tmp_path)
    assert res.returncode == 2 and "--dry-run" in res.stderr and "no CUDA GPU" in res.stderr


def test_tokenize_bench_runs_and_reports_every_case(tmp_path):
    """bench/bench_tokenize.py end to end at a small vocabulary: every row present, over the same text."""
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_tokenize.py"), "--workers", "1",
                          "--repeats", "1", "--vocab-size", "2000", "--read", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = json.load(open(out))["rows"]
    cases = [r["case"] for r in rows]
    assert cases[:4] == ["tokenizer's encoder only, 1 thread", "DocumentEncoder only, 1 thread, cold",
                         "DocumentEncoder only, 1 thread, warm: second pass", "prepare, 1 worker(s)"]
    assert "reading pd_lit.txt.xz only" in cases and "reading corpus.jsonl only" in cases
    assert len({round(r["text_mb"], 6) for r in rows}) == 1  # every case saw the same text
    assert rows[3]["tokens"] > 0 and all(r["mb_s"] > 0 for r in rows)
