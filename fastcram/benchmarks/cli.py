"""Flags of `fastcram bench ...`: kernels (microbenchmarks), step (end-to-end), compile (the kernels built for
GPU architectures on any machine), plot (PNGs from the CSVs).

This file only turns flags into settings; the work is in kernels.py, step.py, compile_report.py and plot.py.
torch is imported inside the handlers so that `--help` stays instant.
"""
from __future__ import annotations

import glob
import os
import sys
import time

from ..config import positive_float as _positive_float, positive_int as _positive_int
from ..errors import UserError
from ..files import check_output_dir, check_output_file

RESULTS_DIR = os.path.join("bench", "results")
OPS = ("layer_norm", "add_layer_norm", "ffn", "mlm_loss")


def _compile_flags(p) -> None:
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile (default on a GPU; slow to build on the CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="kernel microbenchmarks, the training-step benchmark, plots",
                       description="Benchmarks. Results go to CSV files (default under bench/results/).")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)

    k = bsub.add_parser("kernels", help="time every fused op's providers side by side against the device's "
                                        "measured copy and matmul ceilings")
    k.add_argument("--ops", nargs="+", metavar="OP", help=f"ops to run (default all): {', '.join(OPS)}")
    k.add_argument("--quick", action="store_true", help="fewer, smaller shapes (seconds on a CPU)")
    k.add_argument("--skip-providers", nargs="+", metavar="P", default=[],
                   help="providers to leave out, e.g. torch.compile-max-autotune (slow to build)")
    k.add_argument("--csv", metavar="FILE", help="CSV to write (default bench/results/kernels-<device>-<time>.csv)")
    k.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    k.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="default bf16 on a GPU, fp32 on the CPU")
    _compile_flags(k)
    k.add_argument("--cpu-call-limit", type=_positive_float("--cpu-call-limit"), default=0.5, metavar="S",
                   help="with --quick on the CPU, skip cases whose roofline estimate is over S seconds a call "
                        "(default 0.5)")
    k.add_argument("--plain", action="store_true", help="plain table even when rich is installed")
    k.set_defaults(func=cmd_kernels)

    s = bsub.add_parser("step", help="training-step tokens/s and MFU of any combination of the step-level "
                                     "switches, side by side, and HF BERT")
    s.add_argument("--preset", help="model preset (default crammed-bert on a GPU, tiny on the CPU)")
    s.add_argument("--repeats", type=_positive_int("--repeats"), default=3, help="timed repeats (default 3)")
    s.add_argument("--micro-batch", type=_positive_int("--micro-batch"), help="sequences per step "
                                                                              "(default: the preset's)")
    s.add_argument("--steps", type=_positive_int("--steps"), help="timed steps per repeat (default 20 on a GPU, "
                                                                  "3 on the CPU)")
    s.add_argument("--warmup", type=_positive_int("--warmup"), help="untimed steps first, where compile happens "
                                                                    "(default 3 on a GPU, 1 on the CPU)")
    s.add_argument("--variants", "--backends", nargs="+", metavar="V",
                   default=["fastcram", "torch", "hf", "liger"],
                   help="variants, each a set of switch values [NAME:]KEY=VALUE+KEY=VALUE (e.g. kernels=torch "
                        "kernels=triton+residual=bf16; commas also separate), or a shorthand: fastcram (as the "
                        "auto-tuner left it on this machine), torch, triton, hf (Hugging Face BERT), liger "
                        "(Liger-Kernel's kernels in fastcram). Keys: " + ", ".join(_switch_keys()) +
                        " (default: fastcram torch hf liger)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    _compile_flags(s)
    s.add_argument("--peak-tflops", type=_positive_float("--peak-tflops"),
                   help="dense bf16 peak for MFU when fastcram's table lacks the GPU")
    s.add_argument("--csv", metavar="FILE", help="CSV to write (default bench/results/step-<device>-<time>.csv)")
    s.add_argument("--plain", action="store_true", help="plain table even when rich is installed")
    s.set_defaults(func=cmd_step)

    c = bsub.add_parser("compile", help="compile every Triton kernel for GPU architectures on this machine (no GPU "
                                         "needed): registers, shared memory, spills, occupancy, wgmma/TMA use")
    c.add_argument("--arch", default="90a,80", help="architectures, comma-separated (default 90a,80)")
    c.add_argument("--ops", nargs="+", metavar="OP", help="ops or op files to compile (default all)")
    c.add_argument("--micro-batches", default="32,64,128,256,512,1024", metavar="N,N",
                   help="micro-batches of crammed-bert to specialize for (default the GPU search's 32..1024)")
    c.add_argument("--preset", default="crammed-bert", help="model preset whose shapes are compiled")
    c.add_argument("--all-configs", action="store_true",
                   help="also compile the configs the pruner drops for an architecture (marked pruned=yes)")
    c.add_argument("--check-driver", action="store_true",
                   help="on a GPU: load every compiled kernel into the CUDA driver and compare its registers and "
                        "spills with the report's (tools/gpu_check.sh does this)")
    c.add_argument("--native-lib", default=NATIVE_LIB_DEFAULT, metavar="FILE",
                   help="CMake-built native library to report too (default build/libfastcram_native.so)")
    c.add_argument("--csv", metavar="FILE", help="CSV to write (default bench/results/compile-<arches>-<time>.csv)")
    c.add_argument("--plain", action="store_true", help="plain table even when rich is installed")
    c.set_defaults(func=cmd_compile)

    pl = bsub.add_parser("plot", help="one PNG per op from benchmark CSVs (needs matplotlib)")
    pl.add_argument("csv", nargs="*", metavar="CSV", help="CSV files (default: bench/results/*.csv)")
    pl.add_argument("--out", metavar="DIR", default=os.path.join(RESULTS_DIR, "plots"),
                    help="folder for the PNGs (default bench/results/plots)")
    pl.set_defaults(func=cmd_plot)
    _add_speedrun(bsub)


def _switch_keys() -> list[str]:
    from ..train.switches import OP_PREFIX, SWITCHES

    return [f"{k} ({'|'.join(s.values)})" for k, s in SWITCHES.items()] + [f"{OP_PREFIX}<op> (torch|triton|cuda)"]


def _split(values: list[str]) -> list[str]:
    """Accept both `--ops a b` and `--ops a,b`."""
    return [v for item in values for v in item.split(",") if v]


def _default_csv(kind: str, device_name: str) -> str:
    from .plot import slug

    return os.path.join(RESULTS_DIR, f"{kind}-{slug(device_name)}-{time.strftime('%Y%m%d-%H%M%S')}.csv")


def _csv_path(given: str | None, kind: str, device_name: str) -> str:
    """--csv (or the default under bench/results/), checked before anything is measured."""
    return check_output_file(given or _default_csv(kind, device_name), "--csv", make_parent=True,
                             example=f"{kind}.csv")


def _device(name: str) -> str:
    from ..train.step import resolve_device

    return resolve_device(name)


def cmd_kernels(args) -> int:
    ops = _split(args.ops) if args.ops else list(OPS)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise UserError(f"--ops {' '.join(unknown)}: unknown op; choose from {', '.join(OPS)}")
    device = _device(args.device)

    from ..observe.env_info import device_name
    from . import kernels
    from .table import print_table

    gpu = device.startswith("cuda")
    dtype = kernels.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    settings = kernels.Settings(device=device, dtype=dtype, quick=args.quick,
                                compile=gpu if args.compile is None else args.compile, ops=tuple(ops),
                                cpu_call_limit_s=args.cpu_call_limit,
                                skip_providers=tuple(_split(args.skip_providers)))
    path = _csv_path(args.csv, "kernels", device_name(device))
    rows, ceil = kernels.run(settings, path)
    title = (f"fastcram bench kernels on {rows[0].env.get('device', device) if rows else device}: ceilings copy "
             f"{ceil.copy_gbps:.1f} GB/s, matmul {ceil.matmul_dtype} {ceil.matmul_tflops:.2f} TFLOP/s")
    print_table(kernels.TABLE_HEADERS, kernels.table_cells(rows), title, plain=args.plain)
    print(f"wrote {path}", file=sys.stderr)
    bad = kernels.failures(rows)
    if bad:
        print(f"fastcram: {len(bad)} provider run(s) failed; see the status column", file=sys.stderr)
        return 1
    return 0


def cmd_step(args) -> int:
    device = _device(args.device)

    from ..config import PRESETS, TrainConfig, preset
    from ..observe.env_info import device_name
    from ..train.compile_cache import compile_caches, describe
    from . import step
    from .table import print_table

    variants = step.parse(_split(args.variants))  # a bad variant is one line naming it, before any work
    gpu = device.startswith("cuda")
    name = args.preset or ("crammed-bert" if gpu else "tiny")
    if name not in PRESETS:
        raise UserError(f"--preset {name}: unknown; choose one of {', '.join(PRESETS)}")
    micro = args.micro_batch or preset(name).train_overrides.get("micro_batch", TrainConfig().micro_batch)
    settings = step.StepSettings(
        preset=name, device=device, micro_batch=micro, steps=args.steps or (20 if gpu else 3),
        warmup=args.warmup or (3 if gpu else 1), repeats=args.repeats,
        compile=gpu if args.compile is None else args.compile, variants=tuple(variants),
        peak_tflops=args.peak_tflops)
    if settings.repeats < 3:
        print("fastcram: fewer than 3 repeats: the spread is not meaningful", file=sys.stderr)
    path = _csv_path(args.csv, "step", device_name(device))
    with compile_caches() as caches:
        print(f"compile caches: {describe(caches)}", file=sys.stderr)
        rows = step.run(settings, path)
    title = (f"fastcram bench step: {name}, micro-batch {micro}, {settings.repeats} x {settings.steps} steps "
             f"on {rows[0].env.get('device', device) if rows else device} ({step.DATA_NOTE})")
    print_table(step.TABLE_HEADERS, step.table_cells(rows), title, plain=args.plain)
    print(f"wrote {path}", file=sys.stderr)
    bad = [r for r in rows if r.status.startswith("error")]
    if bad:
        print(f"fastcram: {len(bad)} variant(s) failed; see the status column", file=sys.stderr)
        return 1
    return 0


NATIVE_LIB_DEFAULT = os.path.join("build", "libfastcram_native.so")  # where CMakeLists.txt builds it


def cmd_compile(args) -> int:
    from ..config import PRESETS
    from . import compile_report as cr
    from .table import print_table

    arches = tuple(dict.fromkeys(_split([args.arch])))  # each architecture once, in the order given
    from ..ops._triton import HAVE_TRITON
    from ..ops.compile_only import ARCHS, cuobjdump

    if not HAVE_TRITON:
        raise UserError("bench compile needs triton (pip install triton); the report compiles its kernels")
    if cuobjdump() is None:
        raise UserError("bench compile needs the cuobjdump that Triton's wheel ships (or one on PATH); reinstall "
                        "triton")

    bad = [a for a in arches if a not in ARCHS]
    if bad or not arches:
        raise UserError(f"--arch {args.arch}: unknown architecture(s) {', '.join(bad) or '(none)'}; choose from "
                        f"{', '.join(ARCHS)}")
    try:
        micro = tuple(int(m) for m in _split([args.micro_batches]))
    except ValueError:
        micro = ()
    if not micro or min(micro) <= 0:
        raise UserError(f"--micro-batches {args.micro_batches}: give positive whole numbers, e.g. 32,256")
    if args.preset not in PRESETS:
        raise UserError(f"--preset {args.preset}: unknown; choose one of {', '.join(PRESETS)}")
    path = check_output_file(args.csv or os.path.join(RESULTS_DIR, f"compile-{'-'.join('sm' + a for a in arches)}-"
                                                                   f"{time.strftime('%Y%m%d-%H%M%S')}.csv"),
                             "--csv", make_parent=True, example="compile.csv")
    if args.native_lib and not os.path.isfile(args.native_lib):
        if args.native_lib != NATIVE_LIB_DEFAULT:
            raise UserError(f"--native-lib {args.native_lib} does not exist; build kernels/ (cmake -S . -B build && "
                            f"cmake --build build) or pass --native-lib '' to leave the native kernels out")
        print(f"fastcram: no native rows: {NATIVE_LIB_DEFAULT} is not built (cmake -S . -B build && cmake --build "
              f"build)", file=sys.stderr)
    settings = cr.ReportSettings(arches=arches, ops=tuple(_split(args.ops)) if args.ops else None,
                                 preset=args.preset, micro_batches=micro, all_configs=args.all_configs,
                                 native_lib=args.native_lib, check_driver=args.check_driver)
    if args.check_driver:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--check-driver needs a CUDA GPU (it loads the kernels into the driver); leave it out "
                            "on a machine without one")
        major, minor = torch.cuda.get_device_capability()
        mine = {(9, 0): "90a", (8, 0): "80"}.get((major, minor))
        if mine is None or arches != (mine,):
            raise UserError(f"--check-driver loads kernels into this GPU (sm_{major}{minor}): pass --arch "
                            f"{mine or 'of this GPU'}" + ("" if mine else "; only 90a and 80 are known"))
    rows = cr.run(settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    headers, cells = cr.table(rows)
    import triton

    title = f"{len(rows)} kernels for sm_{', sm_'.join(arches)} (Triton {triton.__version__})"
    print_table(headers, cells, f"fastcram bench compile: {title}", plain=args.plain)
    print_table(*cr.summary(rows), f"summary: {title}; kept = the configs the pruner keeps that launch",
                plain=args.plain)
    cr.write_csv(rows, path)
    print(f"wrote {path}", file=sys.stderr)
    failed = [r for r in rows if str(r.get("status", "")).startswith("error")]
    if failed:
        print(f"fastcram: {len(failed)} plan(s) failed to compile; see the status column", file=sys.stderr)
        return 1
    if args.check_driver:
        checked = sum("driver_regs" in r for r in rows)
        bad = cr.driver_mismatches(rows)
        for r in bad:
            print(f"fastcram: the driver disagrees on {r['kernel']} {r['config']} {r['dtypes']}: report regs "
                  f"{r['regs']}, local {r['local_bytes']} B; driver regs {r['driver_regs']}, spills "
                  f"{r['driver_spills']}", file=sys.stderr)
        print(f"fastcram: {checked} kernels loaded into the driver; registers and spills "
              f"{'agree' if not bad else f'differ for {len(bad)}'}", file=sys.stderr)
        return 1 if bad or not checked else 0
    return 0


def cmd_plot(args) -> int:
    from .plot import plot

    paths = args.csv or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.csv")))
    if not paths:
        raise UserError(f"no CSV given and none in {RESULTS_DIR}/; run `fastcram bench kernels` first or pass "
                        f"CSV files")
    check_output_dir(args.out, "--out")
    for path in plot(paths, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _add_speedrun(bsub) -> None:
    """Flags of `fastcram bench speedrun` (the work is in speedrun.py)."""
    import argparse

    from ..config import positive_float as _positive_float

    r = bsub.add_parser("speedrun", help="wall time to a held-out MLM loss over several seeds: how fast the "
                                         "model learns, not only how many tokens/s",
                        description="Each run is a `fastcram train` with a budget of --max-minutes (its schedules "
                                    "follow it), stopped at the first held-out evaluation at or under --target-loss. "
                                    "Time to target: the budget clock there (compile included, evaluation excluded). "
                                    "Flags after -- go to every `fastcram train`, e.g. -- --kernels triton.")
    r.add_argument("--target-loss", type=_positive_float("--target-loss"), required=True, metavar="L",
                   help="held-out MLM loss to reach")
    r.add_argument("--preset", help="model preset (default crammed-bert on a GPU, tiny on the CPU)")
    r.add_argument("--data", metavar="DIR", help="a folder made by `fastcram data prepare`, with a held-out split "
                                                 "(default: the built-in corpus)")
    r.add_argument("--runs", type=_positive_int("--runs"), default=3, help="runs, seeds 0..N-1 (default 3)")
    r.add_argument("--max-minutes", type=_positive_float("--max-minutes"), default=10.0, metavar="M",
                   help="each run's budget in minutes; its lr and batch schedules follow it (default 10)")
    r.add_argument("--eval-every", default="2%", metavar="P%|S",
                   help="evaluate each time the budget spent has grown by P%% (the time to target is known to "
                        "about P%%), or every S seconds (default 2%%)")
    r.add_argument("--seed", type=int, default=0, help="seed of the first run (default 0)")
    r.add_argument("--out", metavar="DIR", help="folder for the runs (default runs/speedrun-<time>)")
    r.add_argument("--json", metavar="FILE", help="report (default bench/results/speedrun-<device>-<time>.json)")
    r.add_argument("--plain", action="store_true", help="plain table even when rich is installed")
    r.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_FLAGS",
                   help="more `fastcram train` flags for every run")
    r.set_defaults(func=cmd_speedrun)


def cmd_speedrun(args) -> int:
    import argparse

    from ..config import PRESETS, eval_every as _eval_every
    from . import speedrun
    from .plot import slug
    from .table import print_table

    try:
        _eval_every(args.eval_every)
    except argparse.ArgumentTypeError as e:
        raise UserError(str(e)) from None
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.preset is not None and args.preset not in PRESETS:
        raise UserError(f"--preset {args.preset}: unknown; choose one of {', '.join(PRESETS)}")
    import torch

    preset = args.preset or ("crammed-bert" if torch.cuda.is_available() else "tiny")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    settings = speedrun.SpeedrunSettings(
        target_loss=args.target_loss, preset=preset, max_minutes=args.max_minutes, runs=args.runs,
        data_dir=args.data, eval_every=args.eval_every, first_seed=args.seed,
        out_dir=args.out or os.path.join("runs", f"speedrun-{stamp}"), train_args=tuple(extra))
    speedrun.check_settings(settings)  # before any folder is made
    if args.json:
        check_output_file(args.json, "--json", make_parent=True, example="speedrun.json")
    json_dir = os.path.dirname(os.path.abspath(args.json or os.path.join(RESULTS_DIR, "x.json")))
    speedrun.check_outputs(settings.out_dir, settings, json_dir, "--json" if args.json else f"{RESULTS_DIR}/")
    rep = speedrun.run(settings, command=speedrun.command(settings))
    path = args.json or os.path.join(RESULTS_DIR, f"speedrun-{slug(rep['environment'].get('device', 'device'))}-"
                                                  f"{stamp}.json")
    speedrun.write(rep, path)
    print_table(speedrun.TABLE_HEADERS, speedrun.table_cells(rep), speedrun.title(rep), plain=args.plain)
    print(f"wrote {path}", file=sys.stderr)
    if rep["reached"] < rep["runs"]:
        print(f"fastcram: {rep['runs'] - rep['reached']} of {rep['runs']} run(s) did not reach held-out loss "
              f"{args.target_loss:g} within {args.max_minutes:g} min", file=sys.stderr)
        return 1
    return 0
