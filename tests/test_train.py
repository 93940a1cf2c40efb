import json
import os

import pytest
import torch

from fastcram.train import checkpoint as ckpt
from fastcram.config import TrainConfig, preset
from fastcram.data.loader import BlockDataset
from fastcram.config import RunOptions
from fastcram.train.checkpoint import restore_state
from fastcram.train.loop import train
from fastcram.train.step import build_model, make_optimizer

from .helpers import FakeClock


def _opts(small_data, out, **train_kw) -> RunOptions:
    tcfg = TrainConfig(**{**preset("tiny").train_overrides, "compile": False, "device": "cpu",
                          "micro_batch": 8, "final_batch": 16, "log_interval_s": 0.0, **train_kw})
    return RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(out), progress=False)


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_budget_stop_under_fake_clock(small_data, tmp_path):
    clock = FakeClock(tick=1.0)
    summary = train(_opts(small_data, tmp_path / "run", budget_s=40.0), now=clock)
    assert summary["budget_spent_s"] >= 40.0
    recs = [r for r in _log(summary["run_dir"]) if "loss" in r]
    # the loop checks the clock once per optimizer step: it overshoots by about one step's duration (this
    # clock also ticks on the reads that write the record itself)
    one_step = recs[-1]["budget_spent_s"] - recs[-2]["budget_spent_s"]  # log_interval 0: a record per step
    assert 0 <= recs[-1]["budget_spent_s"] - 40.0 < 2 * one_step
    assert summary["steps"] == recs[-1]["step"] > 3
    assert os.path.isfile(summary["final_checkpoint"])
    assert recs[0]["lr"] < recs[len(recs) * 3 // 4]["lr"]  # lr ramps up with budget progress
    assert recs[-1]["batch_size"] == 16 and recs[0]["batch_size"] == 8  # batch ramp in micro-batch multiples
    summ = json.load(open(os.path.join(summary["run_dir"], "summary.json")))
    assert summ["steps"] == summary["steps"]


def test_a_few_tiny_steps_lower_the_loss(small_data, tmp_path):
    torch.manual_seed(0)
    summary = train(_opts(small_data, tmp_path / "run", budget_s=1e6, max_steps=30, final_batch=8,
                          lr=3e-3), now=FakeClock(tick=0.0))
    losses = [r["loss"] for r in _log(summary["run_dir"]) if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_checkpoint_save_resume_identical(small_data, tmp_path):
    run = tmp_path / "run"
    first = train(_opts(small_data, run, budget_s=1e6, max_steps=4), now=FakeClock(tick=0.5))
    saved = ckpt.load_checkpoint(first["final_checkpoint"])
    # restore into a fresh model + optimizer: every tensor equal
    data = BlockDataset(small_data)
    mcfg = preset("tiny").model
    mcfg.vocab_size = data.vocab_size
    tcfg = TrainConfig(compile=False)
    model = build_model(mcfg, tcfg, "cpu")
    opt = make_optimizer(model, tcfg, "cpu")
    gen = torch.Generator()
    state = restore_state(saved, model, opt, gen)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k
    o1, o2 = opt.state_dict(), saved["optimizer"]
    for pid, st in o2["state"].items():
        for k, v in st.items():
            assert torch.equal(o1["state"][pid][k], v), (pid, k)
    assert torch.equal(gen.get_state(), saved["rng"]["mask"])
    assert (state.step, state.position.cursor) == (4, saved["position"]["cursor"]) and state.position.cursor > 0

    # resume through train(): the budget continues from what was spent, data from the saved position
    opts = _opts(small_data, None, budget_s=1e6, max_steps=6)
    opts.resume = str(run)
    second = train(opts, now=FakeClock(tick=0.5))
    recs = _log(str(run))
    resume = next(r for r in recs if r.get("event") == "resume")
    assert resume["budget_spent_s"] == pytest.approx(saved["elapsed_s"], abs=1e-3)
    after = [r for r in recs if "loss" in r and r["step"] > 4]
    assert [r["step"] for r in after] == [5, 6] and second["steps"] == 6
    assert after[0]["sequences"] == saved["sequences"] + after[0]["batch_size"]
    assert after[0]["budget_spent_s"] > saved["elapsed_s"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoints" / "step-00000001.pt")
    ckpt.save(path, {"x": torch.ones(3)})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save(path, {"x": torch.zeros(3)})
    assert torch.equal(ckpt.load_checkpoint(path)["x"], torch.ones(3))  # the previous file is intact
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000001.pt", "step-00000001.pt.sha256.json"]
