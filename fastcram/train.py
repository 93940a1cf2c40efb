"""The training loop: tokenizer -> data -> model(get_ops) -> compiled step -> loop until the budget clock
says stop -> checkpoint -> summary.

The hot loop never synchronises with the host except at log intervals (and checkpoints): losses and
gradient norms stay on the device until a log record is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import checkpoint as ckpt
from .config import DataConfig, ModelConfig, TrainConfig, from_dict, preset, to_dict
from .data import BlockDataset, BlockLoader, DataPosition, atomic_write_json, builtin_data, mask_batch
from .env_info import environment
from .errors import UserError
from .metrics import RunLog, flops_per_token, mfu, peak_tflops
from .model import CrammedBert
from .ops import OpsError, get_ops, triton_unavailable_reason
from .profiling import ProfileWindow, format_breakdown, parse_window
from .schedule import BudgetClock, accumulation_steps, lr_multiplier
from .telemetry import TelemetrySampler


@dataclass
class RunOptions:
    """Everything `fastcram train` was asked to do (the CLI builds this)."""
    train: TrainConfig
    preset: str = "tiny"
    data_dir: str | None = None  # None: the built-in corpus
    out_dir: str | None = None  # None: runs/<time>-<preset>
    resume: str | None = None  # a run folder to continue
    budget_given: bool = True  # False on resume without a budget flag: keep the saved budget
    data: DataConfig = field(default_factory=DataConfig)
    progress: bool = True
    peak_tflops: float | None = None


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return name


def _say(opts: RunOptions, msg: str) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- run folder

def open_run(opts: RunOptions) -> tuple[str, dict | None]:
    """The run folder, and the checkpoint to resume from (None for a fresh run)."""
    if opts.resume:
        run_dir = opts.resume
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            raise UserError(f"--resume {run_dir}: not a fastcram run folder (no config.json); pass the folder "
                            f"a `fastcram train` run wrote")
        path = ckpt.latest(run_dir)
        if path is None:
            raise UserError(f"--resume {run_dir}: the run has no checkpoint yet; start it again instead")
        try:
            return run_dir, ckpt.load(path)
        except Exception as e:  # a checkpoint we cannot read is named, never silently skipped
            raise UserError(f"--resume {run_dir}: cannot read checkpoint {path} ({e})") from None
    run_dir = opts.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{opts.preset}")
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        raise UserError(f"--out {run_dir} already holds a run; use --resume {run_dir} or another --out")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir, None


def restore_options(opts: RunOptions, run_dir: str) -> RunOptions:
    """On resume the saved configuration wins, except a budget or step limit given on the command line."""
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    train = from_dict(TrainConfig, saved["train"])
    if opts.budget_given:
        train.budget_s = opts.train.budget_s
    train.max_steps = opts.train.max_steps
    return dataclasses.replace(opts, train=train, preset=saved["preset"], data_dir=saved["data_dir"],
                               data=from_dict(DataConfig, saved["data"]))


# ---------------------------------------------------------------- model, optimizer, step

def build_model(model_cfg: ModelConfig, tcfg: TrainConfig, device: str, per_op: dict | None = None) -> CrammedBert:
    """The model on its ops bundle: tcfg.kernels for every op, or an explicit per-op choice."""
    if tcfg.kernels == "triton" or "triton" in (per_op or {}).values():
        why = triton_unavailable_reason(device)
        if why:
            raise UserError(f"--kernels triton: {why}; use --kernels torch")
    try:
        ops = get_ops("torch", per_op=per_op) if per_op else get_ops(tcfg.kernels)
    except OpsError as e:
        raise UserError(f"--kernels {tcfg.kernels}: {e}") from None
    return CrammedBert(model_cfg, ops).to(device)


def autotune(model_cfg: ModelConfig, tcfg: TrainConfig, opts: "RunOptions", device: str, data) -> tuple[dict | None, dict]:
    """`--kernels auto` and `--micro-batch auto`, before the real model is built; returns (per_op, report)."""
    from . import autotune as at

    report: dict = {}
    per_op = None
    t0 = time.perf_counter()
    say = (lambda m: _say(opts, m))
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

        cands = at.GPU_MICRO_BATCHES if device.startswith("cuda") else at.CPU_MICRO_BATCHES
        cands = [c for c in cands if c <= len(data)]
        best, trials = at.search_micro_batch(
            lambda size: at.measure_step_throughput(step, make_batch, probe, size, data.seq_len, device), cands,
            log=say)
        tcfg.micro_batch = best
        report["micro_batch"] = {"chosen": best, "trials": trials}
        del probe, step
        say(f"  -> micro-batch {best}")
    if tcfg.kernels == "auto":
        say("timing triton vs torch per op on this run's shapes:")
        per_op, rows = at.choose_kernels(model_cfg, tcfg.micro_batch, opts.data.mask_prob, device, tcfg.compile,
                                         log=say)
        report["kernels"] = {"chosen": per_op, "timings_ms": rows}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return per_op, report


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW as the recipe: no weight decay on biases, norms and the position scale."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=tcfg.eps,
                             fused=device.startswith("cuda"))


def make_step(model: CrammedBert, tcfg: TrainConfig, device: str) -> Callable:
    """forward + backward of one micro-batch, scaled by 1/accum; returns the (unscaled) loss on device."""
    forward = torch.compile(model, fullgraph=True, dynamic=False) if tcfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step(input_ids, positions, labels, accum: int) -> torch.Tensor:
        with autocast:
            loss = forward(input_ids, positions, labels)
        (loss / accum).backward()
        return loss.detach()

    return step


# ---------------------------------------------------------------- the loop

class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the current step, saves and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    micro_steps: int = 0
    sequences: int = 0
    position: DataPosition = field(default_factory=DataPosition)


def restore_state(saved: dict, model, optimizer, mask_gen: torch.Generator) -> LoopState:
    """Load a checkpoint's model, optimizer and RNG states; return the loop counters and data position."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    ckpt.set_rng_state(saved["rng"], mask_gen)
    return LoopState(saved["step"], saved["micro_steps"], saved["sequences"], DataPosition(**saved["position"]))


def train(opts: RunOptions, now: Callable[[], float] = time.monotonic) -> dict:
    """Run (or resume) training until the budget is spent; returns the summary."""
    run_dir, resume_state = open_run(opts)
    if resume_state is not None:
        opts = restore_options(opts, run_dir)
    tcfg = opts.train
    if not tcfg.budget_s > 0:
        raise UserError(f"the budget must be positive (got {tcfg.budget_s} s); pass e.g. --hours 24 or --minutes 5")
    device = resolve_device(tcfg.device)

    # tokenizer + data (preparing the built-in corpus is one-time set-up, outside the budget)
    model_cfg = preset(opts.preset).model
    data_dir = opts.data_dir or builtin_data(model_cfg.vocab_size, opts.data, progress=opts.progress)
    data = BlockDataset(data_dir)
    model_cfg.vocab_size = data.vocab_size
    model_cfg.seq_len = data.seq_len
    opts.data.seq_len = data.seq_len

    spent = resume_state["elapsed_s"] if resume_state else 0.0
    clock = BudgetClock(tcfg.budget_s, spent, now=now)  # starts before the model is built and compiled
    if clock.done():
        raise UserError(f"the budget ({tcfg.budget_s:.0f} s) is already spent ({spent:.0f} s); "
                        f"pass a larger --hours/--minutes to continue")

    per_op, tuning = None, {}
    if resume_state is not None:
        per_op = resume_state["ops"]  # the resumed run keeps its kernel choice and micro-batch
    elif tcfg.kernels == "auto" or tcfg.micro_batch_auto:
        per_op, tuning = autotune(model_cfg, tcfg, opts, device, data)
        tcfg.micro_batch_auto = False  # the chosen size is what config.json records

    torch.manual_seed(tcfg.seed)
    model = build_model(model_cfg, tcfg, device, per_op)
    optimizer = make_optimizer(model, tcfg, device)
    mask_gen = torch.Generator(device=device)
    mask_gen.manual_seed(tcfg.seed + 1)
    state = LoopState() if resume_state is None else restore_state(resume_state, model, optimizer, mask_gen)
    step_fn = make_step(model, tcfg, device)
    loader = BlockLoader(data, tcfg.micro_batch, tcfg.seed, state.position, pin=device.startswith("cuda"))

    config = {"preset": opts.preset, "data_dir": os.path.abspath(data_dir), "model": to_dict(model_cfg),
              "train": to_dict(tcfg), "data": to_dict(opts.data)}
    if resume_state is None:
        atomic_write_json(os.path.join(run_dir, "config.json"), config)
    log = RunLog(os.path.join(run_dir, "log.jsonl"))
    env = environment(device)
    log.write({"event": "start" if resume_state is None else "resume", "config": config, **env,
               "ops": model.ops.choice, "budget_spent_s": round(spent, 3), "autotune": tuning or None})
    fpt = flops_per_token(model_cfg, opts.data.mask_prob)
    peak = peak_tflops(env["device"] if device.startswith("cuda") else None, opts.peak_tflops)
    _say(opts, f"fastcram: {opts.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
               f"on {env['device']}, kernels {tcfg.kernels}, compile {tcfg.compile}, budget "
               f"{tcfg.budget_s / 60:.1f} min, run folder {run_dir}")

    def payload() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
                "micro_steps": state.micro_steps, "sequences": state.sequences,
                "position": dataclasses.asdict(state.position), "elapsed_s": clock.elapsed(),
                "config": config, "rng": ckpt.rng_state(mask_gen), "ops": model.ops.choice}

    def save_periodic() -> str:
        path = ckpt.step_path(run_dir, state.step)
        ckpt.save(path, payload())
        ckpt.prune(run_dir, tcfg.keep_checkpoints)
        return path

    tokens_per_seq = data.seq_len
    loss_sum = torch.zeros((), device=device)  # summed on device; read only at log intervals
    interval = {"steps": 0, "seqs": 0, "wait": 0.0, "t": now(), "start_loss": None}
    last_ckpt = now()
    first_loss = None
    grad_norm = torch.zeros((), device=device)
    stopped_by = None
    profiler = None
    if tcfg.profile_steps:
        a, b = parse_window(tcfg.profile_steps)
        profiler = ProfileWindow(os.path.join(run_dir, "profile"), a, b, device)
    telemetry = TelemetrySampler(os.path.join(run_dir, "telemetry.jsonl"), tcfg.telemetry_interval_s,
                                 quiet=not opts.progress).start()
    profile_result = None
    sync_debug = tcfg.sync_debug and device.startswith("cuda")
    model.train()
    with StopRequest() as stop:
        try:
            while not clock.done() and (tcfg.max_steps is None or state.step < tcfg.max_steps):
                if profiler:
                    profiler.before_step(state.step)
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("error")  # any host sync until the next log is a bug
                step_wait = 0.0
                p = clock.progress()
                accum = accumulation_steps(p, tcfg.micro_batch, tcfg.final_batch, tcfg.batch_ramp_until)
                lr = tcfg.lr * lr_multiplier(p)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for _ in range(accum):
                    ids, wait = loader.next()
                    step_wait += wait
                    ids = ids.to(device, non_blocking=True)
                    b = mask_batch(ids, opts.data, data.special, data.vocab_size, mask_gen)
                    loss_sum += step_fn(b.input_ids, b.positions, b.labels, accum) / accum
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.micro_steps += accum
                state.sequences += accum * tcfg.micro_batch
                state.position = loader.position
                interval["steps"] += 1
                interval["seqs"] += accum * tcfg.micro_batch
                interval["wait"] += step_wait
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("default")
                if profiler:
                    profiler.after_step(state.step, step_wait)
                    if profiler.result:
                        profile_result = {**profiler.result, "tokens_per_step": accum * tcfg.micro_batch *
                                          tokens_per_seq, "flops_per_token": fpt, "peak_tflops": peak}
                        _say(opts, "\n" + format_breakdown(profiler.result, profile_result["tokens_per_step"],
                                                           fpt, peak))
                        profiler = None

                t = now()
                last_step = clock.done() or state.step == tcfg.max_steps
                if t - interval["t"] >= tcfg.log_interval_s or last_step:
                    rec = _log_record(state, interval, loss_sum, grad_norm, lr, accum, tcfg, clock, t,
                                      tokens_per_seq, fpt, peak)
                    first_loss = rec["loss"] if first_loss is None else first_loss
                    log.write(rec)
                    _progress_line(opts, rec)
                    loss_sum.zero_()
                    interval.update(steps=0, seqs=0, wait=0.0, t=t)
                if stop.signal is not None:
                    stopped_by = signal.Signals(stop.signal).name
                    break
                if t - last_ckpt >= tcfg.checkpoint_interval_s:
                    save_periodic()
                    last_ckpt = now()
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
            loader.close()
            telemetry.stop()

    if stopped_by:
        path = save_periodic()
        log.write({"event": "stopped", "signal": stopped_by, "step": state.step, "checkpoint": path,
                   "budget_spent_s": round(clock.elapsed(), 3)})
        log.close()
        _say(opts, f"\nstopped by {stopped_by} at step {state.step}; saved {path}\n"
                   f"resume with: fastcram train --resume {run_dir}")
        return {"stopped_by": stopped_by, "run_dir": run_dir, "step": state.step}

    final_path = os.path.join(run_dir, ckpt.CKPT_DIR, ckpt.FINAL)
    ckpt.save(final_path, payload())
    summary = {"run_dir": run_dir, "steps": state.step, "micro_steps": state.micro_steps,
               "sequences": state.sequences, "tokens": state.sequences * tokens_per_seq,
               "budget_s": tcfg.budget_s, "budget_spent_s": round(clock.elapsed(), 3),
               "first_logged_loss": first_loss, "final_loss": _last_loss(run_dir),
               "final_checkpoint": final_path, "device": env["device"], "ops": model.ops.choice,
               "telemetry": telemetry.summary(state.sequences * tokens_per_seq), "profile": profile_result}
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    log.write({"event": "end", **summary})
    log.close()
    _say(opts, f"\ndone: {state.step} steps, {summary['tokens'] / 1e6:.1f}M tokens, loss {first_loss} -> "
               f"{summary['final_loss']}; checkpoint {final_path}")
    return summary


def _log_record(state, interval, loss_sum, grad_norm, lr, accum, tcfg, clock, t, tokens_per_seq, fpt, peak):
    """One log record; the only place the loop reads device values (a host sync, once per interval)."""
    dt = max(t - interval["t"], 1e-9)
    tok_s = interval["seqs"] * tokens_per_seq / dt
    u = mfu(tok_s, fpt, peak)
    return {"step": state.step, "loss": round(loss_sum.item() / max(interval["steps"], 1), 5),
            "grad_norm": round(float(grad_norm), 4), "lr": lr, "batch_size": accum * tcfg.micro_batch,
            "tokens_per_s": round(tok_s, 1), "mfu": None if u is None else round(u, 4),
            "data_wait_s": round(interval["wait"], 4), "budget_spent_s": round(clock.elapsed(), 3),
            "progress": round(clock.progress(), 5), "sequences": state.sequences,
            "data_position": dataclasses.asdict(state.position)}


def _progress_line(opts: RunOptions, rec: dict) -> None:
    m = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
    _say(opts, f"[{100 * rec['progress']:5.1f}% budget] step {rec['step']:6d}  loss {rec['loss']:.4f}  "
               f"lr {rec['lr']:.2e}  batch {rec['batch_size']}  {rec['tokens_per_s'] / 1e3:.1f}k tok/s  "
               f"MFU {m}  data wait {rec['data_wait_s']:.2f}s")


def _last_loss(run_dir: str) -> float | None:
    loss = None
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                loss = rec["loss"]
    return loss
