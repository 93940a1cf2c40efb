"""Start-up auto-tuning, charged to the budget: the micro-batch size and the ops backend per op."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from ..config import ModelConfig, RunOptions, TrainConfig
from ..data.loader import mask_batch
from ..observe import runlog
from ..ops import OP_MODULES, OpsError, get_op
from .step import build_model, make_step

GPU_MICRO_BATCHES = (32, 64, 128, 256, 512, 1024)
CPU_MICRO_BATCHES = (8, 16, 32, 64)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def search_micro_batch(measure: Callable[[int], float], candidates, min_gain: float = 0.03,
                       log: Callable[[str], None] = lambda s: None) -> tuple[int, list[dict]]:
    """Try growing micro-batches; stop at out-of-memory or when tokens/s gains less than min_gain.

    measure(size) -> tokens/s (raises an out-of-memory error when the size does not fit).
    Returns the best size and the table of trials.
    """
    trials: list[dict] = []
    best, best_tps = None, 0.0
    for size in candidates:
        try:
            tps = measure(size)
        except Exception as e:
            if not is_oom(e):
                raise
            trials.append({"micro_batch": size, "tokens_per_s": None, "result": "out of memory"})
            log(f"  micro-batch {size}: out of memory")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        trials.append({"micro_batch": size, "tokens_per_s": round(tps, 1), "result": "ok"})
        log(f"  micro-batch {size}: {tps / 1e3:.1f}k tokens/s")
        if best is not None and tps < best_tps * (1 + min_gain):
            if tps > best_tps:
                best, best_tps = size, tps
            break
        best, best_tps = size, tps
    if best is None:
        raise RuntimeError(f"even micro-batch {candidates[0]} does not fit in memory; use a smaller preset")
    return best, trials


def measure_step_throughput(step_fn: Callable, make_batch: Callable[[int], tuple], model: torch.nn.Module,
                            size: int, seq_len: int, device: str, warmup: int = 2, steps: int = 3) -> float:
    """Tokens/s of forward+backward at one micro-batch size; gradients are discarded, weights untouched."""
    def run(n):
        for _ in range(n):
            step_fn(*make_batch(size), 1)
        model.zero_grad(set_to_none=True)

    run(warmup)  # includes compilation for this shape
    _sync(device)
    t0 = time.perf_counter()
    run(steps)
    _sync(device)
    return size * seq_len * steps / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_fwd_bwd(fn: Callable, args: list, device: str, reps: int = 10) -> float:
    """Median seconds of one forward+backward of fn(*args)."""
    def once():
        out = fn(*args)
        out = out[1] if isinstance(out, tuple) else out
        out.float().sum().backward()

    for _ in range(2):
        once()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def op_inputs(op: str, cfg: ModelConfig, micro_batch: int, mask_prob: float, device: str,
              dtype: torch.dtype) -> list:
    """Inputs with the run's real shapes for one op."""
    n, d = micro_batch * cfg.seq_len, cfg.hidden
    k = micro_batch * round(mask_prob * cfg.seq_len)

    def t(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt, requires_grad=True)

    if op == "layer_norm":
        return [t(n, d), t(d, dt=torch.float32), t(d, dt=torch.float32), cfg.norm_eps]
    if op == "add_layer_norm":
        return [t(n, d), t(n, d), t(d, dt=torch.float32), t(d, dt=torch.float32), cfg.norm_eps]
    if op == "ffn":
        w_in = torch.randn(cfg.intermediate, d, device=device, dtype=dtype) * 0.02  # [N, D]
        w_out = torch.randn(d, cfg.ffn_out_in, device=device, dtype=dtype) * 0.02  # [D, F]
        return [t(n, d), w_in.requires_grad_(), w_out.requires_grad_(), cfg.ffn]
    if op == "mlm_loss":
        labels = torch.randint(0, cfg.vocab_size, (k,), device=device)
        return [t(k, d), labels, (torch.randn(cfg.vocab_size, d, device=device, dtype=dtype) * 0.02)
                .requires_grad_()]
    raise ValueError(op)


def choose_kernels(cfg: ModelConfig, micro_batch: int, mask_prob: float, device: str, compiled: bool,
                   log: Callable[[str], None] = lambda s: None) -> tuple[dict, list[dict]]:
    """Per op, the faster of triton and torch on the run's shapes. Returns (choice, timings).

    With compile on, the torch side is the compiled reference (what inductor would run in the model)."""
    from ..ops import triton_unavailable_reason

    why = triton_unavailable_reason(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    needed = ["layer_norm", "add_layer_norm", "ffn", "mlm_loss"]
    choice = {op: "torch" for op in OP_MODULES}
    rows = []
    for op in needed:
        row = {"op": op}
        for backend in ("torch", "triton"):
            if backend == "triton" and why:
                row["triton"] = f"unavailable: {why}"
                continue
            try:
                fn = get_op(op, backend)
                if backend == "torch" and compiled:
                    fn = torch.compile(fn, fullgraph=True, dynamic=False)
            except OpsError as e:
                row[backend] = f"unavailable: {e}"
                continue
            args = op_inputs(op, cfg, micro_batch, mask_prob, device, dtype)
            row[backend] = round(1e3 * _time_fwd_bwd(fn, args, device), 4)  # ms
        if isinstance(row.get("triton"), float) and row["triton"] < row["torch"]:
            choice[op] = "triton"
        row["chosen"] = choice[op]
        rows.append(row)
        def show(v):
            return f"{v} ms" if isinstance(v, float) else str(v)
        log(f"  {op}: torch {show(row['torch'])}, triton {show(row.get('triton'))} -> {choice[op]}")
    return choice, rows


def tune(model_cfg: ModelConfig, tcfg: TrainConfig, opts: RunOptions, device: str, data) -> tuple[dict | None, dict]:
    """`--kernels auto` and `--micro-batch auto`, before the real model is built; returns (per_op, report)."""
    report: dict = {}
    per_op = None
    t0 = time.perf_counter()
    say = (lambda m: runlog.say(opts.progress, m))
    if tcfg.micro_batch_auto:
        say("auto-tuning the micro-batch (time counts against the budget):")
        probe = build_model(model_cfg, dataclasses.replace(tcfg, kernels="torch" if tcfg.kernels == "auto"
                                                           else tcfg.kernels), device)
        step = make_step(probe, tcfg, device)
        gen = torch.Generator(device=device).manual_seed(tcfg.seed)

        def make_batch(size):
            ids = torch.randint(max(data.special.all) + 1, data.vocab_size, (size, data.seq_len), device=device)
            b = mask_batch(ids, opts.data, data.special, data.vocab_size, gen)
            return b.input_ids, b.positions, b.labels

        cands = GPU_MICRO_BATCHES if device.startswith("cuda") else CPU_MICRO_BATCHES
        cands = [c for c in cands if c <= len(data)]
        best, trials = search_micro_batch(
            lambda size: measure_step_throughput(step, make_batch, probe, size, data.seq_len, device), cands,
            log=say)
        tcfg.micro_batch = best
        report["micro_batch"] = {"chosen": best, "trials": trials}
        del probe, step
        say(f"  -> micro-batch {best}")
    if tcfg.kernels == "auto":
        say("timing triton vs torch per op on this run's shapes:")
        per_op, rows = choose_kernels(model_cfg, tcfg.micro_batch, opts.data.mask_prob, device, tcfg.compile,
                                         log=say)
        report["kernels"] = {"chosen": per_op, "timings_ms": rows}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return per_op, report
