"""The kernel microbenchmark runner behind `fastcram bench kernels`.

It measures the device's two ceilings first (ceilings.py), then, for every case the op files contribute
(fastcram/benchmarks/cases_<file>.py), sets up each provider (triton, torch, torch.compile, cuda, and the
peers: apex, liger, quack) and times it side by side: do_bench on a GPU, a perf_counter median on the CPU.
A provider that cannot run here stays in the table as "unavailable: <reason>"; a peer whose output differs
from the reference on the case's inputs stays as "disagrees: <what>" and is not timed; nothing is dropped
silently. Each case's fastcram row (the "triton" provider) gets its time as a ratio to the fastest peer timed
in the same run (`vs_best_peer`, below 1 when fastcram is faster; peers: every provider that is not fastcram's
own, so torch, torch.compile and the libraries). A peer counts there only if its output check agreed (the
cases files check every peer but "torch", the eager reference the others are checked against), so a fast
peer that was never checked cannot become the best one. Rows are appended to the CSV case by case, so a run
stopped half-way still leaves the cases it finished.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

import torch

from ..observe.env_info import environment
from ..files import writing
from .case import Case, Disagrees, Unavailable
from .ceilings import Ceilings, Timing, measure, time_fn

# cases module (in this package) -> the ops it contributes, in table order
CASE_MODULES: dict[str, tuple[str, ...]] = {
    "cases_layer_norm": ("layer_norm", "add_layer_norm"),
    "cases_ffn": ("ffn",),
    "cases_mlm_loss": ("mlm_loss",),
}
ALL_OPS = tuple(op for ops in CASE_MODULES.values() for op in ops)
GPU_ONLY_PROVIDERS = ("triton", "cuda", "apex", "liger", "quack")  # never timed on the CPU (nor "triton(...)")
FASTCRAM = "triton"  # the provider that is fastcram's op as training runs it
OWN = ("triton", "cuda")  # fastcram's own providers and their variants ("triton(...)"): not peers
REFERENCE = "torch"  # the eager reference: the yardstick of the other peers' output checks, so not checked
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# The CSV columns, in order (DESIGN.md "Benchmarks": op, provider, mode, shape, dtype, time, GB/s or TFLOP/s,
# % of the measured ceiling, peak memory, GPU name, versions, git sha, date).
CSV_COLUMNS = ["op", "provider", "mode", "shape", "dtype", "status", "time_ms", "p20_ms", "p80_ms", "gbps",
               "tflops", "pct_of_ceiling", "ceiling", "speedup_vs_torch", "role", "best_peer", "vs_best_peer",
               "check", "peak_mem_mib", "bound", "bytes", "flops", "timer", "device", "torch", "triton", "cuda",
               "git_sha", "date"]


@dataclass
class Settings:
    device: str  # "cpu" | "cuda" | "cuda:N"
    dtype: torch.dtype
    quick: bool = False
    compile: bool = True  # run the torch.compile providers (off by default on the CPU: slow to build)
    ops: tuple[str, ...] = ALL_OPS
    # --quick on the CPU: skip a case whose roofline estimate (bytes / copy rate, FLOPs / matmul rate on
    # this CPU) exceeds this many seconds per call, so the run stays at seconds whatever shapes it is given
    cpu_call_limit_s: float = 0.5
    skip_providers: tuple[str, ...] = ()  # providers the user left out (--skip-providers)


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    status: str  # "ok" | "unavailable: ..." | "skipped: ..." | "error: ..." | "no cases yet ..."
    time_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_of_ceiling: float | None = None
    ceiling: str = ""
    speedup_vs_torch: float | None = None
    role: str = ""  # "fastcram" (the op as training runs it) | "own" (its variants, native CUDA) | "peer"
    best_peer: str = ""  # on the fastcram row: the fastest peer timed in this case
    vs_best_peer: float | None = None  # on the fastcram row: its time / that peer's time (< 1: fastcram faster)
    check: str = ""  # a peer's output check against the reference (peer_check.py)
    peak_mem_mib: float | None = None
    bound: str = ""
    bytes: int | None = None
    flops: int | None = None
    timer: str = ""
    env: dict = field(default_factory=dict)  # device, versions, git sha, date

    def csv_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "env"}
        d.update({k: self.env.get(k, "") for k in ("device", "torch", "triton", "cuda", "git_sha", "date")})
        return {k: _fmt(d[k]) for k in CSV_COLUMNS}


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ---------------------------------------------------------------- discovery

def collect_cases(settings: Settings, modules: dict[str, tuple[str, ...]] | None = None,
                  package: str = __package__) -> tuple[list[Case], list[Row]]:
    """The cases of the requested ops, plus a "no cases yet" row for every op that contributes none."""
    modules = CASE_MODULES if modules is None else modules
    cases: list[Case] = []
    placeholders: list[Row] = []
    dname = _dtype_name(settings.dtype)
    for mod_name, mod_ops in modules.items():
        wanted = [op for op in mod_ops if op in settings.ops]
        if not wanted:
            continue
        full = f"{package}.{mod_name}"
        try:
            mod = importlib.import_module(full)
            found = [c for c in mod.cases(settings.quick, settings.device, settings.dtype) if c.op in wanted]
            why = f"no cases yet ({mod_name}.py lists none)"
        except ModuleNotFoundError as e:
            if e.name != full:
                raise  # a missing dependency inside the module is a real error, not "not written yet"
            found, why = [], f"no cases yet ({mod_name}.py not written)"
        cases.extend(found)
        for op in wanted:
            if not any(c.op == op for c in found):
                placeholders.append(Row(op, "-", "-", "-", dname, why))
    return cases, placeholders


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


# ---------------------------------------------------------------- one provider

def is_gpu_only(provider: str) -> bool:
    return provider.split("(")[0] in GPU_ONLY_PROVIDERS


def role(provider: str) -> str:
    if provider == FASTCRAM:
        return "fastcram"
    return "own" if provider.split("(")[0] in OWN else "peer"


def is_compiled(provider: str) -> bool:
    """torch.compile, torch.compile-max-autotune, cublas+compiled-epilogue, ..."""
    return "compile" in provider


def skip_before_setup(case: Case, provider: str, settings: Settings, ceilings: Ceilings) -> str | None:
    """Reasons known without setting the provider up: compile left out, or a case too large for a quick CPU
    run. GPU-only providers are always set up on the CPU, so that their own Unavailable reason is shown."""
    if provider in settings.skip_providers:
        return "skipped: left out by --skip-providers"
    if is_compiled(provider) and not settings.compile:
        return "skipped: torch.compile is slow to build on the CPU; pass --compile to include it"
    if is_gpu_only(provider) and not settings.device.startswith("cuda"):
        return None
    return cpu_too_slow(case, settings, ceilings)


def skip_after_setup(case: Case, provider: str, settings: Settings, ceilings: Ceilings) -> str | None:
    """A GPU-only provider that did set up on the CPU (e.g. through the Triton interpreter) is not timed."""
    if is_gpu_only(provider) and not settings.device.startswith("cuda"):
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        how = " through the Triton interpreter (TRITON_INTERPRET=1, for correctness only)" if interp else ""
        return f"skipped: {provider} set up on the CPU{how}; it is timed on a GPU only"
    return cpu_too_slow(case, settings, ceilings)


def predicted_s(case: Case, ceilings: Ceilings) -> float:
    """Roofline lower bound of one call: the larger of bytes over the copy rate and FLOPs over the matmul rate."""
    t_mem = case.bytes / (ceilings.copy_gbps * 1e9) if case.bytes and ceilings.copy_gbps else 0.0
    t_math = case.flops / (ceilings.matmul_tflops * 1e12) if case.flops and ceilings.matmul_tflops else 0.0
    return max(t_mem, t_math)


def cpu_too_slow(case: Case, settings: Settings, ceilings: Ceilings) -> str | None:
    if settings.device.startswith("cuda") or not settings.quick:
        return None
    t = predicted_s(case, ceilings)
    if t <= settings.cpu_call_limit_s:
        return None
    return (f"skipped: too large for a quick CPU run (>= {t:.2g} s a call at this CPU's measured "
            f"ceilings; the case file gives no CPU-sized shape)")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _warm_up(fn: Callable[[], object], device: str) -> None:
    """The first call compiles and autotunes; it stays out of the timing and the memory figure."""
    out = fn()
    del out
    _sync(device)


def _peak_mem_mib(fn: Callable[[], object], device: str) -> float | None:
    """Extra device memory one call needs at its peak, over what its inputs already hold."""
    if not device.startswith("cuda"):
        return None
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


def measure_provider(case: Case, provider: str, settings: Settings, ceilings: Ceilings, env: dict) -> Row:
    """Set up one provider of one case and time it; any failure becomes the row's status."""
    row = Row(case.op, provider, case.mode, case.shape, case.dtype, "ok", bound=case.bound, bytes=case.bytes,
              flops=case.flops, ceiling=ceilings.for_bound(case.bound)[1], role=role(provider), env=env)
    skip = skip_before_setup(case, provider, settings, ceilings)
    if skip:
        row.status = skip
        return row
    fn = None
    try:
        fn = case.providers[provider]()  # GPU-only providers raise Unavailable here on the CPU
        row.check = getattr(fn, "check", "")  # a peer's verdict: it agreed with the reference
        skip = skip_after_setup(case, provider, settings, ceilings)
        if skip:
            row.status = skip
            return row
        _warm_up(fn, settings.device)
        row.peak_mem_mib = _peak_mem_mib(fn, settings.device)
        t = time_fn(fn, settings.device)
    except Unavailable as e:
        row.status = f"unavailable: {e}"
        return row
    except Disagrees as e:  # checked before timing: a wrong answer is reported, never timed
        row.status = f"disagrees: {e}"[:300]
        row.check = "disagrees"
        return row
    except Exception as e:  # a broken provider is reported in its row; the other providers still run
        row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return row
    finally:
        del fn
        _release(provider, settings.device)
    _fill_rates(row, t, case, ceilings)
    return row


def _fill_rates(row: Row, t: Timing, case: Case, ceilings: Ceilings) -> None:
    row.time_ms, row.p20_ms, row.p80_ms, row.timer = t.median_ms, t.p20_ms, t.p80_ms, t.timer
    seconds = t.median_ms * 1e-3
    row.gbps = case.bytes / seconds / 1e9 if case.bytes else None
    row.tflops = case.flops / seconds / 1e12 if case.flops else None
    ceiling = ceilings.for_bound(case.bound)[0]
    rate = row.tflops if case.bound == "compute" else row.gbps
    row.pct_of_ceiling = 100.0 * rate / ceiling if rate and ceiling else None


def _release(provider: str, device: str) -> None:
    """Free what a provider held; forget compiled graphs so the next case compiles for its own shape."""
    if is_compiled(provider):
        torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def add_speedups(rows: list[Row]) -> None:
    """speedup = torch eager time / this row's time, within one case; the fastcram row's ratio to the best peer."""
    base = next((r.time_ms for r in rows if r.provider == "torch" and r.time_ms), None)
    for r in rows:
        if base and r.time_ms:
            r.speedup_vs_torch = base / r.time_ms
    best = min((r for r in rows if counts_as_peer(r)), key=lambda r: r.time_ms, default=None)
    for r in rows:
        if r.role == "fastcram" and best is not None:
            r.best_peer = best.provider
            if r.time_ms:
                r.vs_best_peer = r.time_ms / best.time_ms


def counts_as_peer(r: Row) -> bool:
    """A timed peer fastcram may be compared with: the reference itself, or one whose output check agreed."""
    checked = r.provider == REFERENCE or r.check.startswith("agrees")
    return r.role == "peer" and r.status == "ok" and bool(r.time_ms) and checked


# ---------------------------------------------------------------- the run

class CsvSink:
    """Appends rows as they are measured (header first), flushing each time."""

    def __init__(self, path: str):
        self.path = path
        with writing(path):  # a full disk is one line naming the file
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "w", newline="")
            self._w = csv.DictWriter(self._f, fieldnames=CSV_COLUMNS)
            self._w.writeheader()
            self._f.flush()

    def write(self, rows: list[Row]) -> None:
        with writing(self.path):
            for r in rows:
                self._w.writerow(r.csv_dict())
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def run(settings: Settings, csv_path: str, modules: dict | None = None, log: TextIO = sys.stderr,
        ceilings: Ceilings | None = None) -> tuple[list[Row], Ceilings]:
    """Time every provider of every case; returns all rows (placeholders and failures included)."""
    env = {**environment(settings.device), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    cases, placeholders = collect_cases(settings, modules)
    if ceilings is None:
        print(f"measuring the ceilings on {env['device']} ...", file=log, flush=True)
        ceilings = measure(settings.device, settings.dtype)
    print(f"ceilings: copy {ceilings.copy_gbps:.1f} GB/s, matmul {ceilings.matmul_dtype} "
          f"{ceilings.matmul_tflops:.2f} TFLOP/s ({ceilings.how})", file=log, flush=True)
    for r in placeholders:
        r.env = env
    sink = CsvSink(csv_path)
    rows: list[Row] = []
    done = 0
    try:
        for op in _op_order(cases, placeholders):  # op by op, so the CSV reads like the table
            sink.write([r for r in placeholders if r.op == op])
            rows.extend(r for r in placeholders if r.op == op)
            for case in (c for c in cases if c.op == op):
                case_rows = [measure_provider(case, p, settings, ceilings, env) for p in case.providers]
                add_speedups(case_rows)
                sink.write(case_rows)
                rows.extend(case_rows)
                done += 1
                print(f"[{done}/{len(cases)}] {_case_line(case, case_rows)}", file=log, flush=True)
    finally:
        sink.close()
    return rows, ceilings


def _op_order(cases: list[Case], placeholders: list[Row]) -> list[str]:
    seen = [op for op in ALL_OPS if any(c.op == op for c in cases) or any(r.op == op for r in placeholders)]
    extra = [c.op for c in cases if c.op not in ALL_OPS]  # ops this runner does not know yet still run
    return seen + list(dict.fromkeys(extra))


def _case_line(case: Case, rows: list[Row]) -> str:
    parts = [f"{r.provider} {r.time_ms:.4g} ms" if r.time_ms else f"{r.provider} ({r.status.split(':')[0]})"
             for r in rows]
    return f"{case.op} {case.mode} {case.shape} {case.dtype}: " + ", ".join(parts)


def failures(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.status.startswith("error")]


# ---------------------------------------------------------------- the terminal table

TABLE_HEADERS = ["op", "mode", "shape", "dtype", "provider", "median ms", "p20-p80 ms", "rate", "% ceiling",
                 "vs torch", "/ best peer", "peak MiB", "status"]


def table_cells(rows: list[Row]) -> list[list[str]]:
    def num(v, spec: str) -> str:
        return "" if v is None else format(v, spec)

    cells = []
    for r in rows:
        spread = f"{r.p20_ms:.4g}-{r.p80_ms:.4g}" if r.p20_ms is not None else ""
        cells.append([r.op, r.mode, r.shape, r.dtype, r.provider, num(r.time_ms, ".4g"), spread, _rate(r),
                      num(r.pct_of_ceiling, ".1f"),
                      "" if r.speedup_vs_torch is None else f"{r.speedup_vs_torch:.2f}x",
                      f"{r.vs_best_peer:.2f} ({r.best_peer})" if r.vs_best_peer is not None else "",
                      num(r.peak_mem_mib, ".1f"), _status(r)])
    return cells


def _status(r: Row) -> str:
    """The status, and for a peer that was timed or skipped after its check, that it agreed."""
    return f"{r.status} (output check: agrees)" if r.check.startswith("agrees") else r.status


def _rate(r: Row) -> str:
    """The rate that matters for the case's bound: GB/s for memory-bound, TFLOP/s for compute-bound."""
    if r.bound == "compute" and r.tflops is not None:
        return f"{r.tflops:.3g} TFLOP/s"
    if r.gbps is not None:
        return f"{r.gbps:.4g} GB/s"
    return ""
