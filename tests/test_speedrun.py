"""`fastcram bench speedrun`: every run stops at the first held-out evaluation at or under the target, and the
report gives what the runs measured (checked against reference runs of the same seeds, under a fake clock)."""
import functools
import json
import os
import statistics

import pytest

import fastcram.benchmarks.speedrun as speedrun
import fastcram.train.loop as loop_mod
from fastcram.cli import main
from fastcram.files import sha256_file

from .helpers import FakeClock

TRAIN_FLAGS = ["--device", "cpu", "--micro-batch", "8", "--final-batch", "16", "--log-interval", "1000", "--quiet"]


@pytest.fixture
def fake_clock_train(monkeypatch):
    """Every `fastcram train` run in this process gets a fresh fake clock (one tick a read)."""
    real = loop_mod.train
    monkeypatch.setattr(loop_mod, "train", lambda opts: real(opts, now=FakeClock(tick=1.0)))
    monkeypatch.setattr(speedrun, "subprocess_runner", main)  # runs in this process, under that clock


def _evals(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("eval_loss") is not None]


def test_speedrun_stops_at_the_target_and_reports_what_it_measured(heldout_data, tmp_path, fake_clock_train,
                                                                   capsys):
    refs = {}
    for seed in (0, 1):  # the same runs without a target: their held-out curves
        out = str(tmp_path / f"ref-{seed}")
        assert main(["train", "--preset", "tiny", "--minutes", "0.7", "--seed", str(seed), "--eval-every", "5",
                     "--data", heldout_data, "--out", out, *TRAIN_FLAGS]) == 0
        refs[seed] = _evals(out)
    assert all(len(c) >= 3 for c in refs.values())
    target = max(refs[0][1]["eval_loss"], refs[1][1]["eval_loss"])  # both reach it, by their second evaluation
    report_path = tmp_path / "report.json"
    rc = main(["bench", "speedrun", "--target-loss", repr(target), "--preset", "tiny", "--data", heldout_data,
               "--runs", "2", "--max-minutes", "0.7", "--eval-every", "5", "--out", str(tmp_path / "sr"),
               "--json", str(report_path), "--plain", "--", *TRAIN_FLAGS])
    out = capsys.readouterr().out
    assert rc == 0
    rep = json.loads(report_path.read_text())
    assert rep["runs"] == rep["reached"] == 2 and rep["target_loss"] == target
    for run, seed in zip(rep["per_run"], (0, 1)):
        curve = refs[seed]
        k = next(i for i, r in enumerate(curve) if r["eval_loss"] <= target)  # the first at or under it
        assert run["seed"] == seed and run["reached"] and run["eval_loss"] == curve[k]["eval_loss"]
        assert run["time_s"] == pytest.approx(curve[k]["eval_at_s"], abs=1e-3)
        assert run["previous_eval_s"] == (curve[k - 1]["eval_at_s"] if k else 0.0)
        assert run["steps"] == curve[k]["step"]
        with open(os.path.join(run["run_dir"], "summary.json")) as f:
            summary = json.load(f)
        assert summary["steps"] == run["steps"] and run["tokens"] == summary["sequences"] * 128  # stopped there
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["time_s"])
        assert [r["eval_loss"] for r in _evals(run["run_dir"])] == [r["eval_loss"] for r in curve[:k + 1]]
    times = [r["time_s"] for r in rep["per_run"]]
    assert rep["time_to_target_s"] == pytest.approx({"mean": statistics.fmean(times), "std": statistics.stdev(times),
                                                     "min": min(times), "max": max(times), "n": 2})
    assert rep["steps_to_target"]["mean"] == statistics.fmean(r["steps"] for r in rep["per_run"])
    data = rep["data"]
    assert data["manifest_sha256"] == sha256_file(os.path.join(heldout_data, "manifest.json"))
    with open(os.path.join(heldout_data, "manifest.json")) as f:
        manifest = json.load(f)
    assert data["tokenizer_hash"] == manifest["tokenizer_hash"] and data["holdout"]["blocks"] > 0
    assert data["tokenizer_sha256"] == sha256_file(os.path.join(heldout_data, "tokenizer.json"))
    assert set(rep["switches"]["kernels"].values()) == {"torch"} and rep["environment"]["torch"]
    assert rep["command"].startswith("fastcram bench speedrun --target-loss")
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "mean" in rows and "std" in rows and "min-max" in rows and f"{min(times):.1f}-{max(times):.1f}" in out


def test_a_target_not_reached_is_reported_and_fails(heldout_data, tmp_path, fake_clock_train, capsys):
    rc = main(["bench", "speedrun", "--target-loss", "0.01", "--data", heldout_data, "--runs", "1",
               "--max-minutes", "0.3", "--eval-every", "5", "--out", str(tmp_path / "sr"),
               "--json", str(tmp_path / "r.json"), "--plain", "--", *TRAIN_FLAGS])
    assert rc == 1 and "did not reach" in capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["reached"] == 0 and rep["time_to_target_s"] is None and not rep["per_run"][0]["reached"]
    assert rep["per_run"][0]["budget_spent_s"] >= 18.0 and rep["per_run"][0]["eval_loss"] > 0.01


def test_data_without_a_held_out_split_is_refused(heldout_data, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(heldout_data, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["holdout"]
    (old / "manifest.json").write_text(json.dumps(m))
    rc = main(["bench", "speedrun", "--target-loss", "5", "--data", str(old), "--out", str(tmp_path / "sr")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "--data" in err[0] and "no held-out split" in err[0]
    assert not os.path.exists(tmp_path / "sr")
    rc = main(["bench", "speedrun", "--target-loss", "5", "--eval-every", "often", "--out", str(tmp_path / "sr")])
    assert rc == 2 and "--eval-every" in capsys.readouterr().err


def test_outputs_are_checked_before_any_run(heldout_data, tmp_path, capsys):
    taken = tmp_path / "sr" / "seed-0"
    taken.mkdir(parents=True)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for argv, needle in ((["--out", str(tmp_path / "sr")], "already holds seed-0"),
                         (["--out", str(tmp_path / "new"), "--json", str(blocker / "r.json")], "--json")):
        rc = main(["bench", "speedrun", "--target-loss", "5", "--data", heldout_data, *argv])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "sr") == ["seed-0"]  # no run started


@pytest.mark.parametrize("argv,needle", [
    (["--json", "{tmp}"], "is a folder; give a file name"),
    (["--", "--minutes", "1"], "--minutes after `--`: the speedrun sets it"),
    (["--", "--seed=3"], "--seed after `--`"),
])
def test_bad_speedrun_flags_stop_before_any_run(heldout_data, tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["bench", "speedrun", "--target-loss", "5", "--data", heldout_data, "--out", str(tmp_path / "sr"),
               *argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "sr").exists()


def test_bad_data_leaves_no_results_folder_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "speedrun", "--target-loss", "5", "--data", str(tmp_path / "nowhere")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
