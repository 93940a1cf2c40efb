"""`fastcram bench compile` as a gate: every Triton kernel compiles for sm_90a and sm_80 at crammed-bert's
shapes, no kept config spills, GEMMs use wgmma on Hopper in 16-bit; and the report's own arithmetic and
detectors (registers, spills, shared memory, occupancy) are checked against planted kernels.

Compiling needs no GPU (Triton's compiler and the cuobjdump in its wheel), but it must not run under
TRITON_INTERPRET, which the test session sets: the report runs its workers in subprocesses without it.
"""
import csv
import os
import subprocess
import sys
import textwrap

import pytest

from fastcram.benchmarks import compile_report as cr
from fastcram.ops import compile_only as co
from fastcram.ops._triton import HAVE_TRITON

pytestmark = pytest.mark.skipif(not HAVE_TRITON or co.cuobjdump() is None,
                                reason="needs triton with its cuobjdump")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "bench", "results", "compile-sm90a-sm80.csv")
ALL_CONFIGS = os.path.join(ROOT, "bench", "results", "compile-sm90a-sm80-all-configs.csv")


@pytest.fixture(scope="module")
def report():
    """Every kernel the ops launch at one crammed-bert micro-batch (the others specialize the same), both
    architectures, the configs the pruner keeps (the gate)."""
    return cr.run(cr.ReportSettings(micro_batches=(256,), native_lib=None), log=lambda m: None)


def test_every_kernel_compiles_for_both_architectures(report):
    kernels = {(r["op"], r["kernel"]) for r in report}
    for arch in cr.ARCHES:
        rows = [r for r in report if r["arch"] == arch]
        bad = [f"{r['op']}:{r['kernel']} {r.get('config')} {r['status']}" for r in rows if r["status"] != "ok"]
        assert not bad, f"sm_{arch}: {bad}"
        assert {(r["op"], r["kernel"]) for r in rows} == kernels, f"sm_{arch} misses kernels"
    assert {op for op, _ in kernels} == set(cr.plan_modules()), "every op file's plan compiled something"


def test_no_kept_config_spills(report):
    spills = [f"sm_{r['arch']} {r['kernel']} {r['config']} {r['dtypes']}: {r['spill_stores']} spill stores, "
              f"{r['local_bytes']} B local" for r in report if r["spill_stores"]]
    assert not spills


def test_gemms_use_wgmma_on_hopper_in_16_bit(report):
    gemms = [r for r in report if r["arch"] == "90a" and r["uses_dot"] == "yes"
             and set(r["dtypes"].split(",")) & {"bf16", "fp16"}]
    assert "ffn" in {r["op"] for r in gemms}, "the FFN's GEMMs are seen as GEMMs (their dots sit in a helper)"
    missing = [f"{r['kernel']} {r['config']} {r['dtypes']}" for r in gemms if r["wgmma"] != "yes"]
    assert not missing, f"16-bit GEMM configs without wgmma on sm_90a: {missing}"


def test_hopper_ffn_loads_through_tma(report):
    """At crammed-bert's shapes every stride is 16-byte aligned: the sm_90a bf16 FFN takes the descriptor path,
    and its PTX has the TMA loads; sm_80 (no TMA) takes the pointer path."""
    ffn = [r for r in report if r["op"] == "ffn" and r["dtypes"] == "bf16"]
    hopper = [r for r in ffn if r["arch"] == "90a"]
    assert hopper and all("USE_DESC=True" in r["config"] and r["tma"] == "yes" for r in hopper)
    assert all("USE_DESC=False" in r["config"] and r["tma"] == "no" for r in ffn if r["arch"] == "80")


def test_occupancy_from_the_hardware_limits():
    h = co.ARCHS["90a"]
    # 128 threads at 32 registers: 4096 registers a CTA; threads allow 16, the CTA limit 32, registers 16
    assert co.blocks_per_sm(h, regs=32, shared=0, threads=128) == 16
    # 255 registers round up to 256 a thread (8 KiB a warp): 8 warps of 256 threads use all 65536
    assert co.blocks_per_sm(h, regs=255, shared=0, threads=256) == 1
    # shared memory: 100 KB + 1 KB reserved a CTA fits twice in 228 KB
    assert co.blocks_per_sm(h, regs=32, shared=100 * 1024, threads=128) == 2
    assert co.blocks_per_sm(co.ARCHS["80"], regs=32, shared=100 * 1024, threads=128) == 1
    assert co.max_threads_per_block(h, 255) == 256 and co.max_threads_per_block(h, 64) == 1024


def test_resource_usage_parsing():
    text = textwrap.dedent("""
        Resource usage:
         Common:
          GLOBAL:0
         Function kernel_a:
          REG:107 STACK:0 SHARED:1024 LOCAL:16 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
         Function kernel_b:
          REG:32 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0
        """)
    usage = co.parse_resource_usage(text)
    assert usage["kernel_a"]["REG"] == 107 and usage["kernel_a"]["LOCAL"] == 16
    assert usage["kernel_b"]["SHARED"] == 0 and usage["kernel_b"]["STACK"] == 8


def test_sass_counts_per_function_and_architecture():
    """The native kernels' spill, wgmma, TMA and cp.async columns come from these counts."""
    sass = textwrap.dedent("""
        arch = sm_90
            Function : _Z1av
            /*0010*/  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;
            /*0020*/  UTMALDG.2D [UR8], [UR4] ;
            /*0030*/  STL [R1+0x4], R2 ;
            Function : _Z1bv
            /*0010*/  LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
            /*0020*/  LDL R5, [R1] ;
        arch = sm_80
            Function : _Z1av
            /*0010*/  STL.64 [R1], R4 ;
            /*0020*/  STL.128 [R1+0x10], R8 ;
        """)
    counts = co.sass_counts(sass)
    assert counts[(90, "_Z1av")] == {"SPILL_STORES": 1, "WGMMA": 1, "TMA": 1, "CP_ASYNC": 0}
    assert counts[(90, "_Z1bv")] == {"SPILL_STORES": 0, "WGMMA": 0, "TMA": 0, "CP_ASYNC": 1}
    assert counts[(80, "_Z1av")] == {"SPILL_STORES": 2, "WGMMA": 0, "TMA": 0, "CP_ASYNC": 0}


PLANTED = textwrap.dedent('''
    import json, sys
    import torch, triton, triton.language as tl
    from fastcram.ops.compile_only import compile_only

    @triton.jit
    def spills(X, Y, N: tl.constexpr):
        # a [N, N] fp32 tile held whole by one warp while it is reduced both ways: 512 values a thread
        offs = tl.arange(0, N)
        x = tl.load(X + offs[:, None] * N + offs[None, :])
        y = tl.exp(x) * tl.sum(x, axis=0)[None, :] + tl.sum(tl.exp(x * 2.0), axis=1)[:, None]
        tl.store(Y + offs[:, None] * N + offs[None, :], y)

    @triton.jit
    def big_shared(X, Y, N: tl.constexpr):
        # two [256, 256] bf16 operands staged in shared memory: 256 KiB, over any CTA's limit
        offs = tl.arange(0, N)
        x = tl.load(X + offs[:, None] * N + offs[None, :])
        z = tl.load(X + N * N + offs[:, None] * N + offs[None, :])
        tl.store(Y + offs[:, None] * N + offs[None, :], tl.dot(x, z).to(tl.bfloat16))

    @triton.jit
    def _square(x):
        return tl.dot(x, x)

    @triton.jit
    def uses_dot(X, Y, N: tl.constexpr):
        # the dot sits in a helper, as the FFN's do: the report must still see a GEMM
        offs = tl.arange(0, N)
        x = tl.load(X + offs[:, None] * N + offs[None, :])
        tl.store(Y + offs[:, None] * N + offs[None, :], _square(x).to(tl.bfloat16))

    def meta(n, dtype=torch.float32):
        return torch.empty(n, n, dtype=dtype, device="meta")

    out = {}
    with compile_only(sys.argv[1]) as target:
        spills[(1,)](meta(128), meta(128), N=128, num_warps=1)
        uses_dot[(1,)](meta(64, torch.bfloat16), meta(64, torch.bfloat16), N=64, num_warps=4)
        try:
            big_shared[(1,)](meta(256, torch.bfloat16), meta(256, torch.bfloat16), N=256, num_warps=8)
        except Exception as e:
            out["big_shared_error"] = type(e).__name__
    out["rows"] = {r.kernel: {"local": r.local, "status": r.status, "shared": r.shared, "uses": r.uses,
                              "regs": r.regs, "spill_stores": r.spill_stores, "uses_dot": r.uses_dot}
                   for r in target.records}
    print(json.dumps(out))
''')


@pytest.mark.parametrize("arch", ["90a", "80"])
def test_planted_kernels_are_seen_for_what_they_are(tmp_path, arch):
    """A kernel that must spill shows local bytes; one over the shared-memory limit cannot launch (the same
    OutOfResources a real load raises); a bf16 dot lowers to wgmma on sm_90a and not on sm_80."""
    script = tmp_path / "planted.py"
    script.write_text(PLANTED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(script), arch], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    out = json.loads(p.stdout.strip().splitlines()[-1])
    rows = out["rows"]
    assert rows["spills"]["local"] > 0 and rows["spills"]["spill_stores"] > 0, rows["spills"]
    assert rows["big_shared"]["status"].startswith("cannot launch"), rows["big_shared"]
    assert out.get("big_shared_error") == "OutOfResources"
    assert rows["uses_dot"]["uses"]["wgmma"] is (arch == "90a")
    assert rows["uses_dot"]["spill_stores"] == 0
    assert rows["uses_dot"]["uses_dot"] and not rows["spills"]["uses_dot"]


def test_pruner_drops_exactly_the_configs_that_cannot_launch_or_spill():
    """In the committed --all-configs report (the configs the pruner drops were compiled too), the configs
    dropped for an architecture are exactly those that cannot launch there or spill there; and some are."""
    with open(ALL_CONFIGS) as f:
        rows = [r for r in csv.DictReader(f) if r["op"] != "native"]
    assert rows and not [r for r in rows if r["status"].startswith("error")]
    for r in rows:
        bad = r["status"].startswith("cannot launch") or int(r["spill_stores"] or 0) > 0
        assert (r["pruned"] == "yes") == bad, f"{r['kernel']} {r['config']} {r['dtypes']} sm_{r['arch']}: " \
                                               f"pruned {r['pruned']}, {r['status']}, {r['spill_stores']} spills"
    assert any(r["pruned"] == "yes" for r in rows), "the lists hold configs an architecture cannot take"


def test_the_committed_report_covers_todays_kernels(report):
    """bench/results/compile-sm90a-sm80.csv lists every (kernel, config, dtypes, arch) the gate compiled: a
    changed kernel or config list needs the report made again (the command is in bench/RESULTS.md)."""
    with open(COMMITTED) as f:
        committed = {(r["kernel"], r["config"], r["dtypes"], r["arch"]) for r in csv.DictReader(f)}
    now = {(r["kernel"], r["config"], r["dtypes"], r["arch"]) for r in report}
    assert now <= committed, f"not in the committed report (rerun it): {sorted(now - committed)[:5]}"


def _config_key(kwargs: dict, warps, stages) -> tuple:
    return tuple(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PERSISTENT")) + (
        str(warps), str(stages))


def test_todays_pruner_and_config_lists_match_the_committed_all_configs_report():
    """The committed --all-configs CSV is the pruner test's evidence: today's FFN config lists must be the ones
    it compiled (for each architecture and epilogue), and today's pruner must keep exactly the ones it marks
    kept, at each architecture's limits."""
    import torch

    from fastcram.ops import ffn

    lists = {ffn.FWD_GELU: ffn.FWD_GELU_CONFIGS, ffn.FWD_GEGLU: ffn.FWD_GEGLU_CONFIGS,
             ffn.BWD_GELU: ffn.BWD_GELU_CONFIGS, ffn.BWD_GEGLU: ffn.BWD_GEGLU_CONFIGS}
    with open(ALL_CONFIGS) as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == "ffn" and r["dtypes"] == "bf16"]
    marked: dict = {}
    for r in rows:
        kw = dict(item.split("=", 1) for item in r["config"].split(","))
        key = (r["arch"], int(kw["EPILOGUE"]), _config_key(kw, kw["warps"], kw["stages"]))
        marked.setdefault(key, set()).add(r["pruned"])
    for arch_name, arch in co.ARCHS.items():
        for epilogue, configs in lists.items():
            kept = ffn.prune_configs(configs, divmod(arch.capability, 10), arch.smem_per_block, torch.bfloat16,
                                     epilogue == ffn.FWD_GEGLU)
            for c in configs:
                key = (arch_name, epilogue, _config_key(c.kwargs, c.num_warps, c.num_stages))
                assert key in marked, f"{key} is not in {os.path.basename(ALL_CONFIGS)}: regenerate it (README)"
                assert marked[key] == {"no" if c in kept else "yes"}, f"{key}: pruner {c in kept}, CSV {marked[key]}"
    listed = {(a, e, _config_key(c.kwargs, c.num_warps, c.num_stages))
              for a in co.ARCHS for e, configs in lists.items() for c in configs}
    assert set(marked) == listed, f"configs no list has any more: {sorted(set(marked) - listed)[:3]}"


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "70"], "--arch 70: unknown architecture"),
    (["--micro-batches", "0"], "--micro-batches 0: give positive whole numbers"),
    (["--native-lib", "/nonexistent/lib.so"], "--native-lib /nonexistent/lib.so does not exist"),
    (["--preset", "huge"], "--preset huge: unknown"),
])
def test_bad_compile_flags_are_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    from fastcram.cli import main

    monkeypatch.setattr(cr, "run", lambda *a, **k: pytest.fail("nothing may compile after a bad flag"))
    assert main(["bench", "compile", "--csv", str(tmp_path / "c.csv"), *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "c.csv").exists()


def test_without_triton_compile_says_so(tmp_path, capsys, monkeypatch):
    from fastcram.cli import main
    from fastcram.ops import _triton

    monkeypatch.setattr(_triton, "HAVE_TRITON", False)
    assert main(["bench", "compile", "--csv", str(tmp_path / "c.csv")]) == 2
    assert "bench compile needs triton" in capsys.readouterr().err


def test_an_architecture_given_twice_is_compiled_once(tmp_path, monkeypatch):
    from fastcram.cli import main

    seen = []
    monkeypatch.setattr(cr, "run", lambda settings, log: seen.append(settings.arches) or [])
    monkeypatch.setattr(cr, "write_csv", lambda rows, path: None)
    monkeypatch.setattr(cr, "table", lambda rows: ([], []))
    monkeypatch.setattr(cr, "summary", lambda rows: ([], []))
    main(["bench", "compile", "--arch", "80,90a,80", "--native-lib", "", "--csv", str(tmp_path / "c.csv")])
    assert seen == [("80", "90a")]


def test_driver_check_works_without_unload_module(monkeypatch):
    """Triton 3.6's CUDA driver utilities have load_binary but no unload_module (3.9 has both)."""
    import importlib
    from types import SimpleNamespace

    driver_module = importlib.import_module("triton.runtime.driver")  # the package re-exports its DriverConfig
    loaded = []
    utils = SimpleNamespace(load_binary=lambda name, cubin, shared, dev: loaded.append(name) or ("mod", "fn", 40, 0,
                                                                                                1024))
    monkeypatch.setattr(driver_module, "driver", SimpleNamespace(active=SimpleNamespace(utils=utils)))
    rec = SimpleNamespace(symbol="k", cubin=b"", shared=0)
    assert co.driver_usage(rec) == (40, 0) and loaded == ["k"]
