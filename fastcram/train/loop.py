"""The training loop: tokenizer -> data -> model(get_ops) -> compiled step -> loop until the budget clock
says stop -> checkpoint -> summary.

The hot loop never synchronises with the host except at log intervals (and checkpoints): losses and
gradient norms stay on the device until a log record is written. What is not the loop lives beside it:
start-up checks, device, data and tuning (start.py), the run folder and the files written there
(run_folder.py), the model, optimizer and step (step.py), held-out evaluations (evaluate.py), checkpoint
writes and when their failures stop the run (run_checkpoints.py, over checkpoint.py); log records, the
summary and the progress lines in observe/runlog.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable

import torch

from ..config import RunOptions
from ..data.loader import BlockLoader, ShardError, mask_batch
from ..errors import UserError
from ..observe.env_info import environment
from ..observe.metrics import flops_per_token, peak_tflops
from ..observe.profiling import format_breakdown
from ..observe.runlog import (done_line, log_record, progress_line, say, start_line, startup_line, summary_record,
                              write_summary)
from . import checkpoint as ckpt
from . import autotune
from .advice import DataPassesAdvice
from .compile_cache import compile_caches, describe as describe_caches
from .distributed import DistContext, agree, init_from_env, mean_across, rank_slice, shutdown
from .evaluate import Evaluations
from .run_checkpoints import RunCheckpoints, lower_lr
from .run_folder import open_log, open_run_folder, open_watchers, run_config, write_config
from .schedule import BudgetClock, accumulation_steps, lr_multiplier
from .signals import StopRequest
from .start import check_cache_folder, check_options, open_data, run_device, tune_switches
from .step import (NonFiniteGuard, autocast_dtype, build_model, check_attention, make_optimizer, make_step,
                   resolve_device)


def train(opts: RunOptions, now: Callable[[], float] = time.monotonic) -> dict:
    """Run (or resume) training until the budget is spent; returns the summary (on every rank)."""
    tcfg = opts.train
    ctx = init_from_env("cuda" if resolve_device(tcfg.device).startswith("cuda") else "cpu")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        # the compile caches in the cache folder; SIGTERM/SIGINT as a request to stop, from the start
        with compile_caches() as caches, StopRequest() as stop:
            return Training(opts, ctx, now, caches).run(stop)
    finally:
        if torch.are_deterministic_algorithms_enabled() != deterministic_before:  # (the call imports inductor:
            torch.use_deterministic_algorithms(deterministic_before)  # not after a Ctrl-C cut an import short)
        shutdown(ctx)


class Training:
    """One run, set up top-down (run folder -> data -> budget clock -> model and compiled step -> logs and
    checkpoints), then the loop, then the ending: a signal's checkpoint, a stop, or the final checkpoint."""

    def __init__(self, opts: RunOptions, ctx: DistContext, now: Callable[[], float], caches: dict | None = None):
        self.ctx, self.now, self.main, self.opts, self.caches = ctx, now, ctx.is_main, opts, caches or {}
        made_here = not (opts.resume or (opts.out_dir and os.path.isdir(opts.out_dir)))
        self.run_dir, self.resumed, self.opts = open_run_folder(opts, self.main, self.warn)
        try:
            self.tcfg = self.opts.train
            check_options(self.tcfg)
            check_cache_folder(self.tcfg, self.resumed is not None, self.main)
            self.device = run_device(self.tcfg, ctx)
            self.model_cfg, self.data_dir, self.data = open_data(self.opts, self.resumed, ctx)  # tokenizer + data
            self.spent = spent = self.resumed["elapsed_s"] if self.resumed else 0.0
            self.clock = BudgetClock(self.tcfg.budget_s, spent, now=now)  # runs while the model is built
            if self.clock.done():
                raise UserError(f"the budget ({self.tcfg.budget_s:.0f} s) is already spent ({spent:.0f} s); "
                                f"pass a larger --hours/--minutes to continue")
            self._build_model()
            if self.main:  # a folder without room for one checkpoint would train for nothing
                ckpt.check_room(self.run_dir, self.model, self.tcfg.keep_checkpoints, self.tcfg.unsaved_limit,
                                self.warn)
        except UserError:
            if made_here and self.main:  # a new run that never started leaves no empty folder of its own
                with contextlib.suppress(OSError):
                    os.rmdir(self.run_dir)
            raise
        self._open_outputs()

    def say(self, msg: str) -> None:
        if self.main:
            say(self.opts.progress, msg)

    def warn(self, msg: str) -> None:  # shown with --quiet too
        if self.main:
            say(True, msg)

    # ------------------------------------------------------------ set-up

    def _build_model(self) -> None:
        """The step-level switches (flags, the tuning cache, or measured), the model on its ops bundle, the
        optimizer, the compiled step and the loader."""
        tcfg, ctx, device = self.tcfg, self.ctx, self.device
        t0 = self.now()
        per_op, self.tuning = tune_switches(self.model_cfg, self.opts, device, self.data, ctx, self.resumed)
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
        self.config = run_config(opts, self.data_dir, self.model_cfg, ctx.world)
        if resumed is None and self.main:
            write_config(self.run_dir, self.config)
        self.log = open_log(self.run_dir, self.main, self.warn)
        self.env = environment(device)
        if resumed is not None and resumed["config"].get("world_size", 1) != ctx.world:
            self.say(f"fastcram: resuming a run saved with {resumed['config'].get('world_size', 1)} process(es) "
                     f"on {ctx.world}: the data continues from the same block, in global micro-batches of "
                     f"{self.global_micro}")
        self.switches = autotune.switch_record(self.model_cfg, tcfg, self.tuning.how, self.model.ops.choice)
        self.log.write({"event": "start" if resumed is None else "resume", "config": self.config, **self.env,
                        "ops": self.model.ops.choice, "switches": self.switches, "step": self.step_fn.settings,
                        "budget_spent_s": round(self.spent, 3), "autotune": self.tuning.report or None,
                        "compile_caches": self.caches, "world_size": ctx.world,
                        "checkpoint": resumed.get("_path") if resumed else None})
        self.fpt = flops_per_token(self.model_cfg, opts.data.mask_prob)
        peak = peak_tflops(self.env["device"] if device.startswith("cuda") else None, opts.peak_tflops)
        self.peak = peak * ctx.world if peak else None  # MFU of the whole world
        self.say(start_line(preset=opts.preset, params=sum(p.numel() for p in self.model.parameters()),
                            device=self.env["device"], world=ctx.world, micro_batch=tcfg.micro_batch,
                            budget_s=tcfg.budget_s, run_dir=self.run_dir, switches=self.switches,
                            caches=describe_caches(self.caches) if self.caches else None))
        self.profiler, self.telemetry = open_watchers(self.run_dir, tcfg, ctx, device,
                                                      quiet=not (opts.progress and self.main))
        self.saves = RunCheckpoints(self.run_dir, tcfg, self.clock, self.log, self.warn, self.main, resumed)
        self.data_error: ShardError | None = None
        self.guard = NonFiniteGuard(self.optimizer, device, tcfg.max_bad_steps, check_loss=not ctx.enabled)

    # ------------------------------------------------------------ the loop

    def run(self, stop: StopRequest) -> dict:
        self._start_loop()
        stop.loop_started = True  # from here a signal finishes the step in flight, saves and stops
        try:
            stopped_by = self._loop(stop)
        finally:
            if self.sync_debug:
                torch.cuda.set_sync_debug_mode("default")
            self.loader.close()
            self.telemetry.stop()
            self.saves.wait()
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
        self.advice = DataPassesAdvice(len(self.data) * self.data.seq_len, self.data_dir, self.opts.data_dir is None,
                                       self.warn, self.log)
        self.model.train()
        self.evals = Evaluations(self.tcfg, self.opts.data, self.data, device, self.clock, self.log, self.say,
                                 self.main)

    def _evaluate(self, budget_done: bool) -> None:
        """The held-out loss when due (rank 0), off the budget clock: the device first finishes the training
        work it has queued (budget time; this is a log interval's sync), then the clock stands still."""
        if not self.evals.due(self.state.step, budget_done):
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        off_clock = self.evals.run(self.model, self.step_fn.context, self.state.step, self.state.sequences)
        self.interval["t"] += off_clock  # the interval's tokens/s counts training time only
        self.last_ckpt += off_clock

    def _loop(self, stop: StopRequest) -> str | None:
        """Steps until the budget is spent or something stops the run (its reason returned). No host sync
        except at log intervals: at the top of each step the ranks agree (host tensors only) on rank 0's
        progress and whether to log, stop or save."""
        tcfg, stopped_by = self.tcfg, None
        while True:
            budget_done = self.clock.done() or (tcfg.max_steps is not None and self.state.step >= tcfg.max_steps)
            if self.main:
                self._evaluate(budget_done)  # a held-out evaluation makes this a log interval
            budget_done = budget_done or self.evals.target_hit is not None
            t = self.now()
            log_due = self.interval["steps"] > 0 and (t - self.interval["t"] >= tcfg.log_interval_s or budget_done
                                                      or tcfg.deterministic or stop.signal is not None
                                                      or self.evals.pending is not None)
            save_due = t - self.last_ckpt >= tcfg.checkpoint_interval_s
            p, flags = agree(self.ctx, self._progress(), [budget_done, log_due, save_due, stop.signal is not None])
            budget_done, log_due, save_due, signalled = flags
            if log_due:
                stopped_by = self._write_log() or stopped_by
            if signalled:
                stopped_by = stop.name()
            if stopped_by or budget_done:
                return stopped_by
            if save_due:
                self.saves.save(ckpt.step_path(self.run_dir, self.state.step), self._payload, self.state.step)
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
        self.say(startup_line(self.startup))

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
        if self.evals.pending is not None:
            rec.update(self.evals.pending)
            self.evals.pending = None
        self.advice(rec, self.clock.remaining, self.state.sequences * self.data.seq_len)
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
                     f"e.g. fastcram train --resume {self.run_dir} --lr {lower_lr(self.tcfg.lr):g}")
            stop = "non-finite"
        failed = self.saves.report()
        return (self.saves.stop_reason(failed) if failed else None) or stop

    def _payload(self) -> dict:
        state = self.state
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": state.step,
                "micro_steps": state.micro_steps, "sequences": state.sequences,
                "position": dataclasses.asdict(state.position), "elapsed_s": self.clock.elapsed(),
                "config": self.config, "rng": ckpt.rng_state(self.mask_gen), "ops": self.model.ops.choice}

    # ------------------------------------------------------------ endings

    def _stop_on_signal(self, name: str) -> dict:
        """SIGTERM/SIGINT: save where the loop stopped, so that --resume continues from there."""
        step = self.state.step
        path = ckpt.step_path(self.run_dir, step)
        failed = self.saves.save_now(path, self._payload, step)
        self.log.write({"event": "stopped", "signal": name, "step": step, "checkpoint": None if failed else path,
                        "budget_spent_s": round(self.clock.elapsed(), 3)})
        self.log.close()
        self.say(f"\nstopped by {name} at step {step}; " +
                 (f"saving failed ({failed['error']}); {self.saves.fallback()}" if failed else f"saved {path}") +
                 f"\nresume with: fastcram train --resume {self.run_dir}")
        return {"stopped_by": name, "run_dir": self.run_dir, "step": step, "exit_code": 1 if failed else 0}

    def _stop_on_bad_data(self) -> None:
        """A shard failed its verification: save where the loop stopped, then one line naming the shard (exit 2)."""
        step = self.state.step
        path = ckpt.step_path(self.run_dir, step)
        failed = self.saves.save_now(path, self._payload, step)
        self.log.write({"event": "stopped", "reason": "bad-data", "error": str(self.data_error), "step": step,
                        "checkpoint": None if failed else path})
        self.log.close()
        saved = f"saved {path}" if not failed else f"could not save it; {self.saves.fallback()}"
        raise UserError(f"{self.data_error}; training stopped at step {step} and {saved}; once the data is fixed, "
                        f"resume with fastcram train --resume {self.run_dir}")

    def _stop(self, reason: str) -> dict:
        self.saves.report()
        self.log.write({"event": "stopped", "reason": reason, "step": self.state.step})
        self.log.close()
        return {"stopped_by": reason, "run_dir": self.run_dir, "step": self.state.step, "exit_code": 1}

    def _finish(self) -> dict:
        """The final checkpoint, then summary.json, the run log's end record and the done line."""
        state, run_dir = self.state, self.run_dir
        final_path = os.path.join(run_dir, ckpt.CKPT_DIR, ckpt.FINAL)
        self.saves.save_final(final_path, self._payload, state.step)
        tokens = state.sequences * self.data.seq_len
        summary = summary_record(
            run_dir=run_dir, steps=state.step, micro_steps=state.micro_steps, sequences=state.sequences,
            tokens=tokens, world_size=self.ctx.world, budget_s=self.tcfg.budget_s,
            budget_spent_s=self.clock.elapsed(), first_loss=self.first_loss, final_loss=self.last_loss,
            skipped_steps=self.guard.total, final_checkpoint=final_path, device=self.env["device"],
            ops=self.model.ops.choice, telemetry=self.telemetry.summary(tokens), switches=self.switches,
            profile=self.profile_result, startup=self.startup, peak_mem_mib=self._peak_mem_mib(),
            flops_per_token=self.fpt, final_eval_loss=self.evals.last, evals=self.evals.summary(),
            target=self.evals.target_hit)
        if self.main:
            write_summary(os.path.join(run_dir, "summary.json"), summary, self.warn)
        self.log.write({"event": "end", **summary})
        self.log.close()
        self.say(done_line(state.step, tokens, self.first_loss, summary["final_loss"], self.evals.last, final_path))
        return summary
