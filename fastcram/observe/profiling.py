"""torch.profiler windows over chosen training steps: chrome trace, memory snapshot, time by category."""
from __future__ import annotations

import os
import re
import sys
import time

import torch

from ..files import WriteError, atomic_write_json, writing

# First match wins, so the specific names come before the generic ones ("layer_norm" before "norm").
CATEGORIES = [
    ("loss", r"cross_entropy|nll_loss|log_softmax|logsumexp|mlm_loss"),
    ("norms", r"layer_norm|layernorm"),
    ("attention", r"flash|attention|fmha|sdpa|scaled_dot_product"),
    ("matmuls", r"gemm|matmul|\bmm\b|addmm|bmm|linear|cutlass|xmma|nvjet|sm\d+_|_mm_|dot"),
    ("activation", r"gelu|glu|erf"),
    ("optimizer", r"adam|foreach|multi_tensor|clip_grad|_fused_adam|lerp|addcdiv|\bnorm\b|linalg_vector_norm"),
]
_COMPILED = [(name, re.compile(pat, re.I)) for name, pat in CATEGORIES]


def categorize(kernel_name: str) -> str:
    for name, pat in _COMPILED:
        if pat.search(kernel_name):
            return name
    return "other"


def parse_window(spec: str) -> tuple[int, int]:
    """'A:B' -> (A, B): profile optimizer steps A <= step < B."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps {spec!r}: expected A:B with whole numbers, e.g. 10:15") from None
    if not 0 <= a < b:
        raise ValueError(f"--profile-steps {spec}: need 0 <= A < B")
    return a, b


class ProfileWindow:
    """Call before_step(step) / after_step(step_done, data_wait_s) around each optimizer step."""

    def __init__(self, out_dir: str, start: int, end: int, device: str):
        self.out_dir, self.start, self.end, self.device = out_dir, start, end, device
        self.cuda = device.startswith("cuda")
        self._prof = None
        self.data_wait_s = 0.0
        self.result: dict | None = None

    def before_step(self, step: int) -> None:
        if step != self.start or self._prof is not None:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            torch.cuda.synchronize()
        self._prof = torch.profiler.profile(activities=acts, record_shapes=True, profile_memory=True)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, steps_done: int, data_wait_s: float) -> None:
        if self._prof is None:
            return
        self.data_wait_s += data_wait_s
        if steps_done < self.end:
            return
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        self.result = breakdown(self._prof, wall, self.end - self.start, self.data_wait_s, self.cuda)
        self._write_files()
        if self.cuda:
            torch.cuda.memory._record_memory_history(enabled=None)
        self._prof = None

    def _write_files(self) -> None:
        """trace.json, the memory snapshot (GPU) and breakdown.json; one that cannot be written (a full disk) is
        said on stderr: the run goes on and the breakdown still reaches the run summary."""
        trace, snapshot = os.path.join(self.out_dir, "trace.json"), os.path.join(self.out_dir, "memory_snapshot.pickle")
        try:
            with writing(trace):
                self._prof.export_chrome_trace(trace)
            if self.cuda:
                with writing(snapshot):
                    torch.cuda.memory._dump_snapshot(snapshot)
            atomic_write_json(os.path.join(self.out_dir, "breakdown.json"), self.result)
        except WriteError as e:
            print(f"fastcram: profile: {e}; the breakdown is kept in the run summary", file=sys.stderr, flush=True)


def _self_time_us(evt, cuda: bool) -> float:
    if cuda:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(evt, attr):
                return float(getattr(evt, attr))
        return 0.0
    return float(evt.self_cpu_time_total)


def breakdown(prof, wall_s: float, steps: int, data_wait_s: float, cuda: bool) -> dict:
    """Time per step by category (device kernels on GPU, operator self time on CPU) and the top kernels."""
    rows = []
    for evt in prof.key_averages():
        t = _self_time_us(evt, cuda)
        if t <= 0:
            continue
        if cuda and getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and not evt.key.startswith(("aten::", "fastcram::")):
            continue  # CPU: count operators, not Python frames or profiler bookkeeping
        rows.append((evt.key, t / 1e3 / steps, evt.count // max(steps, 1)))
    by_cat: dict[str, float] = {}
    for name, ms, _ in rows:
        cat = categorize(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    by_cat["data wait"] = 1e3 * data_wait_s / steps
    step_ms = 1e3 * wall_s / steps
    rows.sort(key=lambda r: -r[1])
    return {"step_ms": round(step_ms, 3), "steps": steps, "timing": "device kernels" if cuda else "cpu ops",
            "categories_ms": {k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n, "ms_per_step": round(ms, 3), "calls_per_step": c} for n, ms, c in rows[:15]]}


def format_breakdown(res: dict, tokens_per_step: int, flops_per_tok: float, peak: float | None) -> str:
    step_s = res["step_ms"] / 1e3
    tflops = tokens_per_step * flops_per_tok / step_s / 1e12
    lines = [f"step time {res['step_ms']:.2f} ms over {res['steps']} steps ({res['timing']}); "
             f"{tokens_per_step / step_s / 1e3:.1f}k tokens/s; {tflops:.2f} TFLOP/s achieved; MFU "
             + (f"{100 * tflops / peak:.1f}%" if peak else "n/a (no GPU peak known)"),
             "", f"{'category':<12} {'ms/step':>10} {'% of step':>10}"]
    for cat in ("matmuls", "attention", "norms", "activation", "loss", "optimizer", "data wait", "other"):
        ms = res["categories_ms"].get(cat, 0.0)
        lines.append(f"{cat:<12} {ms:>10.3f} {100 * ms / max(res['step_ms'], 1e-9):>9.1f}%")
    lines += ["", "top kernels:"]
    for k in res["top_kernels"][:10]:
        lines.append(f"  {k['ms_per_step']:>9.3f} ms  x{k['calls_per_step']:<4} {k['name'][:90]}")
    return "\n".join(lines)
