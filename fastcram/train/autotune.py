"""Start-up auto-tuning, charged to the budget: the micro-batch size, then the step-level switches.

Step-level tuning times the real training step (forward, backward, clipping, AdamW step; compiled as the
run compiles it) on the run's shapes, one candidate assignment of the switches at a time:
  1. the baseline: every op of the bundle on torch, attention and compile mode at "default";
  2. every op on triton (--kernels auto);
  3. compile mode reduce-overhead (CUDA graphs; --compile-mode auto, one GPU process);
  4. each explicit attention backend (--attention auto);
  5. each op of the bundle flipped from the best so far, the largest op first (--kernels auto);
  6. compile mode max-autotune-no-cudagraphs (slowest to compile, last).
Each candidate is built from the best so far; it is kept only when it is faster by more than 2% and by more
than twice the spread (standard deviation) of the repeated timings. Rates are weighed by the compile time the
candidate would cost the rest of the budget (tokens/s x (1 - compile_s / remaining_s)): a short budget
prefers what compiles fast. Tuning stays within 5% of the budget: before each candidate its cost is
predicted (the most any candidate took so far, or what one took on this machine before, or an assumption
for a machine that has measured none), and candidates that would not fit are skipped, in the order above; a
candidate that runs past what is left of the 5% is stopped after its first compiled step or between its
timed repeats and not chosen. A compile that has started cannot be interrupted, so the cap can be passed by
at most the rest of one candidate's first step.

The measurements of a finished tuning are cached in the cache folder (tune_cache.py). The next run on the
same machine replays the search on them at its own budget (a short budget weighs compile times differently
from a long one), measuring only a candidate the cache lacks; --retune ignores the cache.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ModelConfig, RunOptions, TrainConfig
from ..data.loader import mask_batch
from ..errors import UserError
from ..model import CrammedBert
from ..observe import runlog
from ..ops import OP_MODULES, OpsError, get_op, get_ops, triton_unavailable_reason
from . import switches as sw
from . import tune_cache
from .step import (autocast_dtype, build_model, check_attention, make_optimizer, make_step, optimizer_step,
                   release_compiled, synthetic_batches)

GPU_MICRO_BATCHES = (32, 64, 128, 256, 512, 1024)
CPU_MICRO_BATCHES = (8, 16, 32, 64)
TUNED = ("kernels", "attention", "compile_mode")  # the switches that accept "auto"
# Assumed cost of measuring one candidate on a machine that has measured none yet (an assumption, not a
# measurement: compiling crammed BERT's step takes about a minute or two); replaced by measured costs.
PRIOR_COST_S = {"compiled": 120.0, "eager": 10.0}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------- --micro-batch auto

def search_micro_batch(measure: Callable[[int], float], candidates, min_gain: float = 0.03,
                       log: Callable[[str], None] = lambda s: None,
                       affordable: Callable[[], bool] = lambda: True) -> tuple[int, list[dict]]:
    """Try growing micro-batches; stop at out-of-memory, when tokens/s gains less than min_gain, or when
    affordable() says the next size would pass the tuning cap (the first size is always tried).

    measure(size) -> tokens/s (raises an out-of-memory error when the size does not fit).
    Returns the best size and the table of trials.
    """
    trials: list[dict] = []
    best, best_tps = None, 0.0
    for size in candidates:
        if best is not None and not affordable():
            trials.append({"micro_batch": size, "tokens_per_s": None, "result": "skipped: 5% tuning cap"})
            log(f"  micro-batch {size}: skipped (it would pass the 5% tuning cap)")
            break
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


def tune_micro_batch(model_cfg: ModelConfig, tcfg: TrainConfig, opts: RunOptions, device: str, data,
                     say: Callable[[str], None]) -> dict:
    """--micro-batch auto: the step with the auto switches at their baseline, at growing sizes; sets
    tcfg.micro_batch."""
    say("auto-tuning the micro-batch (time counts against the budget):")
    best, trials = _search_sizes(model_cfg, tcfg, opts, device, data, say)
    release_compiled(device)  # the probe model is gone; so are its compiled graphs
    tcfg.micro_batch = best
    say(f"  -> micro-batch {best}")
    return {"chosen": best, "trials": trials}


def _search_sizes(model_cfg, tcfg, opts, device, data, say) -> tuple[int, list[dict]]:
    fixed = sw.apply({k: "torch" if k == "kernels" else "default" for k in TUNED
                      if sw.SWITCHES[k].get(model_cfg, tcfg) == sw.AUTO}, model_cfg, tcfg)[1]
    probe = build_model(model_cfg, fixed, device)
    step = make_step(probe, fixed, device)
    gen = torch.Generator(device=device).manual_seed(tcfg.seed)

    def make_batch(size):
        ids = torch.randint(max(data.special.all) + 1, data.vocab_size, (size, data.seq_len), device=device)
        b = mask_batch(ids, opts.data, data.special, data.vocab_size, gen)
        return b.input_ids, b.positions, b.labels

    cands = GPU_MICRO_BATCHES if device.startswith("cuda") else CPU_MICRO_BATCHES
    cands = [c for c in cands if c <= len(data)]
    t0, costs = time.perf_counter(), []

    def measure(size: int) -> float:
        t = time.perf_counter()
        try:
            return measure_step_throughput(step, make_batch, probe, size, data.seq_len, device)
        finally:
            costs.append(time.perf_counter() - t)

    def affordable() -> bool:  # a larger size costs at least what the last one did
        return time.perf_counter() - t0 + costs[-1] <= Rule().cap_fraction * tcfg.budget_s

    return search_micro_batch(measure, cands, log=say, affordable=affordable)


# ---------------------------------------------------------------- step-level tuning: the search

@dataclass
class Measurement:
    """One candidate's timing: tokens/s of each timed repeat, the host time of its first step (tracing and
    compiling), the wall time of the whole measurement, or the reason it could not run."""
    tokens_per_s: list = field(default_factory=list)
    compile_s: float = 0.0
    cost_s: float = 0.0
    error: str | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.tokens_per_s) if len(self.tokens_per_s) > 1 else 0.0


@dataclass(frozen=True)
class Rule:
    min_gain: float = 0.02  # a candidate must be faster by more than this fraction ...
    spread_factor: float = 2.0  # ... and by more than this many spreads of the repeated timings
    cap_fraction: float = 0.05  # of the budget, for all of the start-up tuning


def effective_rate(m: Measurement, remaining_s: float) -> float:
    """tokens/s over what is left of the budget once this candidate's compile is paid."""
    return m.rate * max(0.0, 1.0 - m.compile_s / remaining_s) if remaining_s > 0 else m.rate


def verdict(new: Measurement, best: Measurement, remaining_s: float, rule: Rule) -> tuple[bool, str]:
    """Whether `new` beats `best` by the 2% / spread rule, and why in words."""
    a, b = effective_rate(best, remaining_s), effective_rate(new, remaining_s)
    gain, noise = b - a, rule.spread_factor * max(new.spread, best.spread)
    if gain <= rule.min_gain * a:
        return False, f"{100 * gain / a:+.1f}%: not more than {100 * rule.min_gain:.0f}% faster"
    if gain <= noise:
        return False, f"{100 * gain / a:+.1f}%: within {rule.spread_factor:g}x the spread ({noise:,.0f} tok/s)"
    return True, f"{100 * gain / a:+.1f}%: kept"


@dataclass(frozen=True)
class Move:
    """One step of the plan: from the best assignment so far, set `settings` (or flip one op)."""
    what: str  # for the log: "all ops triton", "attention=cudnn", "flip mlm_loss", ...
    settings: dict = field(default_factory=dict)
    flip_op: str | None = None

    def switches(self) -> set:
        """The tuned switches this move changes."""
        keys = set(self.settings) | ({sw.OP_PREFIX + self.flip_op} if self.flip_op else set())
        return {"kernels" if k.startswith(sw.OP_PREFIX) else k for k in keys}

    def apply(self, best: dict) -> dict:
        cand = {**best, **self.settings}
        if self.flip_op:
            key = sw.OP_PREFIX + self.flip_op
            cand[key] = "triton" if best.get(key) == "torch" else "torch"
        return cand


def plan(auto: set, ops_by_size: list[str], flippable: set, device: str, compiled: bool,
         distributed: bool) -> tuple[dict, list[Move]]:
    """The baseline assignment and the moves, in order of expected gain (see the module docstring)."""
    cuda = device.startswith("cuda")
    baseline: dict = {}
    if "kernels" in auto:
        baseline.update({sw.OP_PREFIX + op: "torch" for op in ops_by_size})
    if "attention" in auto:
        baseline["attention"] = "default"
    if "compile_mode" in auto:
        baseline["compile_mode"] = "default"
    moves: list[Move] = []
    tri = [op for op in ops_by_size if op in flippable]
    if "kernels" in auto and tri:
        moves.append(Move("all ops triton", {sw.OP_PREFIX + op: "triton" for op in tri}))
    graphs = "compile_mode" in auto and compiled
    if graphs and cuda and not distributed:  # CUDA graphs under DDP's gradient hooks: not tried
        moves.append(Move("compile_mode=reduce-overhead", {"compile_mode": "reduce-overhead"}))
    if "attention" in auto:
        for name in (("cudnn", "flash", "efficient") if cuda else ("flash", "math")):
            moves.append(Move(f"attention={name}", {"attention": name}))
    if "kernels" in auto and len(tri) > 1:
        moves += [Move(f"flip {op}", flip_op=op) for op in tri]
    if graphs:
        moves.append(Move("compile_mode=max-autotune-no-cudagraphs",
                          {"compile_mode": "max-autotune-no-cudagraphs"}))
    return baseline, moves


@dataclass
class SearchResult:
    choice: dict
    rows: list  # one per candidate: what, settings, tokens/s, spread, compile_s, cost_s, result
    spent_s: float  # measured cost of the candidates (the tuning time)
    complete: bool  # every planned candidate was measured (nothing skipped by the cap)


def search(baseline: dict, moves: list[Move], measure: Callable[[dict, float], Measurement], cap_s: float,
           prior_cost_s: float, remaining_s: float, rule: Rule = Rule(),
           log: Callable[[str], None] = lambda s: None) -> SearchResult:
    """Measure the baseline, then each move from the best so far, within cap_s seconds of measuring.

    measure(candidate, allowance_s) times one candidate and stops it (an error) once it has taken more than
    allowance_s, what is left of the cap. Only measurements (their cost_s) advance the tuning clock, so every
    rank of a distributed run that sees the same (rank 0's) measurements takes the same decisions."""
    rows: list[dict] = []
    tried: set = set()
    best, best_m, spent, complete = dict(baseline), None, 0.0, True
    costs: list[float] = []
    for move in [Move("baseline")] + moves:
        cand = move.apply(best)
        frozen = frozenset(cand.items())
        if frozen in tried:
            continue
        predicted = max(costs) if costs else prior_cost_s
        if spent + predicted > cap_s:
            rows.append({"what": move.what, "settings": cand, "result": f"skipped: it would pass the "
                         f"{100 * rule.cap_fraction:g}% cap ({spent:.0f} s + ~{predicted:.0f} s > {cap_s:.0f} s)"})
            log(f"  {move.what}: skipped (tuning cap {cap_s:.0f} s)")
            complete = False
            continue
        tried.add(frozen)
        m = measure(cand, cap_s - spent)
        spent += m.cost_s
        costs.append(m.cost_s)
        row = {"what": move.what, "settings": cand, "compile_s": round(m.compile_s, 3), "cost_s": round(m.cost_s, 3)}
        if m.error:
            row["result"] = f"failed: {m.error}"
            log(f"  {move.what}: failed ({m.error})")
        else:
            row.update(tokens_per_s=round(m.rate, 1), spread=round(m.spread, 1),
                       repeats=[round(r, 1) for r in m.tokens_per_s])
            if best_m is None:
                keep, why = True, "reference"
            else:
                keep, why = verdict(m, best_m, remaining_s, rule)
            row["result"] = why
            if keep:
                best, best_m = cand, m
            log(f"  {move.what}: {m.rate:,.0f} tok/s (spread {m.spread:,.0f}, compile {m.compile_s:.1f} s) -> {why}")
        rows.append(row)
    return SearchResult(best, rows, spent, complete)


# ---------------------------------------------------------------- the ops a model uses

def used_ops(model_cfg: ModelConfig, mask_prob: float = 0.25) -> list[str]:
    """The ops of the bundle this model calls, largest first (bytes of their inputs in one forward).

    Found by running the model once on the meta device (shapes only, no memory, no compute) with an ops
    bundle that records its calls, so a new or renamed op needs no list here."""
    base = get_ops("torch")
    volume: dict[str, int] = {}

    def recorder(op: str, fn: Callable) -> Callable:
        def record(*args, **kwargs):
            volume[op] = volume.get(op, 0) + sum(a.numel() * a.element_size() for a in args
                                                 if isinstance(a, torch.Tensor))
            return fn(*args, **kwargs)
        return record

    ops = dataclasses.replace(base, **{op: recorder(op, getattr(base, op)) for op in OP_MODULES})
    B, L = 2, model_cfg.seq_len
    m = max(1, round(mask_prob * L))
    with torch.device("meta"):
        model = CrammedBert(model_cfg, ops)
        ids = torch.zeros(B, L, dtype=torch.long)
        positions = (torch.arange(m).unsqueeze(0) + L * torch.arange(B).unsqueeze(1)).reshape(-1)  # [B * m]
        model(ids, positions, torch.zeros(B * m, dtype=torch.long))
    return sorted(volume, key=lambda op: -volume[op])


def triton_ops(ops: list[str], device: str) -> set:
    """Those of `ops` with a Triton implementation usable on this device."""
    if triton_unavailable_reason(device):
        return set()
    out = set()
    for op in ops:
        try:
            get_op(op, "triton")
            out.add(op)
        except OpsError:
            pass
    return out


# ---------------------------------------------------------------- step-level tuning: the real timing

@dataclass(frozen=True)
class TimingPlan:
    warmup: int  # untimed steps first: the first compiles; reduce-overhead records its CUDA graphs later
    repeats: int  # timed repeats (their spread is the noise the 2% rule must clear)
    steps: int  # steps per repeat

    @staticmethod
    def for_device(device: str) -> "TimingPlan":
        return TimingPlan(3, 5, 10) if device.startswith("cuda") else TimingPlan(2, 3, 2)


class PastTheCap(Exception):
    """A candidate took longer than what was left of the tuning cap."""


def measure_candidate(model_cfg: ModelConfig, tcfg: TrainConfig, device: str, next_batch: Callable,
                      timing: TimingPlan, masked_per_seq: int, allowance_s: float = math.inf) -> Measurement:
    """Build, compile and time one assignment's whole training step; failures become the row's reason. Past
    allowance_s (checked after the warm-up steps and after each timed repeat) it stops, unmeasured."""
    t0 = time.perf_counter()

    def within_allowance(stage: str) -> None:
        _sync(device)
        if time.perf_counter() - t0 > allowance_s:
            raise PastTheCap(f"stopped {stage}: {time.perf_counter() - t0:.0f} s, past the {allowance_s:.0f} s "
                             f"left of the tuning cap")
    tokens = tcfg.micro_batch * model_cfg.seq_len
    m = Measurement()
    model = optimizer = one = None
    try:
        torch.manual_seed(tcfg.seed)
        model = build_model(model_cfg, tcfg, device)
        check_attention(tcfg.attention, model_cfg, device, autocast_dtype(tcfg, device), masked_per_seq)
        optimizer = make_optimizer(model, tcfg, device)
        one = optimizer_step(model, optimizer, make_step(model, tcfg, device), tcfg)
        model.train()
        tc = time.perf_counter()
        loss = one(next_batch())
        m.compile_s = time.perf_counter() - tc
        for _ in range(timing.warmup - 1):
            loss = one(next_batch())
        within_allowance("after its warm-up")
        for i in range(timing.repeats):
            tr = time.perf_counter()
            for _ in range(timing.steps):
                loss = one(next_batch())
            _sync(device)
            m.tokens_per_s.append(tokens * timing.steps / (time.perf_counter() - tr))
            if i < timing.repeats - 1:
                within_allowance(f"after {i + 1} of {timing.repeats} timed repeats")
        if not math.isfinite(float(loss)):
            m.error, m.tokens_per_s = f"the loss is {float(loss)}", []
    except (UserError, PastTheCap) as e:
        m.error, m.tokens_per_s = str(e), []
    except Exception as e:  # one broken candidate must not stop the run: it is reported and not chosen
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        m.error = "out of memory" if is_oom(e) else f"{type(e).__name__}: {first}"[:300]
        m.tokens_per_s = []
    finally:
        del model, optimizer, one
        release_compiled(device)
    m.cost_s = time.perf_counter() - t0
    return m


# ---------------------------------------------------------------- the entry point

@dataclass
class Tuning:
    """What start-up tuning decided: the switch values set in tcfg, how each was chosen, the log report."""
    how: dict  # switch key (and "micro_batch") -> "flag" | "default" | "measured" | "cache" | ...
    report: dict
    seconds: float = 0.0


def _requested(model_cfg: ModelConfig, tcfg: TrainConfig) -> dict:
    return {**sw.current(model_cfg, tcfg), "norm_kernels": tcfg.norm_kernels}


def tune(model_cfg: ModelConfig, tcfg: TrainConfig, opts: RunOptions, device: str, data,
         share: Callable = lambda obj: obj, world_size: int = 1, write_cache: bool = True,
         now: Callable[[], float] = time.perf_counter, measure: Callable[[dict], Measurement] | None = None,
         cache_root: str | None = None) -> Tuning:
    """--micro-batch auto, then the switches set to auto (cache, or measured), before the real model is built.

    Sets tcfg.micro_batch, per_op, attention and compile_mode to the chosen values. `share(obj)` returns rank
    0's copy of obj (identity for one process); only the process with write_cache writes the cache folder;
    `measure` replaces the real timing (tests)."""
    say = (lambda msg: runlog.say(opts.progress, msg))
    t0 = now()
    given = set(opts.flags_given)
    how = {key: ("flag" if key in given else "default") for key in sw.SWITCHES}
    how["micro_batch"] = "flag" if "micro_batch" in given else "preset"
    report: dict = {}
    if tcfg.micro_batch_auto:
        report["micro_batch"] = tune_micro_batch(model_cfg, tcfg, opts, device, data, say)
        how["micro_batch"] = "measured"
        tcfg.micro_batch_auto = False  # the chosen size is what config.json records
    auto = {key for key in TUNED if sw.SWITCHES[key].get(model_cfg, tcfg) == sw.AUTO}
    if auto:
        report["step"] = _tune_step(model_cfg, tcfg, opts, device, data, auto, how, share, world_size,
                                    write_cache, now() - t0, measure, cache_root, say)
    seconds = now() - t0
    report["seconds"] = round(seconds, 3)
    return Tuning(how, report, seconds)


def _tune_step(model_cfg, tcfg, opts, device, data, auto, how, share, world_size, write_cache, spent_s,
               measure, cache_root, say) -> dict:
    key = tune_cache.result_key(device, model_cfg, tcfg.micro_batch, world_size, _requested(model_cfg, tcfg),
                                opts.data.mask_prob)
    path = tune_cache.result_path(key, cache_root)
    cached = None if tcfg.retune else share(tune_cache.load_result(key, cache_root))
    known = cached_measurements(cached)
    ops = used_ops(model_cfg, opts.data.mask_prob)
    fixed = set(("layer_norm", "add_layer_norm") if tcfg.norm_kernels else ()) | set(tcfg.per_op or {})
    ops = [op for op in ops if op not in fixed]
    flippable = triton_ops(ops, device) if "kernels" in auto else set()
    baseline, moves = plan(auto, ops, flippable, device, tcfg.compile, world_size > 1)
    unmeasurable = auto - {switch for move in moves for switch in move.switches()}
    how.update({k: "baseline: no alternative to measure here" for k in unmeasurable})
    if not moves:  # e.g. --kernels auto where Triton cannot run: one candidate, nothing to time it against
        _set_choice(model_cfg, tcfg, baseline, auto)
        say(f"auto: no alternative to measure here (Triton unavailable?): {sw.label(baseline)}")
        return {"cache": None, "choice": baseline, "candidates": []}
    cap_s = Rule().cap_fraction * tcfg.budget_s - share(spent_s)  # rank 0's figures: every rank decides alike
    remaining_s = tcfg.budget_s - Rule().cap_fraction * tcfg.budget_s
    cost_key = tune_cache.cost_key(device, model_cfg, tcfg.micro_batch, tcfg.compile)
    prior = share(tune_cache.load_cost(cost_key, cache_root))
    prior_s = prior if prior is not None else PRIOR_COST_S["compiled" if tcfg.compile else "eager"]
    if known:
        say(f"auto-tuning {', '.join(sorted(auto))}: replaying the measurements in the tuning cache ({path}) at "
            f"this run's budget; a candidate they lack is measured (at most {cap_s:.0f} s, 5% of the budget)")
    else:
        say(f"auto-tuning {', '.join(sorted(auto))} by timing whole training steps (at most {cap_s:.0f} s, 5% of "
            f"the budget; one candidate ~{prior_s:.0f} s"
            f"{'' if prior is not None else ', assumed: none measured here yet'}):")
    if measure is None:
        next_batch = synthetic_batches(model_cfg, tcfg.micro_batch, device, data.special, opts.data.mask_prob,
                                       seed=tcfg.seed)
        timing = TimingPlan.for_device(device)

        def measure(cand: dict, allowance_s: float) -> Measurement:
            m_cfg, t_cfg = sw.apply(cand, model_cfg, tcfg)
            return measure_candidate(m_cfg, t_cfg, device, next_batch, timing, opts.data.masked_per_seq,
                                     allowance_s)
    new_measurements = []

    def replay_or_measure(cand: dict, allowance_s: float) -> Measurement:
        hit = known.get(frozenset(cand.items()))
        if hit is not None:
            return hit
        new_measurements.append(cand)
        return share(measure(cand, allowance_s))

    result = search(baseline, moves, replay_or_measure, cap_s, prior_s, remaining_s, log=say)
    _set_choice(model_cfg, tcfg, result.choice, auto)
    source = "cache" if known and not new_measurements else "measured"
    measured = any("tokens_per_s" in r for r in result.rows)
    how.update({k: source if measured else "baseline: nothing measured within the 5% cap"
                for k in auto - unmeasurable})
    cache_state = "retune" if tcfg.retune else ("miss" if not known else "hit" if source == "cache" else "partial")
    costs = [r["cost_s"] for r in result.rows if r.get("cost_s")]
    out = {"cache": cache_state, "cache_file": path if source == "cache" else None, "choice": result.choice,
           "candidates": result.rows, "cap_s": round(cap_s, 3), "predicted_cost_s": round(prior_s, 3),
           "seconds": round(result.spent_s, 3), "complete": result.complete}
    if cached is not None:
        out["measured_on"] = cached.get("date")
    if costs and write_cache:
        tune_cache.save_cost(cost_key, max(costs), cache_root)
    if write_cache and new_measurements and result.complete and measured:
        rows = _merge_rows(cached, result.rows)
        out["cache_file"] = tune_cache.save_result(key, {"choice": result.choice, "candidates": rows,
                                                         "date": time.strftime("%Y-%m-%d %H:%M:%S")}, cache_root)
    say(f"  -> {sw.label(result.choice)}")
    return out


def cached_measurements(cached: dict | None) -> dict:
    """frozenset(candidate settings) -> its Measurement, from a cached tuning's rows; replayed ones cost 0 s
    (nothing is measured again). A failed candidate is replayed as failed."""
    known = {}
    for row in (cached or {}).get("candidates", []):
        settings = row.get("settings")
        if not isinstance(settings, dict):
            continue
        if row.get("repeats"):
            m = Measurement(list(row["repeats"]), compile_s=float(row.get("compile_s", 0.0)))
        elif str(row.get("result", "")).startswith("failed: "):
            m = Measurement(error=row["result"].removeprefix("failed: "))
        else:
            continue  # skipped by a cap: never measured
        known[frozenset(settings.items())] = m
    return known


def _merge_rows(cached: dict | None, rows: list[dict]) -> list[dict]:
    """This search's rows plus the cached measurements it did not need, so no measurement is forgotten."""
    seen = {frozenset(r["settings"].items()) for r in rows if "settings" in r}
    old = [r for r in (cached or {}).get("candidates", [])
           if isinstance(r.get("settings"), dict) and frozenset(r["settings"].items()) not in seen]
    return rows + old


def _set_choice(model_cfg: ModelConfig, tcfg: TrainConfig, choice: dict, auto: set) -> None:
    """Write the chosen values into tcfg (what config.json records and the model is built with)."""
    _, chosen = sw.apply(choice, model_cfg, tcfg)
    if "kernels" in auto:
        tcfg.per_op = {**(tcfg.per_op or {}), **(chosen.per_op or {})}
    if "attention" in auto:
        tcfg.attention = chosen.attention
    if "compile_mode" in auto:
        tcfg.compile_mode = chosen.compile_mode


def cached_choice(model_cfg: ModelConfig, tcfg: TrainConfig, device: str, mask_prob: float, world_size: int = 1,
                  cache_root: str | None = None) -> tuple[dict | None, str]:
    """(the choice a finished tuning cached for exactly this request, or None; the cache file it would be in).

    tcfg holds the request as a run makes it (its auto switches still "auto"): what the step benchmark's
    `fastcram` variant looks up to time fastcram as a run on this machine would start."""
    key = tune_cache.result_key(device, model_cfg, tcfg.micro_batch, world_size, _requested(model_cfg, tcfg),
                                mask_prob)
    cached = tune_cache.load_result(key, cache_root)
    return (cached["choice"] if cached else None), tune_cache.result_path(key, cache_root)


def resumed() -> Tuning:
    """A resumed run keeps the switches and micro-batch its saved configuration records."""
    return Tuning({**{key: "resumed" for key in sw.SWITCHES}, "micro_batch": "resumed"}, {})


def switch_record(model_cfg: ModelConfig, tcfg: TrainConfig, how: dict, ops_choice: dict) -> dict:
    """The run log header's record of every switch: its value and how it was chosen. The kernels value is
    the backend of each op, as the bundle the model runs on has it."""
    values = sw.current(model_cfg, tcfg)
    rec = {key: {"value": values[key], "how": how.get(key, "default")} for key in sw.SWITCHES}
    rec["kernels"]["value"] = dict(ops_choice)
    if tcfg.norm_kernels:
        rec["kernels"]["norm_kernels"] = tcfg.norm_kernels
    rec["micro_batch"] = {"value": tcfg.micro_batch, "how": how.get("micro_batch", "preset")}
    return rec
