"""Compile real kernel launches for a chosen GPU architecture on any machine, without a GPU.

`CompileOnlyDriver(arch)` is a Triton driver: while it is active (`with compile_only("90a") as record:`),
every launch of a @triton.jit kernel goes the way a real launch goes (the JIT derives the specialization
from the arguments: dtypes, constexprs, the divisibility-by-16 of pointers and integers; the autotuner prunes
and "times" every config), is compiled for the target architecture, and is checked for the limits a real
load checks (shared memory, threads the registers allow); then nothing runs. Kernels are fed meta tensors
(shape and dtype, no data, data_ptr 0 so aligned like a CUDA allocation), so the launchers' own torch code
costs nothing. Each compiled kernel becomes a `Compiled` record: registers and local (spill) bytes from
cuobjdump of its cubin, shared memory, threads, and the PTX it was built from.

This is what `fastcram bench compile` reports. The op files need nothing from this module: their launchers
ask `_triton.multiprocessor_count(device)` for the SM count (the target's, for meta tensors) rather than
torch.cuda, and accept meta tensors while a target is in force.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

from ._triton import COMPILE_ONLY_TARGETS, HAVE_TRITON, triton


@dataclass(frozen=True)
class Arch:
    """The limits of one GPU architecture that decide whether and how often a kernel fits on an SM."""
    name: str  # "90a", "80"
    capability: int  # 90, 80
    sms: int  # of the reference part: H100/H200 SXM, A100
    smem_per_block: int  # opt-in maximum dynamic shared memory of one CTA, bytes
    smem_per_sm: int  # shared memory of one SM, bytes
    smem_reserved_per_block: int = 1024  # the system's share of every CTA (sm_80 and later)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    reg_alloc_unit: int = 256  # registers are given to a warp in units of this many


# CUDA C Programming Guide, "Compute capabilities" table; SM counts of the H100/H200 SXM and A100 datasheets.
ARCHS = {
    "90a": Arch("90a", 90, sms=132, smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
    "80": Arch("80", 80, sms=108, smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
}


def arch_of(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


def max_threads_per_block(arch: Arch, regs: int) -> int:
    """What the driver reports as CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK for a kernel using `regs`."""
    per_warp = -(-max(regs, 1) * 32 // arch.reg_alloc_unit) * arch.reg_alloc_unit
    return min(1024, arch.regs_per_sm // per_warp * 32)


def blocks_per_sm(arch: Arch, regs: int, shared: int, threads: int) -> int:
    """Resident CTAs per SM allowed by registers, shared memory, threads and the CTA limit."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // arch.reg_alloc_unit) * arch.reg_alloc_unit
    by_regs = arch.regs_per_sm // (per_warp * warps)
    by_smem = arch.smem_per_sm // (shared + arch.smem_reserved_per_block)
    by_threads = arch.max_threads_per_sm // threads
    return max(0, min(by_regs, by_smem, by_threads, arch.max_blocks_per_sm))


@dataclass
class Compiled:
    """One kernel compiled for one architecture with one specialization and config."""
    kernel: str
    arch: str
    constexprs: dict  # BLOCK sizes, flags, dtypes-as-constexpr ...
    specialization: str  # argument types and the divisibility attributes, as Triton keys them
    num_warps: int
    num_stages: int
    shared: int  # bytes of dynamic shared memory
    ptx: str = ""
    regs: int | None = None
    local: int | None = None  # bytes of local memory a thread: spills (the stack frame) and local arrays
    spill_stores: int | None = None  # STL instructions in the SASS: register spills
    threads: int = 0
    status: str = "ok"  # or "cannot launch: ..."
    compile_s: float | None = None  # None: compiled before this launch asked for it
    dtypes: str = ""  # element types of the pointer arguments, e.g. "bf16,fp32"
    uses_dot: bool = False  # the compiled kernel has a tt.dot (a GEMM: it should use wgmma on sm_90a)
    cubin: bytes = b""  # kept only when asked (to load it into a real driver: `bench compile --check-driver`)
    symbol: str = ""  # the kernel's function name inside the cubin

    @property
    def uses(self) -> dict:
        return {"wgmma": "wgmma.mma_async" in self.ptx, "tma": "cp.async.bulk.tensor" in self.ptx,
                "cp_async": re.search(r"cp\.async\.(ca|cg)\.", self.ptx) is not None}

    def config_name(self) -> str:
        sizes = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()) if k.isupper())
        return f"{sizes},warps={self.num_warps},stages={self.num_stages}"


def cuobjdump() -> str | None:
    """The cuobjdump that ships in Triton's wheel (or on PATH)."""
    if HAVE_TRITON:
        here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(here):
            return here
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """{function: {"REG": n, "SHARED": n, "LOCAL": n, ...}} from `cuobjdump -res-usage`."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with Triton's wheel)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return parse_resource_usage(out)


def spill_stores(cubin: bytes) -> int:
    """Local-memory stores (STL) in the SASS: register spills (a stack frame alone is not one)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\bSTL(\.\w+)*\s", sass))


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    usage, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return usage


# ------------------------------------------------------------------------------------------------ driver
class _Event:
    def record(self, *args):
        pass

    def elapsed_time(self, other) -> float:
        # Every config "takes" the same long time: do_bench then calls each once (one compile), and the
        # autotuner keeps its first config. All pruned configs get compiled, none runs.
        return 1e4


class _DeviceInterface:
    Event = staticmethod(lambda enable_timing=True: _Event())

    @staticmethod
    def synchronize(*args):
        pass


class _Utils:
    def __init__(self, driver: "CompileOnlyDriver"):
        self.driver = driver

    def get_device_properties(self, device) -> dict:
        a = self.driver.arch
        return {"max_shared_mem": a.smem_per_block, "max_num_regs": a.regs_per_sm, "multiprocessor_count": a.sms,
                "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}

    def load_binary(self, name, cubin, shared, device):
        """Where a real driver loads the cubin: read its registers and spills instead."""
        rec = self.driver.pending.pop(name)
        rec.symbol = name
        if self.driver.keep_cubins:
            rec.cubin = bytes(cubin)
        usage = resource_usage(cubin).get(name, {})
        # spills live in the stack frame: local memory a thread = STACK + LOCAL (the driver's LOCAL_SIZE_BYTES)
        rec.regs, rec.local = usage.get("REG"), usage.get("STACK", 0) + usage.get("LOCAL", 0)
        rec.spill_stores = spill_stores(cubin) if rec.local else 0
        max_threads = max_threads_per_block(self.driver.arch, rec.regs or 1)
        if rec.threads > max_threads:
            rec.status = f"cannot launch: {rec.threads} threads but its {rec.regs} registers allow {max_threads}"
        module = function = name  # not None: the kernel counts as loaded and is not loaded again
        return module, function, rec.regs or 0, (rec.local or 0) // 4, max_threads

    def unload_module(self, module):
        pass


class CompileOnlyDriver:
    """A Triton driver whose device is `arch` and whose launches compile and record, never run."""

    def __init__(self, arch: Arch, keep_all_configs: bool = False, keep_cubins: bool = False):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.keep_cubins = keep_cubins
        self.keep_all_configs = keep_all_configs  # compile what the pruner drops too (the report marks it)
        self.dropped: set = set()  # (kernel, config kwargs, warps, stages) the pruner dropped
        self.target = GPUTarget("cuda", arch.capability, 32)
        self.utils = _Utils(self)
        self.records: list[Compiled] = []
        self.pending: dict[str, Compiled] = {}
        self._started: dict = {}
        driver = self

        class Launcher:
            """Built once per compiled kernel, before its load: the moment its metadata is known."""

            def __init__(self, src, metadata):
                rec = driver._record(src, metadata)
                driver.pending[metadata.name] = rec
                if metadata.shared > arch.smem_per_block:
                    rec.status = (f"cannot launch: {metadata.shared} B of shared memory > {arch.smem_per_block} B "
                                  f"on sm_{arch.name}")

            def __call__(self, *args, **kwargs):
                pass  # nothing runs

        self.launcher_cls = Launcher

    # the DriverBase interface the JIT, the compiler and do_bench use
    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return _DeviceInterface

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1, device="meta")

    def clear_cache(self, cache):
        pass

    def get_benchmarker(self):
        from triton.testing import do_bench

        return do_bench

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    @staticmethod
    def is_active():
        return False  # never chosen by Triton itself; only set_active() installs it

    # bookkeeping
    def note_pruned(self, kernel: str, configs, launch: dict) -> None:
        given = {k: v for k, v in launch.items() if isinstance(v, (bool, int, str))}
        for c in configs:
            self.dropped.add((kernel, tuple(sorted({**given, **c.kwargs}.items())), c.num_warps, c.num_stages))

    def would_prune(self, rec: Compiled) -> bool:
        for kernel, kwargs, warps, stages in self.dropped:
            if (kernel == rec.kernel and warps == rec.num_warps and stages == rec.num_stages
                    and all(rec.constexprs.get(k, v) == v for k, v in kwargs)):  # launch keys not constexprs
                # of the kernel (the autotuner's grid, warmup) do not tell launches apart
                return True
        return False

    def _record(self, src, metadata) -> Compiled:
        fn = getattr(src, "fn", None)
        name = getattr(fn, "__name__", None) or metadata.name
        constexprs = {}
        for key, value in (getattr(src, "constants", None) or getattr(src, "constexprs", None) or {}).items():
            arg = key[0] if isinstance(key, tuple) and len(key) == 1 else key
            if isinstance(arg, int) and fn is not None:
                arg = fn.arg_names[arg]
            constexprs[str(arg)] = value if isinstance(value, (int, float, bool, str)) else str(value)
        signature = getattr(src, "signature", {}) or {}
        spec = f"{signature} {getattr(src, 'attrs', '')}"
        dtypes = sorted({str(t)[1:] for t in signature.values() if str(t).startswith("*")})
        rec = Compiled(kernel=name, arch=self.arch.name, constexprs=constexprs, specialization=spec,
                       num_warps=metadata.num_warps, num_stages=metadata.num_stages, shared=metadata.shared,
                       threads=metadata.num_warps * 32, ptx=_ptx_of(metadata),
                       compile_s=round(time.perf_counter() - self._started.pop(name), 3)
                       if name in self._started else None,
                       dtypes=",".join(dtypes), uses_dot="tt.dot" in _cached_text(metadata, "ttir"))
        self.records.append(rec)
        return rec

    def _compile_started(self, fn_name: str):
        self._started[fn_name] = time.perf_counter()


def _cached_text(metadata, ext: str) -> str:
    """One stage of the compile (ttir, ttgir, llir, ptx) read back from Triton's cache; "" when absent. The
    TTIR holds every tl.dot of the kernel, also those in the @triton.jit helpers it calls (inlined there)."""
    from triton.runtime.cache import get_cache_manager

    group = get_cache_manager(metadata.hash).get_group(f"{metadata.name}.json") or {}
    path = group.get(f"{metadata.name}.{ext}")
    if not path:
        return ""
    with open(path) as f:
        return f.read()


def _ptx_of(metadata) -> str:
    """The PTX the cubin was assembled from."""
    return _cached_text(metadata, "ptx")


@contextlib.contextmanager
def compile_only(arch_name: str, keep_all_configs: bool = False, keep_cubins: bool = False):
    """Launches inside compile for `arch_name` and are recorded; yields the driver (its `records`).

    Uses a fresh, private Triton cache, so compile times are real and nothing leaks into the user's cache.
    """
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    from triton import knobs
    from triton.runtime.driver import driver as triton_driver

    fake = CompileOnlyDriver(arch_of(arch_name), keep_all_configs, keep_cubins)
    old_hook = knobs.runtime.jit_cache_hook
    old_cache = knobs.cache.dir

    def before_compile(*, fn, **kwargs):  # called before each compile; None lets it proceed
        fake._compile_started(fn.name)
        return None

    with tempfile.TemporaryDirectory(prefix="fastcram-compile-") as cache:
        knobs.cache.dir = cache
        knobs.runtime.jit_cache_hook = before_compile
        previous = getattr(triton_driver, "_active", None)
        triton_driver.set_active(fake)
        COMPILE_ONLY_TARGETS.append(fake)
        try:
            yield fake
        finally:
            COMPILE_ONLY_TARGETS.pop()
            triton_driver.set_active(previous)
            knobs.runtime.jit_cache_hook = old_hook
            knobs.cache.dir = old_cache


# ------------------------------------------------------------------------------------------------ native
def native_resource_usage(library: str) -> dict[int, dict[str, dict]]:
    """{sm: {mangled function: {"REG", "SHARED", "LOCAL", "MAX_THREADS", "name"}}} of every cubin in a
    CMake-built library, from `cuobjdump -res-usage` and the MAX_THREADS attribute of `cuobjdump -elf`."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with Triton's wheel)")
    usage: dict[int, dict[str, dict]] = {}
    sm = None
    res = subprocess.run([tool, "-res-usage", library], capture_output=True, text=True, check=True).stdout
    fn = None
    for line in res.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            sm = int(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line and sm is not None:
            usage.setdefault(sm, {})[fn] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            usage[sm][fn]["name"] = _short_name(fn)
            fn = None
    sass = subprocess.run([tool, "-sass", library], capture_output=True, text=True).stdout
    for (sm_, fn_), counts in sass_counts(sass).items():
        if fn_ in usage.get(sm_, {}):
            usage[sm_][fn_].update(counts)
    elf = subprocess.run([tool, "-elf", library], capture_output=True, text=True).stdout
    fn, want = None, False
    for line in elf.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            sm = int(m.group(1))
        elif line.startswith(".nv.info."):
            fn = line[len(".nv.info."):].strip()
        elif "EIATTR_MAX_THREADS" in line:
            want = True
        elif want and "Value:" in line:
            want = False
            dims = [int(v, 16) for v in re.findall(r"0x[0-9a-f]+", line)]
            if fn in usage.get(sm, {}) and dims:
                usage[sm][fn]["MAX_THREADS"] = dims[0] * (dims[1] if len(dims) > 1 else 1) * \
                    (dims[2] if len(dims) > 2 else 1)
    return usage


# SASS instructions that show a Hopper / Ampere feature in use, and register spills
SASS_MARKS = {"SPILL_STORES": r"\bSTL(\.\w+)*\s", "WGMMA": r"\bHGMMA\b", "TMA": r"\bUTMALDG\b|\bUBLKCP\b",
              "CP_ASYNC": r"\bLDGSTS\b"}


def sass_counts(sass: str) -> dict[tuple[int, str], dict[str, int]]:
    """{(sm, mangled function): {SPILL_STORES, WGMMA, TMA, CP_ASYNC instruction counts}} of `cuobjdump -sass`."""
    out: dict[tuple[int, str], dict[str, int]] = {}
    sm, fn, body = None, None, []

    def flush():
        if sm is not None and fn is not None:
            text = "\n".join(body)
            out[(sm, fn)] = {k: len(re.findall(p, text)) for k, p in SASS_MARKS.items()}

    for line in sass.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        f = re.match(r"\s*Function : (\S+)", line)
        if m or f:
            flush()
            body = []
            if m:
                sm, fn = int(m.group(1)), None
            else:
                fn = f.group(1)
        elif fn is not None:
            body.append(line)
    flush()
    return out


def _short_name(mangled: str) -> str:
    """ln_fwd_kernel<__nv_bfloat16, 1, 32, 8, false> from the mangled name (c++filt when present)."""
    tool = shutil.which("c++filt")
    if tool is None:
        return mangled
    name = subprocess.run([tool, mangled], capture_output=True, text=True).stdout.strip() or mangled
    if name.endswith(")"):  # drop the parameter list: the '(' that matches the last ')'
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    head, sep, tail = name.partition("<")
    return head.rsplit("::", 1)[-1].split(" ")[-1] + sep + tail


def driver_usage(rec: Compiled, device_index: int = 0) -> tuple[int, int]:
    """(n_regs, n_spills) the real CUDA driver reports when it loads the record's cubin (a GPU is needed):
    the figures Triton's own launches read, to hold the cuobjdump reading against."""
    from triton.runtime.driver import driver as triton_driver

    utils = triton_driver.active.utils
    module, _function, n_regs, n_spills, _max_threads = utils.load_binary(rec.symbol, rec.cubin, rec.shared,
                                                                         device_index)
    unload = getattr(utils, "unload_module", None)  # Triton 3.6's driver has none: the module stays loaded
    if unload is not None:
        unload(module)
    return n_regs, n_spills
