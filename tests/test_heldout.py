"""The held-out split (data prepare), the held-out MLM loss during training (off the budget clock), the target
loss stop and the data-passes advice."""
import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch

import fastcram.data.prepare as prep
import fastcram.train.loop as loop_mod
from fastcram.cli import main
from fastcram.config import DataConfig, ModelConfig, RunOptions, TrainConfig, from_dict, preset
from fastcram.data.builtin import builtin_data, builtin_folder
from fastcram.data.loader import BlockDataset, BlockLoader
from fastcram.data.prepare import PrepareOptions, prepare
from fastcram.data.tokenizer import load_tokenizer
from fastcram.errors import UserError
from fastcram.train import checkpoint as ckpt
from fastcram.train.advice import MAX_PASSES, data_passes_advice, expected_passes
from fastcram.train.evaluate import EvalSchedule, HeldOutEval, eval_schedule
from fastcram.train.loop import train
from fastcram.train.schedule import BudgetClock
from fastcram.train.step import build_model, make_step

from .helpers import FakeClock, held_out_indices, write_small_corpus



def random_docs(rng: np.random.Generator, n_docs: int) -> list[str]:
    """Documents of random made-up words: any 12 consecutive tokens of one occur in no other."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(2000)]
    return [" ".join(rng.choice(words, rng.integers(150, 400))) + "." for _ in range(n_docs)]


def windows(rows: np.ndarray, n: int, sep: int) -> set:
    """Every n consecutive tokens of each row that hold no <sep> (so lie inside one document), as bytes."""
    out = set()
    for row in rows:
        w = np.lib.stride_tricks.sliding_window_view(row, n)
        out.update(x.tobytes() for x in w[~(w == sep).any(axis=1)])
    return out


def _opts(data, out, **train_kw) -> RunOptions:
    tcfg = TrainConfig(**{**preset("tiny").train_overrides, "compile": False, "device": "cpu", "micro_batch": 8,
                          "final_batch": 16, "log_interval_s": 0.0, **train_kw})
    return RunOptions(train=tcfg, preset="tiny", data_dir=data, out_dir=str(out), progress=False)


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- the split

def test_held_out_documents_never_appear_in_a_training_batch(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")  # fresh documents each run; the seed says which
    docs = random_docs(np.random.default_rng(seed), 120)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = str(tmp_path / "out")
    assert main(["data", "prepare", "--input", str(src), "--out", out, "--vocab-size", "700", "--holdout-docs", "0.2",
                 "--compression-threshold", "0.9", "--shard-blocks", "64", "--quiet"]) == 0
    ds = BlockDataset(out)
    m = ds.manifest
    held = held_out_indices(len(docs), rate=0.2, max_docs=None)  # the rule, computed independently
    assert m["format"] == prep.FORMAT_VERSION
    assert m["holdout"]["selected_docs"] == m["holdout"]["docs"] == len(held) > 5, (seed, m["holdout"])
    assert m["holdout"]["rate"] == 0.2 and m["holdout"]["max_docs"] is None and ds.holdout is not None
    tok, sep = ds.tokenizer, ds.special.sep
    enc = [np.array(e.ids, dtype=np.uint16) for e in tok.encode_batch(docs, add_special_tokens=False)]
    held_ids = np.concatenate([np.append(enc[i], sep) for i in held])
    train_ids = np.concatenate([np.append(e, sep) for i, e in enumerate(enc) if i not in set(held)])
    assert np.array_equal(ds.holdout.read().reshape(-1), held_ids[:len(ds.holdout) * 128])  # whole blocks
    n = len(ds.holdout)
    spread = held_ids[:n * 128].reshape(n, 128)[[0, round((n - 1) / 2), n - 1]]  # both round halves to even
    assert np.array_equal(ds.holdout.read(3), spread)  # evenly spread: first, middle, last
    assert len(ds) == len(train_ids) // 128 and m["total_blocks"] == len(ds)
    held_windows = windows([enc[i] for i in held], 12, sep)
    assert held_windows, seed
    loader = BlockLoader(ds, 8, seed=seed % 1000)  # one epoch of training batches, as train reads them
    try:
        batches = np.concatenate([loader.next()[0].numpy().astype(np.uint16) for _ in range(len(ds) // 8)])
    finally:
        loader.close()
    seen = windows(batches, 12, sep)
    assert not (held_windows & seen), f"held-out text in a training batch (documents from seed {seed})"
    trained_doc = next(i for i in range(len(docs)) if i not in set(held))
    assert windows([enc[trained_doc]], 12, sep) & seen  # the check does find a document that is trained on


def test_held_out_count_zero_and_cli_values(tmp_path, capsys):
    src = write_small_corpus(str(tmp_path / "c.txt"), 120_000)
    base = ["data", "prepare", "--input", src, "--vocab-size", "400", "--compression-threshold", "0.9", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "all"), "--holdout-docs", "0"]) == 0
    assert main(base + ["--out", str(tmp_path / "all-held"), "--holdout-docs", "0.99"]) == 2
    assert "held out" in capsys.readouterr().err and not os.path.exists(tmp_path / "all-held")
    assert main(base + ["--out", str(tmp_path / "two"), "--holdout-docs", "0.6"]) == 0
    every = json.load(open(tmp_path / "all" / "manifest.json"))
    assert every["holdout"]["docs"] == 0 and every["holdout"]["shards"] == [] and every["holdout"]["blocks"] == 0
    assert not os.path.exists(tmp_path / "all" / prep.HOLDOUT_FILE)
    ds = BlockDataset(str(tmp_path / "all"))
    assert ds.holdout is None and "empty" in ds.no_holdout_reason
    n = every["filter"]["kept_docs"] + every["filter"]["dropped_docs"]
    most = json.load(open(tmp_path / "two" / "manifest.json"))["holdout"]
    assert most["selected_docs"] == len(held_out_indices(n, 0.6, None)) > n // 3
    # a count: the first N documents the default rate draws
    prepare([src], str(tmp_path / "count"), DataConfig(vocab_size=400, compression_threshold=0.9), progress=False,
            options=PrepareOptions(holdout_rate=0.3, holdout_max_docs=4))
    assert json.load(open(tmp_path / "count" / "manifest.json"))["holdout"]["selected_docs"] == 4
    # a count larger than the 1% draw gives: it is a cap, and the command says so
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "many"), "--holdout-docs", "500"]) == 0
    held = json.load(open(tmp_path / "many" / "manifest.json"))["holdout"]["selected_docs"]
    assert held < 500 and f"--holdout-docs 500 is a cap" in capsys.readouterr().err
    for bad in ("-1", "2.5", "many"):
        with pytest.raises(SystemExit) as e:
            main(base + ["--out", str(tmp_path / "x"), "--holdout-docs", bad])
        assert e.value.code == 2 and "--holdout-docs" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("nth", [2, 5])
def test_interrupted_prepare_resumes_the_held_out_file_byte_identically(tmp_path, monkeypatch, nth):
    src = write_small_corpus(str(tmp_path / "c.txt"), 150_000)
    cfg = DataConfig(vocab_size=400, compression_threshold=0.9, shard_blocks=16, doc_chars=1500)
    opts = dict(holdout_rate=0.3, holdout_max_docs=None, chunk_chars=8_000, workers=1)
    ref = prepare([src], str(tmp_path / "ref"), cfg, progress=False, options=PrepareOptions(**opts))
    seen = []

    def interrupt(state):  # at the nth journal entry that records a held-out file with content
        if state["phase"] == "stream" and state["stream"]["resume"]["holdout_tokens"] > 0:
            seen.append(state["stream"]["resume"]["holdout_tokens"])
            if len(seen) == nth:
                raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_after_journal", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], str(tmp_path / "cut"), cfg, progress=False, options=PrepareOptions(**opts))
    assert len(seen) == nth
    recorded = seen[-1] * 2
    assert os.path.getsize(tmp_path / "cut" / prep.HOLDOUT_FILE) >= recorded  # maybe more: undone on resume
    monkeypatch.setattr(prep, "_after_journal", lambda state: None)
    again = prepare([src], str(tmp_path / "cut"), cfg, progress=False, options=PrepareOptions(**opts))
    names = [s["file"] for s in ref["shards"] + ref["holdout"]["shards"]]
    assert prep.HOLDOUT_FILE in names
    for name in names:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert again["holdout"] == ref["holdout"]


def test_an_old_manifest_without_a_held_out_split_still_trains(heldout_data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(heldout_data, old)
    m = json.load(open(old / "manifest.json"))
    del m["holdout"]
    m["format"] = 2
    (old / "manifest.json").write_text(json.dumps(m))
    os.remove(old / prep.HOLDOUT_FILE)
    ds = BlockDataset(str(old))
    assert ds.holdout is None and "no held-out split" in ds.no_holdout_reason and "format 2" in ds.no_holdout_reason
    summary = train(_opts(str(old), tmp_path / "run", budget_s=1e6, max_steps=4), now=FakeClock(tick=1.0))
    assert summary["steps"] == 4 and summary["final_eval_loss"] is None
    assert "no held-out split" in summary["eval"]["none"]
    log = _log(summary["run_dir"])
    assert [r["reason"] for r in log if r.get("event") == "no_holdout"] == [ds.no_holdout_reason]
    assert not any("eval_loss" in r for r in log)
    with pytest.raises(UserError, match="--target-loss: .*no held-out split"):
        train(_opts(str(old), tmp_path / "run2", budget_s=1e6, max_steps=4, target_loss=5.0), now=FakeClock())


def test_the_builtin_cache_key_carries_the_data_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTCRAM_CACHE", str(tmp_path))
    assert builtin_folder(512) == str(tmp_path / f"pd_lit-v512-f{prep.FORMAT_VERSION}")
    assert builtin_folder(512, version=2) != builtin_folder(512) != builtin_folder(1024)
    old = tmp_path / "pd_lit-v512"  # the key before formats were part of it: a copy without a held-out split
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": 2, "seq_len": 128, "shards": []}))
    path = builtin_data(512, DataConfig(compression_threshold=0.6), progress=True)
    assert path == builtin_folder(512) and "pd_lit-v512 is another data format" in capsys.readouterr().err
    ds = BlockDataset(path)
    assert ds.manifest["format"] == prep.FORMAT_VERSION and ds.holdout is not None and len(ds.holdout) > 50
    assert json.loads((old / "manifest.json").read_text())["format"] == 2  # the old copy is left alone
    assert builtin_data(512, progress=False) == path  # prepared once, then reused


# ---------------------------------------------------------------- evaluation during training

def test_budget_clock_stands_still_while_excluded():
    clock = FakeClock(tick=1.0)
    budget = BudgetClock(100.0, spent_s=5.0, now=clock)
    before = budget.elapsed()
    with budget.excluded() as ex:
        clock.t += 1000.0
        assert budget.elapsed() == before + 1  # the read that paused it
    assert ex.seconds == 1001.0 and budget.excluded_s == ex.seconds
    assert budget.elapsed() == before + 2 and not budget.done()


def test_eval_schedules():
    fixed = EvalSchedule(every_s=10.0)
    assert [fixed.after(t) for t in (0.0, 9.99, 10.0, 25.0)] == [10.0, 10.0, 20.0, 30.0]
    grow = EvalSchedule(growth=0.02, min_gap_s=1.0)
    assert grow.after(10.0) == 11.0 and grow.after(100.0) == pytest.approx(102.0)
    assert eval_schedule(TrainConfig(budget_s=180.0)).every_s == 10.0  # 2% of 3 min is under 10 s
    assert eval_schedule(TrainConfig(budget_s=86400.0)).every_s == pytest.approx(1728.0)
    assert eval_schedule(TrainConfig(budget_s=5.0)).every_s == 5.0
    assert eval_schedule(TrainConfig(eval_every_s=0.0)) is None
    assert eval_schedule(TrainConfig(budget_s=600.0, eval_growth=0.02)).min_gap_s == 3.0


def test_eval_time_is_not_charged_to_the_budget(heldout_data, tmp_path, monkeypatch):
    clock = FakeClock(tick=0.25)  # a step reads the clock about 40 times: 10 s a step
    real = HeldOutEval.__call__
    calls = []

    def slow(self, model, context):  # each evaluation takes 1000 s of the fake clock
        calls.append(1)
        clock.t += 1000.0
        return real(self, model, context)

    monkeypatch.setattr(HeldOutEval, "__call__", slow)
    start = clock.t
    summary = train(_opts(heldout_data, tmp_path / "run", budget_s=40.0, eval_every_s=5.0), now=clock)
    n = summary["eval"]["evaluations"]
    assert n == len(calls) >= 6
    recs = [r for r in _log(summary["run_dir"]) if "loss" in r]
    one_step = max(b["budget_spent_s"] - a["budget_spent_s"] for a, b in zip(recs, recs[1:]))
    assert one_step < 10 and 40.0 <= summary["budget_spent_s"] < 40.0 + 2 * one_step  # as without evaluation
    assert summary["eval"]["eval_s"] >= 1000 * n and summary["eval"]["excluded_from_budget_s"] >= 1000 * n
    assert clock.t - start > 1000 * n + 40  # the wall clock did pass
    evals = [r for r in recs if "eval_loss" in r]
    assert len(evals) == n and all(r["eval_s"] >= 1000 for r in evals)
    assert all(r["tokens_per_s"] > 10 for r in recs)  # an interval's rate counts training time only
    # due every 5 s of budget: at the first step at or after each multiple, and at the end
    due = [r["eval_at_s"] for r in evals]
    assert all(b - a < 5 + 2 * one_step for a, b in zip(due, due[1:])) and due[-1] >= 40.0
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]


def test_two_evaluations_of_one_checkpoint_are_equal_bitwise(heldout_data, tmp_path):
    summary = train(_opts(heldout_data, tmp_path / "run", budget_s=30.0, eval_every_s=10.0), now=FakeClock(1.0))
    saved = ckpt.load_checkpoint(summary["final_checkpoint"])
    config = saved["config"]
    data = BlockDataset(heldout_data)
    tcfg = from_dict(TrainConfig, config["train"])
    model = build_model(from_dict(ModelConfig, config["model"]), tcfg, "cpu")
    model.load_state_dict(saved["model"])
    step = make_step(model, tcfg, "cpu")

    def evaluator(seed=0):
        return HeldOutEval(data.holdout, DataConfig(), data.special, data.vocab_size, tcfg.micro_batch, "cpu",
                           tcfg.eval_blocks, seed)

    a, b = evaluator(), evaluator()
    first, second, other = a(model, step.context), a(model, step.context), b(model, step.context)
    assert first == second == other == summary["final_eval_loss"]  # bitwise: the run's own last evaluation too
    assert a.blocks == min(len(data.holdout), tcfg.eval_blocks) and a.predictions == a.blocks * 32
    assert model.training  # evaluation puts the model back in training mode
    assert evaluator(seed=1)(model, step.context) != first  # another mask is another number
    torch.manual_seed(123)
    fresh = build_model(from_dict(ModelConfig, config["model"]), tcfg, "cpu")
    assert a(fresh, step.context) > first  # the trained weights are what is measured


def test_progress_line_and_log_show_the_held_out_loss(heldout_data, tmp_path, capsys):
    opts = _opts(heldout_data, tmp_path / "run", budget_s=20.0, eval_every_s=5.0, log_interval_s=100.0)
    opts.progress = True
    summary = train(opts, now=FakeClock(1.0))
    err = capsys.readouterr().err
    recs = [r for r in _log(summary["run_dir"]) if "loss" in r]
    assert all("eval_loss" in r for r in recs)  # log interval 100 s: every record is an evaluation's
    lines = [ln for ln in err.splitlines() if "budget]" in ln]
    assert len(lines) == len(recs) and all(f"held-out {r['eval_loss']:.4f}" in ln for ln, r in zip(lines, recs))
    assert f"held-out loss {summary['final_eval_loss']:.4f}" in err
    setup = next(r for r in _log(summary["run_dir"]) if r.get("event") == "eval_setup")
    assert setup["blocks"] == summary["eval"]["blocks"] > 0 and setup["every_s"] == 5.0


def test_target_loss_stops_at_the_first_evaluation_under_it(heldout_data, tmp_path):
    ref = train(_opts(heldout_data, tmp_path / "ref", budget_s=60.0, eval_every_s=5.0, lr=3e-3), now=FakeClock(1.0))
    curve = [r for r in _log(ref["run_dir"]) if "eval_loss" in r]
    assert curve[0]["eval_loss"] > curve[-1]["eval_loss"]
    k = next(i for i, r in enumerate(curve) if i >= 2 and r["eval_loss"] < min(x["eval_loss"] for x in curve[:i]))
    target = curve[k]["eval_loss"]  # the first new low after the second evaluation
    run = train(_opts(heldout_data, tmp_path / "run", budget_s=60.0, eval_every_s=5.0, lr=3e-3, target_loss=target),
                now=FakeClock(1.0))
    hit = run["target"]
    assert hit["eval_loss"] == target and hit["step"] == curve[k]["step"] == run["steps"]  # no step after it
    assert hit["budget_s"] == pytest.approx(curve[k]["eval_at_s"], abs=1e-3) and hit["budget_s"] < 60.0
    assert hit["tokens"] == hit["sequences"] * 128 == run["tokens"]
    evals = [r for r in _log(run["run_dir"]) if "eval_loss" in r]
    assert [r["eval_loss"] for r in evals] == [r["eval_loss"] for r in curve[:k + 1]]
    assert all(r["eval_loss"] > target for r in evals[:-1]) and run["final_eval_loss"] == target
    unreachable = train(_opts(heldout_data, tmp_path / "never", budget_s=20.0, eval_every_s=5.0, target_loss=0.01),
                        now=FakeClock(1.0))
    assert unreachable["target"] is None and unreachable["budget_spent_s"] >= 20.0


def test_eval_every_zero_turns_evaluation_off(heldout_data, tmp_path):
    summary = train(_opts(heldout_data, tmp_path / "run", budget_s=1e6, max_steps=3, eval_every_s=0.0),
                    now=FakeClock(1.0))
    assert summary["eval"] == {"evaluations": 0, "eval_s": 0.0, "excluded_from_budget_s": 0.0, "none": "off"}
    with pytest.raises(UserError, match="--target-loss needs"):
        train(_opts(heldout_data, tmp_path / "r2", budget_s=1e6, eval_every_s=0.0, target_loss=4.0))


# ---------------------------------------------------------------- passes over the data

def test_data_passes_arithmetic():
    assert expected_passes(1000.0, 3600.0, 400_000, 2_000_000) == pytest.approx(2.0)
    passes, msg = data_passes_advice(1000.0, 3600.0, 400_000, 2_000_000, "d", builtin=True)
    assert passes == pytest.approx(2.0) and msg is None
    passes, msg = data_passes_advice(800_000.0, 86400.0, 0, 2_000_000, "d", builtin=True)
    assert passes == pytest.approx(34560.0) and passes > MAX_PASSES
    assert "built-in demo corpus" in msg and "fastcram data prepare --out" in msg and "--data" in msg


def test_train_says_once_when_it_will_pass_over_the_data_many_times(heldout_data, tmp_path, capsys):
    data_tokens = len(BlockDataset(heldout_data)) * 128
    many = train(_opts(heldout_data, tmp_path / "many", budget_s=1e5, max_steps=6, eval_every_s=0.0),
                 now=FakeClock(1.0))
    err = capsys.readouterr().err  # said with progress off too
    advice = [r for r in _log(many["run_dir"]) if r.get("event") == "advice"]
    assert len(advice) == 1 and err.count("will pass over") == 1 and advice[0]["message"] in err
    second = [r for r in _log(many["run_dir"]) if "loss" in r][1]
    rate = second["tokens_per_s"]
    assert advice[0]["passes"] == pytest.approx(
        (second["sequences"] * 128 + rate * (1e5 - second["budget_spent_s"])) / data_tokens, rel=0.05)
    few = train(_opts(heldout_data, tmp_path / "few", budget_s=12.0, eval_every_s=0.0), now=FakeClock(1.0))
    assert not [r for r in _log(few["run_dir"]) if r.get("event") == "advice"]
    assert "will pass over" not in capsys.readouterr().err


def test_evaluation_never_runs_through_the_compiled_step(heldout_data, tmp_path, monkeypatch):
    """The step's compiled callable sees only training micro-steps, in train mode and with grad; evaluations
    call the plain module in eval mode without grad, only when a log record is written."""
    import fastcram.train.step as step_module

    calls = []

    def spy_compile(model, **kwargs):  # stands in for torch.compile: records how the "compiled" model is called
        def compiled(*args):
            calls.append(("step", model.training, torch.is_grad_enabled()))
            return model(*args)
        return compiled

    real = HeldOutEval.__call__

    def spy_eval(self, model, context):
        calls.append(("eval", None, None))
        return real(self, model, context)

    monkeypatch.setattr(step_module.torch, "compile", spy_compile)
    monkeypatch.setattr(HeldOutEval, "__call__", spy_eval)
    summary = train(_opts(heldout_data, tmp_path / "run", budget_s=30.0, eval_every_s=4.0, compile=True,
                          log_interval_s=1000.0), now=FakeClock(1.0))
    steps = [c for c in calls if c[0] == "step"]
    assert len(steps) == summary["micro_steps"] and set(steps) == {("step", True, True)}
    assert len(calls) - len(steps) == summary["eval"]["evaluations"] >= 3
    recs = [r for r in _log(summary["run_dir"]) if "loss" in r]
    assert len(recs) == summary["eval"]["evaluations"]  # log interval 1000 s: every record is an evaluation's


@pytest.mark.gpu
def test_gpu_evaluation_leaves_the_compiled_step_and_its_graphs_alone(heldout_data, tmp_path):
    """Compiled on the GPU with --sync-debug (a host sync inside a step is an error): evaluating after every
    step neither recompiles the training step nor breaks it."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = {}
    for name, every in (("off", 0.0), ("on", 1e-3)):
        torch._dynamo.reset()
        counters.clear()
        summary = train(_opts(heldout_data, tmp_path / name, budget_s=1e6, max_steps=6, compile=True, device="cuda",
                              sync_debug=True, eval_every_s=every, log_interval_s=1000.0))
        graphs[name] = counters["stats"].get("unique_graphs", 0)
        if name == "on":
            assert summary["eval"]["evaluations"] >= 5 and summary["final_eval_loss"] > 0
    assert graphs["off"] > 0 and graphs["on"] == graphs["off"]
