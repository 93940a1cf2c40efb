import dataclasses
import json
import math
import os

import pytest
import torch

from fastcram.config import RunOptions, TrainConfig, preset
from fastcram.train import autotune, tune_cache
from fastcram.train.autotune import Measurement, Rule, plan, search, search_micro_batch, verdict

from .helpers import FakeClock


def test_stops_at_out_of_memory_and_keeps_the_best():
    seen = []

    def measure(size):
        seen.append(size)
        if size >= 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {32: 100.0, 64: 180.0, 128: 250.0}[size]

    best, trials = search_micro_batch(measure, [32, 64, 128, 256, 512])
    assert best == 128 and seen == [32, 64, 128, 256]
    assert trials[-1]["result"] == "out of memory"


def test_stops_when_throughput_stops_improving():
    tps = {8: 100.0, 16: 150.0, 32: 151.0, 64: 400.0}
    best, trials = search_micro_batch(lambda s: tps[s], [8, 16, 32, 64])
    assert best == 32 and len(trials) == 3  # 32 is < 3% better than 16: stop, never try 64


def test_micro_batch_search_stops_at_the_tuning_cap():
    tps = {8: 100.0, 16: 150.0, 32: 300.0, 64: 600.0}
    calls = []
    best, trials = search_micro_batch(lambda s: calls.append(s) or tps[s], [8, 16, 32, 64],
                                      affordable=lambda: len(calls) < 2)
    assert calls == [8, 16] and best == 16 and trials[-1] == {"micro_batch": 32, "tokens_per_s": None,
                                                              "result": "skipped: 5% tuning cap"}
    # the first size is tried even when nothing is affordable: a run needs a micro-batch
    assert search_micro_batch(lambda s: tps[s], [8, 16], affordable=lambda: False)[0] == 8


def test_other_errors_propagate():
    def measure(size):
        raise ValueError("a real bug")
    with pytest.raises(ValueError):
        search_micro_batch(measure, [8])


def test_auto_micro_batch_picks_a_size_on_cpu(small_data, tmp_path):
    from fastcram.train.loop import train

    tcfg = TrainConfig(compile=False, device="cpu", micro_batch_auto=True, final_batch=64, max_steps=1,
                       budget_s=1e6, log_interval_s=0.0)
    s = train(RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(tmp_path / "r"),
                         progress=False), now=FakeClock(0.0))
    start = json.loads(open(os.path.join(s["run_dir"], "log.jsonl")).readline())
    chosen = start["autotune"]["micro_batch"]["chosen"]
    assert chosen in (8, 16, 32, 64) and start["config"]["train"]["micro_batch"] == chosen
    assert all(t["tokens_per_s"] > 0 for t in start["autotune"]["micro_batch"]["trials"])


# ---------------------------------------------------------------- step-level tuning under a fake timer
TINY_OPS = ["mlm_loss", "ffn", "add_layer_norm", "layer_norm"]


def timed(rate: float, spread: float = 0.0, cost: float = 10.0, compile_s: float = 1.0) -> Measurement:
    """Three repeats around `rate` whose standard deviation is `spread`."""
    return Measurement([rate - spread, rate, rate + spread], compile_s=compile_s, cost_s=cost)


class FakeStep:
    """A fake whole-step timer: tokens/s = 1000 x the product of the factors of the candidate's settings."""

    def __init__(self, factors: dict, spread: float = 0.0, cost: float = 10.0, compile_s: dict | None = None):
        self.factors, self.spread, self.cost, self.compile_s = factors, spread, cost, compile_s or {}
        self.calls: list[dict] = []

    def __call__(self, cand: dict, allowance_s: float = math.inf) -> Measurement:
        self.calls.append(dict(cand))
        rate = 1000.0
        for k, v in cand.items():
            rate *= self.factors.get(f"{k}={v}", 1.0)
        compile_s = max([1.0] + [self.compile_s.get(f"{k}={v}", 0.0) for k, v in cand.items()])
        if self.cost > allowance_s:  # as measure_candidate: stopped once past the allowance, a step late
            return Measurement(cost_s=allowance_s + 1.0, compile_s=compile_s, error="stopped: past the cap")
        return timed(rate, self.spread * rate, self.cost, compile_s)


def test_verdict_two_percent_and_spread_rule():
    base = timed(1000.0)
    assert verdict(timed(1019.0), base, 1e9, Rule()) == (False, "+1.9%: not more than 2% faster")
    assert verdict(timed(1021.0), base, 1e9, Rule())[0]
    # 5% faster, but the repeats scatter by 30 tok/s: twice the spread (60) > the gain (50)
    keep, why = verdict(timed(1050.0, spread=30.0), base, 1e9, Rule())
    assert not keep and "within 2x the spread" in why
    assert verdict(timed(1050.0, spread=20.0), base, 1e9, Rule())[0]  # 2 x 20 = 40 < 50
    # the reference's own spread counts too
    assert not verdict(timed(1050.0), timed(1000.0, spread=30.0), 1e9, Rule())[0]


def test_short_budget_weighs_compile_time():
    base = timed(1000.0, compile_s=10.0)
    fast_but_slow_to_build = timed(1100.0, compile_s=200.0)
    assert verdict(fast_but_slow_to_build, base, 24 * 3600.0, Rule())[0]  # a day: 10% faster wins
    assert not verdict(fast_but_slow_to_build, base, 600.0, Rule())[0]  # 10 minutes: the compile eats it


def test_plan_order_and_generic_ops():
    baseline, moves = plan({"kernels", "attention", "compile_mode"}, TINY_OPS, {"mlm_loss", "layer_norm"}, "cuda",
                           compiled=True, distributed=False)
    assert baseline == {"kernels.mlm_loss": "torch", "kernels.ffn": "torch", "kernels.add_layer_norm": "torch",
                        "kernels.layer_norm": "torch", "attention": "default", "compile_mode": "default"}
    assert [m.what for m in moves] == [
        "all ops triton", "compile_mode=reduce-overhead", "attention=cudnn", "attention=flash", "attention=efficient",
        "flip mlm_loss", "flip layer_norm", "compile_mode=max-autotune-no-cudagraphs"]
    assert moves[0].settings == {"kernels.mlm_loss": "triton", "kernels.layer_norm": "triton"}  # only flippable ops
    _, cpu = plan({"attention", "compile_mode"}, TINY_OPS, set(), "cpu", compiled=False, distributed=False)
    assert [m.what for m in cpu] == ["attention=flash", "attention=math"]  # no CUDA graphs, no modes when eager
    _, ddp = plan({"compile_mode"}, TINY_OPS, set(), "cuda", compiled=True, distributed=True)
    assert [m.what for m in ddp] == ["compile_mode=max-autotune-no-cudagraphs"]


def test_search_chooses_by_whole_step_time():
    # alone an op may be faster, inside the step slower: ffn on triton costs 10% of the step
    fake = FakeStep({"kernels.mlm_loss=triton": 1.10, "kernels.ffn=triton": 0.90,
                     "kernels.add_layer_norm=triton": 1.01, "kernels.layer_norm=triton": 1.05,
                     "attention=math": 0.5, "attention=flash": 1.03})
    baseline, moves = plan({"kernels", "attention"}, TINY_OPS, set(TINY_OPS), "cpu", False, False)
    res = search(baseline, moves, fake, cap_s=1e9, prior_cost_s=10.0, remaining_s=1e9)
    assert res.choice == {"kernels.mlm_loss": "triton", "kernels.ffn": "torch",
                          "kernels.add_layer_norm": "triton", "kernels.layer_norm": "triton", "attention": "flash"}
    assert res.complete and res.spent_s == 10.0 * len(fake.calls)
    by = {r["what"]: r for r in res.rows}
    assert by["baseline"]["result"] == "reference" and by["baseline"]["tokens_per_s"] == 1000.0
    assert by["all ops triton"]["result"].endswith("kept")
    assert by["flip ffn"]["result"].endswith("kept")
    assert "not more than 2% faster" in by["flip add_layer_norm"]["result"]  # a 1% gain is not taken back
    assert all("tokens_per_s" in r for r in res.rows)  # every candidate's rate is in the log
    assert len({frozenset(c.items()) for c in fake.calls}) == len(fake.calls)  # nothing measured twice


def test_search_keeps_nothing_within_the_noise():
    fake = FakeStep({"kernels.mlm_loss=triton": 1.05}, spread=0.04)  # 5% faster, repeats scatter by 4%
    baseline, moves = plan({"kernels"}, ["mlm_loss"], {"mlm_loss"}, "cpu", False, False)
    res = search(baseline, moves, fake, cap_s=1e9, prior_cost_s=1.0, remaining_s=1e9)
    assert res.choice == {"kernels.mlm_loss": "torch"} and "spread" in res.rows[1]["result"]


def test_search_failed_candidate_is_reported_not_chosen():
    def measure(cand, allowance_s):
        if cand.get("attention") == "flash":
            return Measurement(cost_s=1.0, error="--attention flash: not available")
        return timed(1000.0 * (1.5 if cand.get("attention") == "math" else 1.0))

    baseline, moves = plan({"attention"}, [], set(), "cpu", False, False)
    res = search(baseline, moves, measure, cap_s=1e9, prior_cost_s=1.0, remaining_s=1e9)
    assert res.choice == {"attention": "math"}
    assert [r["result"].split(":")[0] for r in res.rows] == ["reference", "failed", "+50.0%"]


def test_five_percent_cap_tries_fewer_candidates_in_order():
    fake = FakeStep({}, cost=10.0)
    baseline, moves = plan({"kernels", "attention"}, TINY_OPS, set(TINY_OPS), "cpu", False, False)
    planned = ["baseline"] + [m.what for m in moves]
    budget = 1000.0
    res = search(baseline, moves, fake, cap_s=0.05 * budget, prior_cost_s=10.0, remaining_s=budget)
    measured = [r["what"] for r in res.rows if "tokens_per_s" in r]
    assert measured == planned[:5] and res.spent_s == 50.0 <= 0.05 * budget  # never past the cap
    assert all(r["result"].startswith("skipped: it would pass the 5% cap") for r in res.rows[5:])
    assert not res.complete
    # a cost known in advance to exceed the cap: nothing is measured at all
    res = search(baseline, moves, FakeStep({}), cap_s=5.0, prior_cost_s=10.0, remaining_s=budget)
    assert res.spent_s == 0.0 and res.choice == baseline and not any("tokens_per_s" in r for r in res.rows)


def test_a_candidate_slower_than_predicted_is_stopped_at_the_cap():
    """Predicted 10 s, takes 100 s: the first candidate is stopped once it passes the 60 s cap (one step late,
    as a started compile cannot be interrupted), not chosen, and nothing after it runs."""
    fake = FakeStep({"attention=flash": 1.5}, cost=100.0)
    baseline, moves = plan({"attention"}, [], set(), "cpu", False, False)
    res = search(baseline, moves, fake, cap_s=60.0, prior_cost_s=10.0, remaining_s=1000.0)
    assert len(fake.calls) == 1 and res.spent_s == 61.0 and res.choice == baseline and not res.complete
    assert res.rows[0]["result"].startswith("failed: stopped")
    assert all(r["result"].startswith("skipped") for r in res.rows[1:])


def test_measure_candidate_stops_past_its_allowance():
    """The real timing on the CPU (tiny model, eager): no allowance left stops it after the warm-up, unmeasured;
    a generous one measures every repeat."""
    from fastcram.config import preset as get_preset
    from fastcram.data.tokenizer import SpecialIds
    from fastcram.train.step import synthetic_batches

    cfg = dataclasses.replace(get_preset("tiny").model, vocab_size=512, seq_len=32)
    tcfg = TrainConfig(compile=False, device="cpu", micro_batch=2, kernels="torch")
    batches = synthetic_batches(cfg, 2, "cpu", SpecialIds(*range(7)), 0.25, seed=0)
    timing = autotune.TimingPlan(warmup=1, repeats=3, steps=1)
    stopped = autotune.measure_candidate(cfg, tcfg, "cpu", batches, timing, 8, allowance_s=0.0)
    assert stopped.error.startswith("stopped after its warm-up") and stopped.tokens_per_s == []
    full = autotune.measure_candidate(cfg, tcfg, "cpu", batches, timing, 8)
    assert full.error is None and len(full.tokens_per_s) == 3 and min(full.tokens_per_s) > 0


def test_used_ops_are_found_from_the_model_not_a_list():
    """The ops a preset uses, found on the meta device, are exactly those a real forward calls."""
    import torch

    from fastcram.data.loader import mask_batch
    from fastcram.data.tokenizer import SpecialIds
    from fastcram.config import DataConfig
    from fastcram.model import CrammedBert
    from fastcram.ops import OP_MODULES, get_ops

    for name in ("tiny", "bert-classic-ffn"):
        cfg = dataclasses.replace(preset(name).model, vocab_size=301, hidden=32, heads=2, layers=2,
                                  intermediate=64)
        found = autotune.used_ops(cfg)
        called = set()
        base = get_ops("torch")
        ops = dataclasses.replace(base, **{op: (lambda op, fn: lambda *a: called.add(op) or fn(*a))(op, getattr(base, op))
                                           for op in OP_MODULES})
        ids = torch.randint(7, 301, (2, 128))
        b = mask_batch(ids, DataConfig(), SpecialIds(*range(7)), 301, torch.Generator().manual_seed(0))
        CrammedBert(cfg, ops)(b.input_ids, b.positions, b.labels)
        assert set(found) == called and len(found) == len(called)  # each op once


def _opts(tmp_path, budget_s=24 * 3600.0, **kw) -> RunOptions:
    tcfg = TrainConfig(**{"compile": False, "device": "cpu", "micro_batch": 8, "budget_s": budget_s,
                          "kernels": "auto", "attention": "auto", **kw})
    return RunOptions(train=tcfg, preset="tiny", progress=False)


FACTORS = {"kernels.mlm_loss=triton": 1.2, "attention=flash": 1.1}


def _tune(tmp_path, monkeypatch, opts, fake, model_cfg=None):
    monkeypatch.setattr(autotune, "triton_ops", lambda ops, device: {"mlm_loss"})
    cfg = model_cfg or preset("tiny").model
    return autotune.tune(cfg, opts.train, opts, "cpu", None, measure=fake, cache_root=str(tmp_path / "cache"),
                         now=lambda: 0.0)


def test_tune_sets_the_choice_and_says_how(tmp_path, monkeypatch):
    opts = _opts(tmp_path)
    opts.flags_given = ("attention",)
    fake = FakeStep(FACTORS)
    t = _tune(tmp_path, monkeypatch, opts, fake)
    assert opts.train.attention == "flash" and opts.train.per_op == {
        "mlm_loss": "triton", "ffn": "torch", "add_layer_norm": "torch", "layer_norm": "torch"}
    assert t.how["kernels"] == t.how["attention"] == "measured" and t.how["residual"] == "default"
    step = t.report["step"]
    assert step["cache"] == "miss" and step["complete"] and os.path.isfile(step["cache_file"])
    assert [r["what"] for r in step["candidates"]][:2] == ["baseline", "all ops triton"]


def test_cache_hit_key_change_and_retune(tmp_path, monkeypatch):
    fake = FakeStep(FACTORS)
    _tune(tmp_path, monkeypatch, _opts(tmp_path), fake)
    first = len(fake.calls)
    assert first > 0

    # the same machine, model and switches: the cached choice, nothing measured
    opts = _opts(tmp_path)
    t = _tune(tmp_path, monkeypatch, opts, fake)
    assert len(fake.calls) == first and t.report["step"]["cache"] == "hit"
    assert t.how["kernels"] == t.how["attention"] == "cache" and opts.train.attention == "flash"
    assert opts.train.per_op["mlm_loss"] == "triton"

    # any part of the key changes: measured again
    for change in ({"micro_batch": 16}, {"residual_dtype": "bf16", "autocast": "bf16"}, {"norm_kernels": "torch"}):
        n = len(fake.calls)
        t = _tune(tmp_path, monkeypatch, _opts(tmp_path, **change), fake)
        assert len(fake.calls) > n and t.report["step"]["cache"] == "miss", change
    n = len(fake.calls)
    t = _tune(tmp_path, monkeypatch, _opts(tmp_path), fake, model_cfg=dataclasses.replace(preset("tiny").model,
                                                                                          vocab_size=1000))
    assert len(fake.calls) > n, "vocabulary"
    n = len(fake.calls)
    monkeypatch.setattr(tune_cache, "ops_source_hash", lambda ops_dir=None: "a kernel changed")
    _tune(tmp_path, monkeypatch, _opts(tmp_path), fake)
    assert len(fake.calls) > n, "ops source"

    # --retune ignores a cached result
    n = len(fake.calls)
    opts = _opts(tmp_path, retune=True)
    t = _tune(tmp_path, monkeypatch, opts, fake)
    assert len(fake.calls) > n and t.report["step"]["cache"] == "retune"


def test_a_cached_tuning_is_replayed_at_each_runs_budget(tmp_path, monkeypatch):
    """flash is 10% faster but costs 500 s of compiling: a day's budget keeps it, an hour's does not. The hour
    replays the day's cached measurements (nothing timed again) and chooses for its own budget."""
    fake = FakeStep({"attention=flash": 1.1}, compile_s={"attention=flash": 500.0})
    day = _opts(tmp_path)
    _tune(tmp_path, monkeypatch, day, fake)
    assert day.train.attention == "flash"
    n = len(fake.calls)
    hour = _opts(tmp_path, budget_s=3600.0)
    t = _tune(tmp_path, monkeypatch, hour, fake)
    assert len(fake.calls) == n and t.report["step"]["cache"] == "hit" and t.how["attention"] == "cache"
    assert hour.train.attention == "default"


def test_a_candidate_the_cache_lacks_is_measured(tmp_path, monkeypatch):
    fake = FakeStep({"attention=flash": 1.1})
    _tune(tmp_path, monkeypatch, _opts(tmp_path), fake)
    path = [os.path.join(tmp_path / "cache" / "autotune", f) for f in os.listdir(tmp_path / "cache" / "autotune")
            if f != "costs.json"]
    assert len(path) == 1
    with open(path[0]) as f:
        saved = json.load(f)
    lost = [r for r in saved["candidates"] if r["settings"].get("attention") == "math"]
    saved["candidates"] = [r for r in saved["candidates"] if r not in lost]
    with open(path[0], "w") as f:
        json.dump(saved, f)
    n = len(fake.calls)
    t = _tune(tmp_path, monkeypatch, _opts(tmp_path), fake)
    assert [c.get("attention") for c in fake.calls[n:]] == ["math"] and t.report["step"]["cache"] == "partial"
    assert t.how["attention"] == "measured"
    with open(path[0]) as f:  # the merged measurements are cached again
        assert len(json.load(f)["candidates"]) == len(saved["candidates"]) + 1


def test_a_switch_with_nothing_to_try_is_not_called_measured(tmp_path, monkeypatch):
    """No Triton op on this device: kernels keeps its baseline and says so; attention is measured."""
    monkeypatch.setattr(autotune, "triton_ops", lambda ops, device: set())
    opts = _opts(tmp_path)
    t = autotune.tune(preset("tiny").model, opts.train, opts, "cpu", None, measure=FakeStep(FACTORS),
                      cache_root=str(tmp_path / "cache"), now=lambda: 0.0)
    assert t.how["kernels"] == "baseline: no alternative to measure here" and t.how["attention"] == "measured"


def test_key_includes_the_ops_source(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    h1 = tune_cache.ops_source_hash(str(tmp_path))
    (tmp_path / "a.py").write_text("x = 2\n")
    assert tune_cache.ops_source_hash(str(tmp_path)) != h1
    assert tune_cache.ops_source_hash() == tune_cache.ops_source_hash()


def test_partial_tuning_is_not_cached_and_costs_are_remembered(tmp_path, monkeypatch):
    fake = FakeStep(FACTORS, cost=30.0)
    opts = _opts(tmp_path, budget_s=1200.0)  # 5%: 60 s, two candidates of 30 s (10 s assumed for the first)
    t = _tune(tmp_path, monkeypatch, opts, fake)
    assert len(fake.calls) == 2 and not t.report["step"]["complete"] and t.report["step"]["cache_file"] is None
    # the next short run knows a candidate costs 30 s: 5% of 500 s (25 s) affords none
    opts = _opts(tmp_path, budget_s=500.0)
    t = _tune(tmp_path, monkeypatch, opts, fake)
    assert len(fake.calls) == 2 and t.report["step"]["predicted_cost_s"] == 30.0
    assert t.how["attention"].startswith("baseline: nothing measured") and opts.train.attention == "default"
