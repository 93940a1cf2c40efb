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
    lr_given: bool = False  # on resume: a new peak lr (e.g. after non-finite steps)
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

def open_run(opts: RunOptions) -> tuple[str, bool]:
    """The run folder, and whether it is an existing run to resume."""
    if opts.resume:
        run_dir = opts.resume
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            raise UserError(f"--resume {run_dir}: not a fastcram run folder (no config.json); pass the folder "
                            f"a `fastcram train` run wrote")
        return run_dir, True
    run_dir = opts.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{opts.preset}")
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        raise UserError(f"--out {run_dir} already holds a run; use --resume {run_dir} or another --out")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot create the run folder ({e.strerror})") from None
    return run_dir, False


def restore_options(opts: RunOptions, run_dir: str) -> RunOptions:
    """On resume the saved configuration wins, except a budget or step limit given on the command line."""
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    train = from_dict(TrainConfig, saved["train"])
    if opts.budget_given:
        train.budget_s = opts.train.budget_s
    train.max_steps = opts.train.max_steps or train.max_steps
    if opts.lr_given:
        train.lr = opts.train.lr
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
    # fused: one kernel for all parameters, and it honours `found_inf` (NonFiniteGuard) without a host sync
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=tcfg.eps, fused=True)


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


def open_checkpoint(run_dir: str, say: Callable[[str], None]) -> dict:
    """The newest readable checkpoint of a run; an unreadable one is named and the next older one tried."""
    ckpt.cleanup_temp_files(run_dir)
    paths = ckpt.candidates(run_dir)
    if not paths:
        raise UserError(f"--resume {run_dir}: the run has no checkpoint yet; start it again instead")
    for path in paths:
        try:
            state = ckpt.load(path)
            state["_path"] = path
            return state
        except Exception as e:
            say(f"fastcram: warning: cannot read checkpoint {path} ({e}); trying an older one")
    raise UserError(f"--resume {run_dir}: no readable checkpoint among {len(paths)}")


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients are not finite, without a host sync.

    The fused AdamW kernels honour `optimizer.found_inf` (the mechanism AMP's grad scaler uses): a non-zero
    value leaves parameters, moments and the step count untouched. Counters stay on the device and are read
    at log intervals; `limit` consecutive skips stop the run there with a clear message.
    """

    def __init__(self, optimizer, device: str, limit: int):
        self.optimizer, self.limit = optimizer, limit
        self.skipped = torch.zeros((), device=device)  # in this log interval
        self.in_a_row = torch.zeros((), device=device)
        self.total = 0

    def before_step(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = (~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))).float()  # 0-d, on device
        self.optimizer.found_inf = bad
        self.skipped += bad
        self.in_a_row = (self.in_a_row + bad) * bad  # reset to 0 by a good step

    def read(self) -> tuple[int, int]:
        """(skipped in this interval, consecutive now); a host sync, for log intervals only."""
        skipped, row = int(self.skipped.item()), int(self.in_a_row.item())
        self.total += skipped
        self.skipped.zero_()
        return skipped, row


def train(opts: RunOptions, now: Callable[[], float] = time.monotonic) -> dict:
    """Run (or resume) training until the budget is spent; returns the summary."""
    say = (lambda m: _say(opts, m))
    run_dir, resumed = open_run(opts)
    resume_state = open_checkpoint(run_dir, say) if resumed else None
    if resume_state is not None:
        opts = restore_options(opts, run_dir)
    tcfg = opts.train
    if not tcfg.budget_s > 0:
        raise UserError(f"the budget must be positive (got {tcfg.budget_s} s); pass e.g. --hours 24 or --minutes 5")
    if tcfg.deterministic and not tcfg.max_steps:
        raise UserError("--deterministic needs --max-steps: its schedules follow the step count, not the clock")
    device = resolve_device(tcfg.device)
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS workspaces
        torch.use_deterministic_algorithms(True)

    # tokenizer + data (preparing the built-in corpus is one-time set-up, outside the budget)
    model_cfg = preset(opts.preset).model
    data_dir = opts.data_dir or builtin_data(model_cfg.vocab_size, opts.data, progress=opts.progress)
    data = BlockDataset(data_dir)
    data.verify(sample=None if tcfg.verify_data else 2)
    model_cfg.vocab_size, model_cfg.seq_len = data.vocab_size, data.seq_len
    opts.data.seq_len = data.seq_len

    spent = resume_state["elapsed_s"] if resume_state else 0.0
    clock = BudgetClock(tcfg.budget_s, spent, now=now)  # starts before the model is built and compiled
    if clock.done():
        raise UserError(f"the budget ({tcfg.budget_s:.0f} s) is already spent ({spent:.0f} s); "
                        f"pass a larger --hours/--minutes to continue")

    # model, with its ops backend (maybe auto-tuned), optimizer and compiled step
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

    # run folder: config, log header, telemetry, profiler
    config = {"preset": opts.preset, "data_dir": os.path.abspath(data_dir), "model": to_dict(model_cfg),
              "train": to_dict(tcfg), "data": to_dict(opts.data)}
    if resume_state is None:
        atomic_write_json(os.path.join(run_dir, "config.json"), config)
    log = RunLog(os.path.join(run_dir, "log.jsonl"))
    env = environment(device)
    log.write({"event": "start" if resume_state is None else "resume", "config": config, **env,
               "ops": model.ops.choice, "budget_spent_s": round(spent, 3), "autotune": tuning or None,
               "checkpoint": resume_state.get("_path") if resume_state else None})
    fpt = flops_per_token(model_cfg, opts.data.mask_prob)
    peak = peak_tflops(env["device"] if device.startswith("cuda") else None, opts.peak_tflops)
    say(f"fastcram: {opts.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on "
        f"{env['device']}, kernels {tcfg.kernels}, compile {tcfg.compile}, micro-batch {tcfg.micro_batch}, budget "
        f"{tcfg.budget_s / 60:.1f} min, run folder {run_dir}")
    profiler = None
    if tcfg.profile_steps:
        a, b = parse_window(tcfg.profile_steps)
        profiler = ProfileWindow(os.path.join(run_dir, "profile"), a, b, device)
    telemetry = TelemetrySampler(os.path.join(run_dir, "telemetry.jsonl"), tcfg.telemetry_interval_s,
                                 quiet=not opts.progress).start()
    writer = ckpt.AsyncCheckpointer(run_dir, tcfg.keep_checkpoints)
    guard = NonFiniteGuard(optimizer, device, tcfg.max_bad_steps)

    def payload() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
                "micro_steps": state.micro_steps, "sequences": state.sequences,
                "position": dataclasses.asdict(state.position), "elapsed_s": clock.elapsed(),
                "config": config, "rng": ckpt.rng_state(mask_gen), "ops": model.ops.choice}

    def progress() -> float:  # deterministic runs follow the step count, others the budget clock
        return state.step / tcfg.max_steps if tcfg.deterministic else clock.progress()

    def report_checkpoints() -> dict:
        """Log finished checkpoint writes; returns {path: error} of the failed ones."""
        failed = {}
        for rec in writer.results():
            log.write(rec)
            if "error" in rec:
                failed[rec["path"]] = rec["error"]
                say(f"fastcram: checkpoint {rec['path']} failed: {rec['error']}; the previous checkpoint is intact")
        return failed

    # the hot loop: no host sync except at log intervals
    tokens_per_seq = data.seq_len
    loss_sum = torch.zeros((), device=device)
    interval = {"steps": 0, "seqs": 0, "wait": 0.0, "t": now()}
    last_ckpt = now()
    first_loss, profile_result, stopped_by = None, None, None
    sync_debug = tcfg.sync_debug and device.startswith("cuda")
    model.train()
    with StopRequest() as stop:
        try:
            while not clock.done() and (tcfg.max_steps is None or state.step < tcfg.max_steps):
                if profiler:
                    profiler.before_step(state.step)
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("error")  # any host sync until the next log is a bug
                p = progress()
                accum = accumulation_steps(p, tcfg.micro_batch, tcfg.final_batch, tcfg.batch_ramp_until)
                lr = tcfg.lr * lr_multiplier(p)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = torch.zeros((), device=device)
                step_wait = 0.0
                for _ in range(accum):
                    ids, wait = loader.next()
                    step_wait += wait
                    ids = ids.to(device, non_blocking=True)
                    b = mask_batch(ids, opts.data, data.special, data.vocab_size, mask_gen)
                    step_loss += step_fn(b.input_ids, b.positions, b.labels, accum) / accum
                if state.step in tcfg.fault_nan_steps:  # fault injection for the reliability tests
                    step_loss = step_loss * float("nan")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip, foreach=True)
                guard.before_step(step_loss, grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0)
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
                        say("\n" + format_breakdown(profiler.result, profile_result["tokens_per_step"], fpt, peak))
                        profiler = None

                t = now()
                last_step = clock.done() or state.step == tcfg.max_steps
                if t - interval["t"] >= tcfg.log_interval_s or last_step or tcfg.deterministic:
                    skipped, in_a_row = guard.read()
                    rec = _log_record(state, interval, loss_sum, grad_norm, lr, accum, tcfg, clock, t,
                                      tokens_per_seq, fpt, peak, skipped)
                    first_loss = rec["loss"] if first_loss is None else first_loss
                    log.write(rec)
                    _progress_line(opts, rec)
                    loss_sum.zero_()
                    interval.update(steps=0, seqs=0, wait=0.0, t=t)
                    if in_a_row >= tcfg.max_bad_steps:
                        stopped_by = "non-finite"
                        say(f"fastcram: stopping: {in_a_row} optimizer steps in a row had a non-finite loss or "
                            f"gradient (the last finite state is in the newest checkpoint); resume with a lower "
                            f"learning rate, e.g. fastcram train --resume {run_dir} --lr {tcfg.lr / 2:g}")
                    if report_checkpoints() and tcfg.stop_on_checkpoint_error:
                        stopped_by = "checkpoint-error"
                if stop.signal is not None:
                    stopped_by = signal.Signals(stop.signal).name
                if stopped_by:
                    break
                if t - last_ckpt >= tcfg.checkpoint_interval_s:
                    writer.submit(ckpt.step_path(run_dir, state.step), payload(), state.step)
                    last_ckpt = now()
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
            loader.close()
            telemetry.stop()
            writer.wait()

    if stopped_by in ("SIGTERM", "SIGINT"):
        path = ckpt.step_path(run_dir, state.step)
        writer.submit(path, payload(), state.step)
        writer.wait()
        failed = report_checkpoints().get(path)
        log.write({"event": "stopped", "signal": stopped_by, "step": state.step, "checkpoint": path,
                   "budget_spent_s": round(clock.elapsed(), 3)})
        log.close()
        say(f"\nstopped by {stopped_by} at step {state.step}; " +
            (f"saving failed ({failed})" if failed else f"saved {path}") +
            f"\nresume with: fastcram train --resume {run_dir}")
        return {"stopped_by": stopped_by, "run_dir": run_dir, "step": state.step, "exit_code": 1 if failed else 0}
    if stopped_by:
        report_checkpoints()
        log.write({"event": "stopped", "reason": stopped_by, "step": state.step})
        log.close()
        return {"stopped_by": stopped_by, "run_dir": run_dir, "step": state.step, "exit_code": 1}

    final_path = os.path.join(run_dir, ckpt.CKPT_DIR, ckpt.FINAL)
    writer.submit(final_path, payload(), state.step)
    writer.wait()
    if final_path in report_checkpoints():
        raise UserError(f"could not write the final checkpoint {final_path}; free disk space and run "
                        f"fastcram train --resume {run_dir} (the newest periodic checkpoint is intact)")
    summary = {"run_dir": run_dir, "steps": state.step, "micro_steps": state.micro_steps,
               "sequences": state.sequences, "tokens": state.sequences * tokens_per_seq,
               "budget_s": tcfg.budget_s, "budget_spent_s": round(clock.elapsed(), 3),
               "first_logged_loss": first_loss, "final_loss": _last_loss(run_dir), "skipped_steps": guard.total,
               "final_checkpoint": final_path, "device": env["device"], "ops": model.ops.choice,
               "telemetry": telemetry.summary(state.sequences * tokens_per_seq), "profile": profile_result,
               "exit_code": 0}
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    log.write({"event": "end", **summary})
    log.close()
    say(f"\ndone: {state.step} steps, {summary['tokens'] / 1e6:.1f}M tokens, loss {first_loss} -> "
        f"{summary['final_loss']}; checkpoint {final_path}")
    return summary


def _log_record(state, interval, loss_sum, grad_norm, lr, accum, tcfg, clock, t, tokens_per_seq, fpt, peak,
                skipped):
    """One log record; the only place the loop reads device values (a host sync, once per interval)."""
    dt = max(t - interval["t"], 1e-9)
    tok_s = interval["seqs"] * tokens_per_seq / dt
    u = mfu(tok_s, fpt, peak)
    good = interval["steps"] - skipped
    return {"step": state.step, "loss": round(loss_sum.item() / good, 6) if good else None,
            "grad_norm": round(float(grad_norm), 4), "lr": lr, "batch_size": accum * tcfg.micro_batch,
            "tokens_per_s": round(tok_s, 1), "mfu": None if u is None else round(u, 4),
            "skipped_steps": skipped, "data_wait_s": round(interval["wait"], 4),
            "budget_spent_s": round(clock.elapsed(), 3), "progress": round(clock.progress(), 5),
            "sequences": state.sequences, "data_position": dataclasses.asdict(state.position)}


def _progress_line(opts: RunOptions, rec: dict) -> None:
    m = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
    loss = "nan" if rec["loss"] is None else f"{rec['loss']:.4f}"
    _say(opts, f"[{100 * rec['progress']:5.1f}% budget] step {rec['step']:6d}  loss {loss}  "
               f"lr {rec['lr']:.2e}  batch {rec['batch_size']}  {rec['tokens_per_s'] / 1e3:.1f}k tok/s  "
               f"MFU {m}  data wait {rec['data_wait_s']:.2f}s" + (f"  skipped {rec['skipped_steps']}"
                                                                  if rec["skipped_steps"] else ""))


def _last_loss(run_dir: str) -> float | None:
    loss = None
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("loss") is not None:
                loss = rec["loss"]
    return loss
