"""`fastcram bench compile`: every Triton kernel of fastcram/ops compiled for GPU architectures on this
machine (no GPU needed), as a real launch at crammed-bert's shapes would compile it.

Each op file's `compile_plan(cfg, micro_batch)` makes the launches the model makes, on meta tensors, through
the file's own launchers; fastcram/ops/compile_only.py turns those launches into compiles for the target
(the JIT's own specialization, every config the autotuner keeps) and reads each cubin back. One worker
process per architecture (Triton's caches are per process). Shapes that specialize identically are compiled
once: the row names the first micro-batch that needed it.

Columns: kernel, config, argument dtypes, status, registers a thread, shared memory bytes, local memory
bytes a thread (the stack frame: what the driver reports, its n_spills is a quarter of it), spill stores
(STL instructions in the SASS: the real spills), threads a CTA, resident CTAs an SM, whether the PTX uses wgmma, TMA and cp.async, compile seconds.
The native CUDA kernels of kernels/ get the same columns from the CMake-built library when it exists.
"""
from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from ..errors import UserError

ARCHES = ("90a", "80")
MICRO_BATCHES = (32, 64, 128, 256, 512, 1024)  # the GPU micro-batch search's candidates
COLUMNS = ["op", "kernel", "arch", "config", "dtypes", "status", "regs", "shared_bytes", "local_bytes",
           "spill_stores", "threads", "ctas_per_sm", "wgmma", "tma", "cp_async", "uses_dot", "pruned", "compile_s",
           "micro_batch", "triton", "driver_regs", "driver_spills"]


@dataclass
class ReportSettings:
    arches: tuple = ARCHES
    ops: tuple | None = None  # op modules (fastcram/ops/<name>.py); None: every module with a compile_plan
    preset: str = "crammed-bert"
    micro_batches: tuple = MICRO_BATCHES
    all_configs: bool = False  # compile the configs the pruner drops too (marked pruned=yes)
    check_driver: bool = False  # on a GPU: also load every cubin into the driver and record its n_regs/n_spills
    native_lib: str | None = os.path.join("build", "libfastcram_native.so")
    workers: int = 2
    env: dict = field(default_factory=dict)  # extra environment for the workers (tests)


def plan_modules(names=None) -> list[str]:
    """The op modules that describe their launches (fastcram/ops/<name>.py with compile_plan)."""
    from ..ops import OP_MODULES

    known = sorted(set(OP_MODULES.values()))
    if names:
        unknown = [n for n in names if n not in known and n not in OP_MODULES]
        if unknown:
            raise UserError(f"--ops: unknown {', '.join(unknown)}; known: {', '.join(sorted(OP_MODULES))}")
        return sorted({OP_MODULES.get(n, n) for n in names})
    return known


# ------------------------------------------------------------------------------------------------ worker
def run_worker(arch: str, modules: list[str], preset_name: str, micro_batches, all_configs: bool,
               check_driver: bool = False) -> list[dict]:
    """In a process without TRITON_INTERPRET: compile every plan's launches for `arch`; one row a kernel.
    check_driver (on a GPU): load each cubin into the real driver too and add its n_regs and n_spills."""
    import triton

    from ..config import preset
    from ..ops.compile_only import compile_only, driver_usage

    cfg = preset(preset_name).model
    rows = []
    with compile_only(arch, keep_all_configs=all_configs, keep_cubins=check_driver) as target:
        for mb in micro_batches:
            for name in modules:
                mod = importlib.import_module(f"fastcram.ops.{name}")
                start = len(target.records)
                try:
                    mod.compile_plan(cfg, mb)
                except Exception as e:  # a launch that cannot compile or load: one row, the rest goes on
                    rows.append({"op": name, "kernel": "-", "arch": arch, "status": f"error: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}", "micro_batch": mb})
                for rec in target.records[start:]:
                    rows.append(_row(name, rec, mb, target))
                    rows[-1]["_rec"] = rec
    for r in rows:
        rec = r.pop("_rec", None)
        if check_driver and rec is not None and rec.cubin and rec.status == "ok":
            r["driver_regs"], r["driver_spills"] = driver_usage(rec)
        r["triton"] = triton.__version__
    return rows


def _row(module: str, rec, mb: int, target) -> dict:
    from ..ops.compile_only import blocks_per_sm

    ok = rec.status == "ok" and rec.regs is not None
    return {"op": module, "kernel": rec.kernel, "arch": rec.arch, "config": rec.config_name(),
            "dtypes": rec.dtypes, "status": rec.status, "regs": rec.regs, "shared_bytes": rec.shared,
            "local_bytes": rec.local, "spill_stores": rec.spill_stores, "threads": rec.threads,
            "ctas_per_sm": blocks_per_sm(target.arch, rec.regs, rec.shared, rec.threads) if ok else 0,
            **{k: "yes" if v else "no" for k, v in rec.uses.items()}, "uses_dot": "yes" if rec.uses_dot else "no",
            "pruned": "yes" if target.would_prune(rec) else "no", "compile_s": rec.compile_s, "micro_batch": mb}


# ------------------------------------------------------------------------------------------------ native
def native_rows(lib: str | None, arches) -> list[dict]:
    """The CMake-built CUDA kernels' registers, shared and local memory per architecture in the library."""
    from ..ops.compile_only import arch_of, blocks_per_sm, cuobjdump, native_resource_usage

    if not lib or not os.path.isfile(lib):
        return []
    tool = cuobjdump()
    if tool is None:
        return []
    rows = []
    usage = native_resource_usage(lib)  # {sm: {function: {...}}}
    for arch in arches:
        sm = arch_of(arch).capability
        if sm not in usage:
            rows.append({"op": "native", "kernel": "-", "arch": arch, "status": f"not built for sm_{sm} (configure "
                         f"with -DCMAKE_CUDA_ARCHITECTURES including {sm})"})
            continue
        for fn, u in sorted(usage[sm].items()):
            threads = u.get("MAX_THREADS", 0)
            rows.append({"op": "native", "kernel": u.get("name", fn), "arch": arch, "config": "-", "dtypes": "-",
                         "status": "ok", "regs": u["REG"], "shared_bytes": u["SHARED"],
                         "local_bytes": u.get("STACK", 0) + u.get("LOCAL", 0),
                         "threads": threads or "",
                         "ctas_per_sm": blocks_per_sm(arch_of(arch), u["REG"], u["SHARED"], threads) if threads
                         else "", "spill_stores": u.get("SPILL_STORES", ""),
                         **{col: ("yes" if u[key] else "no") if key in u else "-"
                            for col, key in (("wgmma", "WGMMA"), ("tma", "TMA"), ("cp_async", "CP_ASYNC"))},
                         "uses_dot": "-", "pruned": "no",
                         "compile_s": "", "micro_batch": ""})
    return rows


# ------------------------------------------------------------------------------------------------ driver
def run(settings: ReportSettings, log=print) -> list[dict]:
    """One worker process per architecture (two at a time), then the native library's rows."""
    modules = plan_modules(settings.ops)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, not interpret
    env.update(settings.env)
    procs = []
    with tempfile.TemporaryDirectory(prefix="fastcram-compile-report-") as tmp:
        pending = list(settings.arches)
        results: dict[str, list[dict]] = {}
        while pending or procs:
            while pending and len(procs) < max(1, settings.workers):
                arch = pending.pop(0)
                out = os.path.join(tmp, f"{arch}.json")
                cmd = [sys.executable, "-m", "fastcram.benchmarks.compile_report", "--worker", arch,
                       "--modules", ",".join(modules), "--preset", settings.preset,
                       "--micro-batches", ",".join(map(str, settings.micro_batches)), "--out", out]
                if settings.all_configs:
                    cmd.append("--all-configs")
                if settings.check_driver:
                    cmd.append("--check-driver")
                log(f"compiling {', '.join(modules)} for sm_{arch} ...")
                procs.append((arch, out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                          stderr=subprocess.STDOUT, text=True)))
            arch, out, p = procs.pop(0)
            text, _ = p.communicate()
            if p.returncode != 0 or not os.path.isfile(out):
                raise RuntimeError(f"the sm_{arch} compile worker failed (exit {p.returncode}):\n{text[-3000:]}")
            with open(out) as f:
                results[arch] = json.load(f)
    rows = [r for arch in settings.arches for r in results[arch]]
    rows += native_rows(settings.native_lib, settings.arches)
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    from ..files import atomic_write_bytes

    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in COLUMNS})
    atomic_write_bytes(path, buf.getvalue().encode())


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["op", "kernel", "arch", "config", "dtypes", "status", "regs", "smem", "local", "spills", "thr",
               "CTA/SM", "wgmma", "tma", "cp.async", "s"]
    keys = ["op", "kernel", "arch", "config", "dtypes", "status", "regs", "shared_bytes", "local_bytes",
            "spill_stores", "threads", "ctas_per_sm", "wgmma", "tma", "cp_async", "compile_s"]
    return headers, [[str(r.get(k, "")) for k in keys] for r in rows]


def summary(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One line per (op, kernel, arch, dtypes): configs compiled, registers, shared memory, spills, CTAs an
    SM, and what the PTX uses; the full rows are in the CSV."""
    groups: dict = {}
    for r in rows:
        if r.get("kernel", "-") == "-":
            continue
        groups.setdefault((r["op"], r["kernel"].split("<")[0], r["arch"], r.get("dtypes", "-")), []).append(r)
    headers = ["op", "kernel", "arch", "dtypes", "configs", "kept", "regs", "smem KiB max", "spill stores",
               "CTA/SM", "wgmma", "tma", "cp.async"]
    out = []
    for (op, kernel, arch, dtypes), rs in groups.items():
        kept = [r for r in rs if r.get("pruned") != "yes" and r.get("status") == "ok"]
        regs = [int(r["regs"]) for r in kept if r.get("regs") not in (None, "")]
        ctas = [int(r["ctas_per_sm"]) for r in kept if r.get("ctas_per_sm") not in (None, "")]
        smem = max((int(r["shared_bytes"] or 0) for r in kept), default=0)

        def any_yes(key: str) -> str:
            vals = {r.get(key) for r in kept}
            return "yes" if "yes" in vals else ("-" if vals <= {"-", None} else "no")

        out.append([op, kernel, arch, dtypes, str(len(rs)), str(len(kept)),
                    f"{min(regs)}-{max(regs)}" if regs else "-", f"{smem / 1024:.1f}",
                    str(sum(int(r.get("spill_stores") or 0) for r in kept)),
                    f"{min(ctas)}-{max(ctas)}" if ctas else "-", any_yes("wgmma"), any_yes("tma"), any_yes("cp_async")])
    return headers, out


def _main(argv=None) -> int:
    """The worker entry point (`python -m fastcram.benchmarks.compile_report --worker ARCH ...`)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--modules", required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--micro-batches", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--all-configs", action="store_true")
    p.add_argument("--check-driver", action="store_true")
    a = p.parse_args(argv)
    rows = run_worker(a.worker, a.modules.split(","), a.preset, [int(m) for m in a.micro_batches.split(",")],
                      a.all_configs, a.check_driver)
    with open(a.out, "w") as f:
        json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(_main())


__all__ = ["ReportSettings", "run", "write_csv", "table", "asdict"]


def driver_mismatches(rows: list[dict]) -> list[dict]:
    """The rows (from `run` or read back from the CSV) whose registers or spills (local bytes / 4, as
    Triton's driver counts them) differ from what the CUDA driver reported for the same cubin."""
    def num(v) -> int:
        return int(v or 0)

    return [r for r in rows if r.get("driver_regs") not in (None, "")
            and (num(r["regs"]), num(r["local_bytes"]) // 4) != (num(r["driver_regs"]), num(r["driver_spills"]))]
