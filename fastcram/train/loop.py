"""The training loop: tokenizer -> data -> model(get_ops) -> compiled step -> loop until the budget clock
says stop -> checkpoint -> summary.

The hot loop never synchronises with the host except at log intervals (and checkpoints): losses and
gradient norms stay on the device until a log record is written. What is not the loop lives beside it:
the run folder (run_folder.py), the model, optimizer and step (step.py), start-up tuning (autotune.py),
checkpoints (checkpoint.py); log records and the progress line in observe/runlog.py.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Callable

import torch

from ..config import RunOptions, preset, to_dict
from ..data.builtin import builtin_data, writable_cache_dir
from ..data.loader import BlockDataset, BlockLoader, ShardError, mask_batch
from ..errors import UserError
from ..files import WriteError, atomic_write_json
from ..observe.env_info import environment
from ..observe.metrics import flops_per_token, peak_tflops
from ..observe.profiling import ProfileWindow, format_breakdown, parse_window
from ..observe.runlog import NullLog, RunLog, log_record, progress_line, say
from ..observe.telemetry import TelemetrySampler
from . import checkpoint as ckpt
from . import autotune
from .advice import data_passes_advice
from .evaluate import HeldOutEval, eval_schedule
from .compile_cache import compile_caches, describe as describe_caches
from .distributed import DistContext, agree, broadcast_object, init_from_env, mean_across, rank_slice, shutdown
from .run_folder import open_checkpoint, open_run, restore_options, saved_config
from .schedule import BudgetClock, accumulation_steps, lr_multiplier
from .switches import AUTO
from .step import (NonFiniteGuard, autocast_dtype, build_model, check_attention, make_optimizer, make_step,
                   resolve_device)


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


def train(opts: RunOptions, now: Callable[[], float] = time.monotonic) -> dict:
    """Run (or resume) training until the budget is spent; returns the summary (on every rank)."""
    tcfg = opts.train
    ctx = init_from_env("cuda" if resolve_device(tcfg.device).startswith("cuda") else "cpu")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        with compile_caches() as caches:  # inductor's and Triton's compile caches in the cache folder
            return Training(opts, ctx, now, caches).run()
    finally:
        if torch.are_deterministic_algorithms_enabled() != deterministic_before:  # (the call imports inductor:
            torch.use_deterministic_algorithms(deterministic_before)  # not after a Ctrl-C cut an import short)
        shutdown(ctx)


class Training:
    """One run, set up top-down (run folder -> data -> budget clock -> model and compiled step -> logs and
    checkpoints), then the loop, then the ending: a signal's checkpoint, a stop, or the final checkpoint."""

    def __init__(self, opts: RunOptions, ctx: DistContext, now: Callable[[], float], caches: dict | None = None):
        self.ctx, self.now, self.main, self.opts, self.caches = ctx, now, ctx.is_main, opts, caches or {}
        self.run_dir, resumed = open_run(opts, check_existing=self.main)
        self.resumed = open_checkpoint(self.run_dir, self.warn, opts.trust_checkpoint) if resumed else None
        if resumed:  # config.json, or the checkpoint's copy of it when config.json is damaged
            self.opts = restore_options(opts, saved_config(self.run_dir, self.resumed, self.warn))
            if self.resumed is None:
                self.warn(f"fastcram: {self.run_dir} has no checkpoint yet (it stopped before its first one): "
                          f"starting it again from step 0 with its saved configuration")
        self.tcfg = self.opts.train
        self._check_options()
        self._check_cache_folder()
        self.device = self._device()
        self._open_data()
        self.spent = spent = self.resumed["elapsed_s"] if self.resumed else 0.0
        self.clock = BudgetClock(self.tcfg.budget_s, spent, now=now)  # runs while the model is built and compiled
        if self.clock.done():
            raise UserError(f"the budget ({self.tcfg.budget_s:.0f} s) is already spent ({spent:.0f} s); "
                            f"pass a larger --hours/--minutes to continue")
        self._build_model()
        self._open_outputs()

    def say(self, msg: str) -> None:
        if self.main:
            say(self.opts.progress, msg)

    def warn(self, msg: str) -> None:  # shown with --quiet too
        if self.main:
            say(True, msg)

    # ------------------------------------------------------------ set-up

    def _check_options(self) -> None:
        tcfg = self.tcfg
        if not tcfg.budget_s > 0:
            raise UserError(f"the budget must be positive (got {tcfg.budget_s} s); pass e.g. --hours 24 or "
                            f"--minutes 5")
        if tcfg.deterministic and not tcfg.max_steps:
            raise UserError("--deterministic needs --max-steps: its schedules follow the step count, not the clock")
        if tcfg.target_loss is not None and eval_schedule(tcfg) is None:
            raise UserError("--target-loss needs the held-out evaluation that --eval-every 0 turns off")

    def _check_cache_folder(self) -> None:
        """The compile caches and the tuning cache live in the cache folder: when this run writes there, the
        folder is checked before any work (one line naming FASTCRAM_CACHE when it cannot be written). Importing
        torch's compiler (the fused AdamW does) creates inductor's cache folder, so any run whose compile caches
        fastcram placed writes there, compiled or not."""
        tcfg = self.tcfg
        tuning = self.resumed is None and (tcfg.micro_batch_auto or any(
            getattr(tcfg, k) == AUTO for k in autotune.TUNED))
        placed = any(v["set_by"].startswith("fastcram") for v in self.caches.values())
        if self.main and (tuning or placed):
            writable_cache_dir()

    def _device(self) -> str:
        device = resolve_device(self.tcfg.device)
        if device == "cuda" and self.ctx.enabled:
            device = f"cuda:{self.ctx.local_rank}"
        if self.tcfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS workspaces
            torch.use_deterministic_algorithms(True)
        return device

    def _open_data(self) -> None:
        """Tokenizer + data; preparing the built-in corpus is one-time set-up, outside the budget."""
        opts, ctx = self.opts, self.ctx
        saved = self.resumed["config"].get("model", {}) if self.resumed else {}
        overrides = {**opts.model_overrides, **{k: saved[k] for k in ("sparse_last_layer",) if k in saved}}
        self.model_cfg = dataclasses.replace(preset(opts.preset).model, **overrides)
        if opts.data_dir is None and not self.main:
            torch.distributed.barrier()  # rank 0 prepares the built-in corpus first
        self.data_dir = opts.data_dir or builtin_data(self.model_cfg.vocab_size, opts.data,
                                                      progress=opts.progress and self.main)
        if opts.data_dir is None and self.main and ctx.enabled:
            torch.distributed.barrier()
        self.data = BlockDataset(self.data_dir)
        if self.tcfg.verify_data:  # otherwise the loader verifies each shard on its thread before first use
            self.data.verify()
        self.model_cfg.vocab_size, self.model_cfg.seq_len = self.data.vocab_size, self.data.seq_len
        opts.data.seq_len = self.data.seq_len
        if self.tcfg.target_loss is not None and self.data.holdout is None:
            raise UserError(f"--target-loss: {self.data.no_holdout_reason}")

    def _build_model(self) -> None:
        """The step-level switches (flags, the tuning cache, or measured), the model on its ops bundle, the
        optimizer, the compiled step and the loader."""
        tcfg, ctx, device = self.tcfg, self.ctx, self.device
        t0 = self.now()
        if self.resumed is not None:
            per_op = self.resumed["ops"]  # the resumed run keeps its kernel choice and micro-batch
            self.tuning = autotune.resumed()
        else:
            if tcfg.micro_batch_auto and ctx.enabled:
                raise UserError("--micro-batch auto runs on one process; tune with one GPU, then pass the chosen "
                                "--micro-batch to the multi-GPU run")
            per_op = None
            self.tuning = autotune.tune(self.model_cfg, tcfg, self.opts, device, self.data,
                                        share=lambda obj: broadcast_object(ctx, obj), world_size=ctx.world,
                                        write_cache=self.main)
        t1 = self.now()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)  # the peak of the run's own step, not of the tuning
        torch.manual_seed(tcfg.seed)
        self.model = build_model(self.model_cfg, tcfg, device, per_op)
        check_attention(tcfg.attention, self.model_cfg, device, autocast_dtype(tcfg, device),
                        self.opts.data.masked_per_seq)
        self.optimizer = make_optimizer(self.model, tcfg, device)
        self.mask_gen = torch.Generator(device=device)
        self.mask_gen.manual_seed(tcfg.seed + 1)
        self.state = (ckpt.LoopState() if self.resumed is None else
                      ckpt.restore_state(self.resumed, self.model, self.optimizer, self.mask_gen))
        stepped = self.model
        if ctx.enabled:
            stepped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.local_rank] if device.startswith("cuda") else None)
        self.step_fn = make_step(stepped, tcfg, device)
        self.global_micro = tcfg.micro_batch * ctx.world  # every rank loads the global micro-batch, keeps its rows
        self.loader = BlockLoader(self.data, self.global_micro, tcfg.seed, self.state.position,
                                  pin=device.startswith("cuda"))
        self.startup = {"tuning_s": round(t1 - t0, 3), "build_s": round(self.now() - t1, 3)}

    def _open_outputs(self) -> None:
        """Run folder: config, log header, telemetry, profiler (rank 0 writes; every rank samples its GPU)."""
        opts, tcfg, ctx, device, resumed = self.opts, self.tcfg, self.ctx, self.device, self.resumed
        self.config = {"preset": opts.preset, "data_dir": os.path.abspath(self.data_dir),
                       "model": to_dict(self.model_cfg), "train": to_dict(tcfg), "data": to_dict(opts.data),
                       "world_size": ctx.world}
        if resumed is None and self.main:
            atomic_write_json(os.path.join(self.run_dir, "config.json"), self.config)
        self.log = RunLog(os.path.join(self.run_dir, "log.jsonl"), warn=self.warn) if self.main else NullLog()
        self.env = environment(device)
        if resumed is not None and resumed["config"].get("world_size", 1) != ctx.world:
            self.say(f"fastcram: resuming a run saved with {resumed['config'].get('world_size', 1)} process(es) "
                     f"on {ctx.world}: the data continues from the same block, in global micro-batches of "
                     f"{self.global_micro}")
        self.switches = switches = autotune.switch_record(self.model_cfg, tcfg, self.tuning.how,
                                                          self.model.ops.choice)
        self.log.write({"event": "start" if resumed is None else "resume", "config": self.config, **self.env,
                        "ops": self.model.ops.choice, "switches": switches, "step": self.step_fn.settings,
                        "budget_spent_s": round(self.spent, 3), "autotune": self.tuning.report or None,
                        "compile_caches": self.caches, "world_size": ctx.world,
                        "checkpoint": resumed.get("_path") if resumed else None})
        self.fpt = flops_per_token(self.model_cfg, opts.data.mask_prob)
        peak = peak_tflops(self.env["device"] if device.startswith("cuda") else None, opts.peak_tflops)
        self.peak = peak * ctx.world if peak else None  # MFU of the whole world
        self.say(f"fastcram: {opts.preset} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M params) "
                 f"on {self.env['device']}" + (f" x {ctx.world} processes" if ctx.enabled else "") +
                 f", micro-batch {tcfg.micro_batch}, budget {tcfg.budget_s / 60:.1f} min, run folder {self.run_dir}"
                 f"\n  switches: " + ", ".join(f"{k} {self._show(v['value'])} ({v['how']})" for k, v in switches.items())
                 + (f"\n  compile caches: {describe_caches(self.caches)}" if self.caches else ""))
        self.profiler = None
        if tcfg.profile_steps and self.main:
            a, b = parse_window(tcfg.profile_steps)
            self.profiler = ProfileWindow(os.path.join(self.run_dir, "profile"), a, b, device)
        tel_name = "telemetry.jsonl" if not ctx.enabled else f"telemetry-rank{ctx.rank}.jsonl"
        self.telemetry = TelemetrySampler(os.path.join(self.run_dir, tel_name), tcfg.telemetry_interval_s,
                                          device_index=ctx.local_rank if device.startswith("cuda") else 0,
                                          quiet=not (opts.progress and self.main)).start()
        self.writer = ckpt.AsyncCheckpointer(self.run_dir, tcfg.keep_checkpoints)
        self.last_saved = None if resumed is None else {  # the newest checkpoint on disk: what a crash falls back to
            "path": resumed["_path"], "step": resumed["step"], "budget_spent_s": resumed["elapsed_s"]}
        self.data_error: ShardError | None = None
        self.guard = NonFiniteGuard(self.optimizer, device, tcfg.max_bad_steps, check_loss=not ctx.enabled)

    @staticmethod
    def _show(value) -> str:
        if isinstance(value, dict):  # kernels: op -> backend; "triton" when they all agree
            return next(iter(set(value.values()))) if len(set(value.values())) == 1 else \
                "+".join(f"{op}:{b}" for op, b in value.items())
        return str(value)

    # ------------------------------------------------------------ the loop

    def run(self) -> dict:
        self._start_loop()
        with StopRequest() as stop:
            try:
                stopped_by = self._loop(stop)
            finally:
                if self.sync_debug:
                    torch.cuda.set_sync_debug_mode("default")
                self.loader.close()
                self.telemetry.stop()
                self.writer.wait()
        if stopped_by in ("SIGTERM", "SIGINT"):
            return self._stop_on_signal(stopped_by)
        if stopped_by == "bad-data":
            self._stop_on_bad_data()
        if stopped_by:
            return self._stop(stopped_by)
        return self._finish()

    def _start_loop(self) -> None:
        device = self.device
        self.loss_sum = torch.zeros((), device=device)  # summed over the log interval, read when it ends
        self.grad_norm = torch.zeros((), device=device)
        self.interval = {"steps": 0, "seqs": 0, "wait": 0.0, "t": self.now()}
        self.last_ckpt = self.now()
        self.first_loss = self.last_loss = self.profile_result = None
        self.lr, self.accum = self.tcfg.lr, 1
        self.sync_debug = self.tcfg.sync_debug and device.startswith("cuda")
        self.model.train()
        self._open_eval()

    def _open_eval(self) -> None:
        """The held-out evaluation (rank 0 runs it) and its cadence; reading the split is off the budget."""
        self.evaluator, self.schedule = None, eval_schedule(self.tcfg)
        self.evals = {"count": 0, "seconds": 0.0, "last": None, "step": -1}
        self.target_hit = self.pending_eval = None
        self.records = 0  # log records written by this process (the data-passes advice reads the second)
        if self.schedule is None or not self.main:
            return
        if self.data.holdout is None:
            self.say(f"fastcram: {self.data.no_holdout_reason}; training without a held-out loss")
            self.log.write({"event": "no_holdout", "reason": self.data.no_holdout_reason})
            return
        with self.clock.excluded() as ex:
            self.evaluator = HeldOutEval(self.data.holdout, self.opts.data, self.data.special, self.data.vocab_size,
                                         self.tcfg.micro_batch, self.device, self.tcfg.eval_blocks, self.tcfg.eval_seed)
        self.evals["seconds"] += ex.seconds
        self.next_eval = self.schedule.after(self.clock.elapsed())
        self.log.write({"event": "eval_setup", **self.evaluator.describe(), "seed": self.tcfg.eval_seed,
                        "every_s": self.schedule.every_s, "growth": self.schedule.growth,
                        "target_loss": self.tcfg.target_loss, "setup_s": round(ex.seconds, 3)})

    def _evaluate(self, budget_done: bool) -> None:
        """The held-out loss when due (rank 0), off the budget clock: the device first finishes the training
        work it has queued (budget time; this is a log interval's sync), then the clock stands still."""
        if (self.evaluator is None or self.target_hit is not None or self.state.step in (0, self.evals["step"])
                or not (budget_done or self.clock.elapsed() >= self.next_eval)):
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        at = self.clock.elapsed()
        with self.clock.excluded() as ex:
            loss = self.evaluator(self.model, self.step_fn.context)
        self.interval["t"] += ex.seconds  # the interval's tokens/s counts training time only
        self.last_ckpt += ex.seconds
        self.next_eval = self.schedule.after(at)
        self.evals.update(count=self.evals["count"] + 1, seconds=self.evals["seconds"] + ex.seconds, last=loss,
                          step=self.state.step)
        self.pending_eval = {"eval_loss": loss, "eval_s": round(ex.seconds, 4), "eval_at_s": round(at, 3)}
        target = self.tcfg.target_loss
        if target is not None and loss <= target:
            self.target_hit = {"target_loss": target, "eval_loss": loss, "budget_s": at, "step": self.state.step,
                               "sequences": self.state.sequences,
                               "tokens": self.state.sequences * self.data.seq_len}

    def _loop(self, stop: StopRequest) -> str | None:
        """Steps until the budget is spent or something stops the run (its reason returned). No host sync
        except at log intervals: at the top of each step the ranks agree (host tensors only) on rank 0's
        progress and whether to log, stop or save."""
        tcfg, stopped_by = self.tcfg, None
        while True:
            budget_done = self.clock.done() or (tcfg.max_steps is not None and self.state.step >= tcfg.max_steps)
            if self.main:
                self._evaluate(budget_done)  # a held-out evaluation makes this a log interval
            budget_done = budget_done or self.target_hit is not None
            t = self.now()
            log_due = self.interval["steps"] > 0 and (t - self.interval["t"] >= tcfg.log_interval_s or budget_done
                                                      or tcfg.deterministic or stop.signal is not None
                                                      or self.pending_eval is not None)
            save_due = t - self.last_ckpt >= tcfg.checkpoint_interval_s
            p, flags = agree(self.ctx, self._progress(), [budget_done, log_due, save_due, stop.signal is not None])
            budget_done, log_due, save_due, signalled = flags
            if log_due:
                stopped_by = self._write_log() or stopped_by
            if signalled:
                stopped_by = signal.Signals(stop.signal).name if stop.signal else "SIGTERM"
            if stopped_by or budget_done:
                return stopped_by
            if save_due:
                self._save(ckpt.step_path(self.run_dir, self.state.step))
                self.last_ckpt = self.now()
            try:
                self._step(p)
            except ShardError as e:  # raised by the loader before the batch is used: the state is the step's start
                self.data_error = e
                return "bad-data"
            if "first_step_s" not in self.startup:
                self._log_startup(t)

    def _log_startup(self, t_first_step: float) -> None:
        """Start-up as its own figure, once the first step (where torch.compile builds the graphs) is done:
        tuning, building the model, the first step (host time, no sync), and all of it as budget time."""
        self.startup.update(first_step_s=round(self.now() - t_first_step, 3),
                            startup_s=round(self.clock.elapsed() - self.spent, 3))
        self.log.write({"event": "startup", **self.startup})
        self.say(f"start-up {self.startup['startup_s']:.1f} s: tuning {self.startup['tuning_s']:.1f} s, model "
                 f"{self.startup['build_s']:.1f} s, first step (compile) {self.startup['first_step_s']:.1f} s")

    def _peak_mem_mib(self) -> float | None:
        """The allocator's peak since the run's model was built (a host-side counter: no sync)."""
        if not self.device.startswith("cuda"):
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def _progress(self) -> float:  # deterministic runs follow the step count, others the budget clock
        return self.state.step / self.tcfg.max_steps if self.tcfg.deterministic else self.clock.progress()

    def _step(self, p: float) -> None:
        """One optimizer step at progress p: the batch ramp's accumulation, the lr schedule, skip if not finite."""
        tcfg, opts, data, state = self.tcfg, self.opts, self.data, self.state
        if self.profiler:
            self.profiler.before_step(state.step)
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode("error")  # any host sync until the next log is a bug
        self.accum = accum = accumulation_steps(p, self.global_micro, tcfg.final_batch, tcfg.batch_ramp_until)
        self.lr = tcfg.lr * lr_multiplier(p)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        step_loss = torch.zeros((), device=self.device)
        step_wait = 0.0
        for i in range(accum):
            ids, wait = self.loader.next()
            step_wait += wait
            ids = ids.to(self.device, non_blocking=True)
            b = mask_batch(ids, opts.data, data.special, data.vocab_size, self.mask_gen)
            b = rank_slice(b, self.ctx, tcfg.micro_batch, data.seq_len, opts.data.masked_per_seq)
            step_loss += self.step_fn(b.input_ids, b.positions, b.labels, accum, sync=i == accum - 1) / accum
        if state.step in tcfg.fault_nan_steps:  # fault injection for the reliability tests
            step_loss = step_loss * float("nan")
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip, foreach=True)
        self.guard.before_step(step_loss, self.grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_sum += torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0)
        state.step += 1
        state.micro_steps += accum
        state.sequences += accum * self.global_micro
        state.position = self.loader.position
        self.interval["steps"] += 1
        self.interval["seqs"] += accum * self.global_micro
        self.interval["wait"] += step_wait
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode("default")
        if self.profiler:
            self._profile_step(step_wait)

    def _profile_step(self, step_wait: float) -> None:
        self.profiler.after_step(self.state.step, step_wait)
        if self.profiler.result:
            tokens_per_step = self.accum * self.global_micro * self.data.seq_len
            self.profile_result = {**self.profiler.result, "tokens_per_step": tokens_per_step,
                                   "flops_per_token": self.fpt, "peak_tflops": self.peak}
            self.say("\n" + format_breakdown(self.profiler.result, tokens_per_step, self.fpt, self.peak))
            self.profiler = None

    # ------------------------------------------------------------ logs and checkpoints

    def _write_log(self) -> str | None:
        """One record for the interval just finished (a host sync); the reason to stop the run, if any."""
        t = self.now()
        skipped, in_a_row = self.guard.read()
        loss = mean_across(self.ctx, self.loss_sum)
        rec = log_record(self.state, self.interval, loss, self.grad_norm, self.lr, self.accum, self.global_micro,
                          self.clock, t, self.data.seq_len, self.fpt, self.peak, skipped)
        rec["peak_mem_mib"] = self._peak_mem_mib()
        if self.pending_eval is not None:
            rec.update(self.pending_eval)
            self.pending_eval = None
        self._advise_data_passes(rec)
        self.first_loss = rec["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = rec["loss"] if rec["loss"] is not None else self.last_loss
        self.log.write(rec)
        if self.main:
            progress_line(self.opts.progress, rec)
        self.loss_sum.zero_()
        self.interval.update(steps=0, seqs=0, wait=0.0, t=t)
        stop = None
        if in_a_row >= self.guard.limit:
            self.say(f"fastcram: stopping: {in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                     f"(the last finite state is in the newest checkpoint); resume with a lower learning rate, "
                     f"e.g. fastcram train --resume {self.run_dir} --lr {self._lower_lr():g}")
            stop = "non-finite"
        failed = self._report_checkpoints()
        return (self._stop_after_failed_checkpoints(failed) if failed else None) or stop

    def _advise_data_passes(self, rec: dict) -> None:
        """Once, at the second log record (the first interval without the compiling first step): will the
        budget pass over the training data more than a few times?"""
        self.records += 1
        if self.records != 2:
            return
        seq = self.data.seq_len
        passes, advice = data_passes_advice(rec["tokens_per_s"], self.clock.remaining(), self.state.sequences * seq,
                                            len(self.data) * seq, self.data_dir, builtin=self.opts.data_dir is None)
        rec["expected_data_passes"] = round(passes, 2)
        if advice:
            self.warn(advice)
            self.log.write({"event": "advice", "kind": "data_passes", "passes": round(passes, 2), "message": advice})

    def _payload(self) -> dict:
        state = self.state
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": state.step,
                "micro_steps": state.micro_steps, "sequences": state.sequences,
                "position": dataclasses.asdict(state.position), "elapsed_s": self.clock.elapsed(),
                "config": self.config, "rng": ckpt.rng_state(self.mask_gen), "ops": self.model.ops.choice}

    def _save(self, path: str) -> None:
        if self.main:
            self.writer.submit(path, self._payload(), self.state.step)

    def _report_checkpoints(self) -> dict:
        """Log finished checkpoint writes; returns {path: record} of the failed ones, each named on stderr with
        its cause and the checkpoint a crash would fall back to."""
        failed = {}
        for rec in self.writer.results():
            self.log.write(rec)
            if "error" not in rec:
                self.last_saved = rec
                continue
            failed[rec["path"]] = rec
            self.warn(f"fastcram: checkpoint of step {rec['step']} not saved: {rec['error']}; {self._fallback()}")
        return failed

    def _fallback(self) -> str:
        s = self.last_saved
        if s is None:
            return "this run has no checkpoint yet: a crash now would lose all of its training"
        return f"the newest checkpoint is {s['path']} (step {s['step']})"

    def _lower_lr(self) -> float:
        lr = self.tcfg.lr / 2
        return lr if math.isfinite(lr) else 5e-4

    def _stop_after_failed_checkpoints(self, failed: dict) -> str | None:
        """A failed write stops the run when the weights are no longer finite, at once with
        --stop-on-checkpoint-error, else when no checkpoint has been written for `unsaved_limit` of the budget."""
        tcfg, rec = self.tcfg, list(failed.values())[-1]
        resume = f"fastcram train --resume {self.run_dir}"
        if rec.get("nonfinite"):
            self.warn(f"fastcram: stopping: the weights are no longer finite at step {rec['step']}; "
                      f"{self._fallback()}; resume with a lower learning rate, e.g. {resume} --lr {self._lower_lr():g}")
            return "non-finite"
        unsaved = self.clock.elapsed() - (self.last_saved["budget_spent_s"] if self.last_saved else 0.0)
        if tcfg.stop_on_checkpoint_error:
            why = "--stop-on-checkpoint-error"
        elif unsaved >= tcfg.unsaved_limit * tcfg.budget_s:
            why = (f"no checkpoint could be written for {unsaved:.0f} s, {100 * unsaved / tcfg.budget_s:.0f}% of the "
                   f"budget (the limit is {100 * tcfg.unsaved_limit:g}%)")
        else:
            return None
        self.warn(f"fastcram: stopping ({why}): {rec['error']}; {self._fallback()}; free disk space, then " +
                  (resume if self.last_saved else "start the run again"))
        return "checkpoint-error"

    # ------------------------------------------------------------ endings

    def _stop_on_signal(self, name: str) -> dict:
        """SIGTERM/SIGINT: save where the loop stopped, so that --resume continues from there."""
        step = self.state.step
        path = ckpt.step_path(self.run_dir, step)
        self._save(path)
        self.writer.wait()
        failed = self._report_checkpoints().get(path)
        self.log.write({"event": "stopped", "signal": name, "step": step, "checkpoint": None if failed else path,
                        "budget_spent_s": round(self.clock.elapsed(), 3)})
        self.log.close()
        self.say(f"\nstopped by {name} at step {step}; " +
                 (f"saving failed ({failed['error']}); {self._fallback()}" if failed else f"saved {path}") +
                 f"\nresume with: fastcram train --resume {self.run_dir}")
        return {"stopped_by": name, "run_dir": self.run_dir, "step": step, "exit_code": 1 if failed else 0}

    def _stop_on_bad_data(self) -> None:
        """A shard failed its verification: save where the loop stopped, then one line naming the shard (exit 2)."""
        step = self.state.step
        path = ckpt.step_path(self.run_dir, step)
        self._save(path)
        self.writer.wait()
        failed = self._report_checkpoints().get(path)
        self.log.write({"event": "stopped", "reason": "bad-data", "error": str(self.data_error), "step": step,
                        "checkpoint": None if failed else path})
        self.log.close()
        saved = f"saved {path}" if not failed else f"could not save it; {self._fallback()}"
        raise UserError(f"{self.data_error}; training stopped at step {step} and {saved}; once the data is fixed, "
                        f"resume with fastcram train --resume {self.run_dir}")

    def _stop(self, reason: str) -> dict:
        self._report_checkpoints()
        self.log.write({"event": "stopped", "reason": reason, "step": self.state.step})
        self.log.close()
        return {"stopped_by": reason, "run_dir": self.run_dir, "step": self.state.step, "exit_code": 1}

    def _finish(self) -> dict:
        state, run_dir = self.state, self.run_dir
        final_path = os.path.join(run_dir, ckpt.CKPT_DIR, ckpt.FINAL)
        self._save(final_path)
        self.writer.wait()
        failed = self._report_checkpoints().get(final_path)
        if failed:
            self.log.write({"event": "stopped", "reason": "final-checkpoint", "step": state.step})
            self.log.close()
            raise UserError(f"could not write the final checkpoint {final_path} ({failed['error']}); " +
                            (f"{self._fallback()}: free disk space and run fastcram train --resume {run_dir}"
                             if self.last_saved else "this run has no checkpoint: its training is lost; free disk "
                                                     "space and start it again"))
        tokens = state.sequences * self.data.seq_len
        summary = {"run_dir": run_dir, "steps": state.step, "micro_steps": state.micro_steps,
                   "sequences": state.sequences, "tokens": tokens, "world_size": self.ctx.world,
                   "budget_s": self.tcfg.budget_s, "budget_spent_s": round(self.clock.elapsed(), 3),
                   "first_logged_loss": self.first_loss, "final_loss": self.last_loss,
                   "skipped_steps": self.guard.total, "final_checkpoint": final_path, "device": self.env["device"],
                   "ops": self.model.ops.choice, "telemetry": self.telemetry.summary(tokens),
                   "switches": {k: v["value"] for k, v in self.switches.items()},
                   "profile": self.profile_result, "startup": self.startup, "peak_mem_mib": self._peak_mem_mib(),
                   "flops_per_token": self.fpt, "final_eval_loss": self.evals["last"],
                   "eval": {"evaluations": self.evals["count"], "eval_s": round(self.evals["seconds"], 3),
                            "excluded_from_budget_s": round(self.clock.excluded_s, 3),
                            **(self.evaluator.describe() if self.evaluator else
                               {"none": self.data.no_holdout_reason if self.data.holdout is None else "off"})},
                   "target": self.target_hit, "exit_code": 0}
        if self.main:
            try:
                atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
            except WriteError as e:  # the training is saved in final.pt all the same
                self.warn(f"fastcram: {e}; the final checkpoint {final_path} is complete")
                summary["exit_code"] = 1
        self.log.write({"event": "end", **summary})
        self.log.close()
        held = "" if self.evals["last"] is None else f", held-out loss {self.evals['last']:.4f}"
        self.say(f"\ndone: {state.step} steps, {tokens / 1e6:.1f}M tokens, loss {self.first_loss} -> "
                 f"{summary['final_loss']}{held}; checkpoint {final_path}")
        return summary
