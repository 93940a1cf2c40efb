"""Faults survived on purpose: SIGKILL at random moments, SIGTERM, a full disk, NaNs, broken shards."""
import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastcram.train import checkpoint as ckpt
from fastcram.config import TrainConfig
from fastcram.errors import UserError
from fastcram.config import RunOptions
from fastcram.train.loop import train

from .helpers import FakeClock

STEPS = 240


def _cli(data, out, *extra):
    return [sys.executable, "-m", "fastcram", "train", "--preset", "tiny", "--data", data, "--out", out,
            "--device", "cpu", "--no-compile", "--micro-batch", "8", "--final-batch", "16", "--minutes", "600",
            "--deterministic", "--max-steps", str(STEPS), "--checkpoint-interval", "0.25", "--quiet", *extra]


def _records(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _trajectory(run_dir):
    """step -> (loss, data position) of the final history: a replayed step keeps its last record."""
    out = {}
    for r in _records(run_dir):
        if "loss" in r:
            out[r["step"]] = (r["loss"], r["data_position"], r["sequences"])
    return out


def _newest_step(run_dir):
    paths = ckpt.list_checkpoints(run_dir)
    return paths[-1] if paths else None


@pytest.mark.slow
def test_sigkill_ten_times_then_resume_equals_uninterrupted(small_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every segment: same float sums
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    subprocess.run(_cli(small_data, ref_dir), check=True, env=env, timeout=600)

    rng = random.Random()
    kills, resumed_from = 0, []
    cmd = _cli(small_data, run_dir)
    t_segments = 0.0
    while kills < 10:
        before = _newest_step(run_dir) if os.path.isdir(run_dir) else None
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        # wait for this segment to write a checkpoint of its own, then kill at a random moment
        while _newest_step(run_dir) in (None, before) and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            pytest.fail(f"segment ended before it was killed (rc {proc.returncode}): {proc.stderr.read()[-500:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t_segments += time.time() - t0
        kills += 1
        # no checkpoint is ever unreadable; temp files never look like checkpoints
        for path in ckpt.candidates(run_dir):
            ckpt.load_checkpoint(path)
        resumed_from.append(ckpt.load_checkpoint(ckpt.latest(run_dir)))
        cmd = _cli(small_data, "unused")[:4] + ["--resume", run_dir, "--quiet"]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, timeout=600)
    t_segments += time.time() - t0

    # every resume started from the newest complete checkpoint, with the budget it had spent
    resumes = [r for r in _records(run_dir) if r.get("event") == "resume"]
    assert len(resumes) == 10
    for rec, saved in zip(resumes, resumed_from):
        assert rec["checkpoint"].endswith(f"step-{saved['step']:08d}.pt")
        assert rec["budget_spent_s"] == pytest.approx(saved["elapsed_s"], abs=1e-3)
    spent = [r["budget_spent_s"] for r in resumes]
    assert spent == sorted(spent)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["budget_spent_s"] <= t_segments  # never more budget accounted than wall time used

    # the final history equals the uninterrupted run: losses, data positions (no block repeated or skipped)
    ref, got = _trajectory(ref_dir), _trajectory(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert got == ref
    seqs = [ref[s][2] for s in range(1, STEPS + 1)]
    assert all(b > a for a, b in zip(seqs, seqs[1:]))
    # and bit-identical final parameters
    a = ckpt.load_checkpoint(os.path.join(ref_dir, "checkpoints", "final.pt"))["model"]
    b = ckpt.load_checkpoint(os.path.join(run_dir, "checkpoints", "final.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_exits_zero(small_data, tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = _cli(small_data, run_dir)
    cmd[cmd.index("--max-steps") + 1] = "100000"
    cmd.remove("--quiet")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not os.path.exists(os.path.join(run_dir, "log.jsonl")) and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"resume with: fastcram train --resume {run_dir}" in err
    stopped = [r for r in _records(run_dir) if r.get("event") == "stopped"][0]
    saved = ckpt.load_checkpoint(stopped["checkpoint"])
    assert saved["step"] == stopped["step"] > 0


def _opts(small_data, out, **kw):
    tcfg = TrainConfig(compile=False, device="cpu", micro_batch=8, final_batch=8, budget_s=1e6,
                       log_interval_s=0.0, **kw)
    return RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(out), progress=False)


def test_full_disk_during_checkpoint_keeps_previous_and_trains_on(small_data, tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2 and "step-" in getattr(f, "name", ""):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    s = train(_opts(small_data, tmp_path / "r", max_steps=8, checkpoint_interval_s=1.0), now=FakeClock(1.0))
    assert s["exit_code"] == 0 and s["steps"] == 8  # trained on to the end
    recs = [r for r in _records(s["run_dir"]) if r.get("event") == "checkpoint"]
    assert any("error" in r and "No space left" in r["error"] for r in recs)
    good = [r for r in recs if "write_s" in r and "step-" in r["path"]]
    assert good and ckpt.load_checkpoint(good[0]["path"])["step"] == good[0]["step"]  # the previous one is intact
    assert not glob.glob(os.path.join(s["run_dir"], "checkpoints", "*.tmp*"))

    calls["n"] = 0
    s2 = train(_opts(small_data, tmp_path / "r2", max_steps=50, checkpoint_interval_s=1.0,
                     stop_on_checkpoint_error=True), now=FakeClock(1.0))
    assert s2["stopped_by"] == "checkpoint-error" and s2["exit_code"] == 1 and s2["step"] < 50


def test_nan_step_is_skipped_without_changing_anything(small_data, tmp_path):
    # a checkpoint after every step; the 4th step (state.step == 3 when it runs) gets a NaN loss
    s = train(_opts(small_data, tmp_path / "b", max_steps=4, fault_nan_steps=(3,), checkpoint_interval_s=1.0,
                    keep_checkpoints=10), now=FakeClock(1.0))
    assert s["skipped_steps"] == 1 and s["exit_code"] == 0
    before = ckpt.load_checkpoint(ckpt.step_path(s["run_dir"], 3))
    after = ckpt.load_checkpoint(s["final_checkpoint"])
    assert after["step"] == 4
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k  # the skipped step changed no parameter...
    for pid, st in before["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["optimizer"]["state"][pid][k]), (pid, k)  # ...nor moment, nor count
    two = ckpt.load_checkpoint(ckpt.step_path(s["run_dir"], 2))
    assert not torch.equal(two["model"]["tok_emb.weight"], before["model"]["tok_emb.weight"])  # good steps do
    rec = [r for r in _records(s["run_dir"]) if r.get("step") == 4 and "loss" in r][0]
    assert rec["skipped_steps"] == 1 and rec["loss"] is None


def test_nan_in_a_row_stops_with_a_message(small_data, tmp_path, capsys):
    opts = _opts(small_data, tmp_path / "r", max_steps=40, fault_nan_steps=tuple(range(2, 40)), max_bad_steps=5)
    opts.progress = True
    s = train(opts, now=FakeClock(1.0))
    assert s["stopped_by"] == "non-finite" and s["exit_code"] == 1 and s["step"] == 7
    assert "in a row had a non-finite loss" in capsys.readouterr().err


def test_truncated_or_corrupt_shard_is_named(small_data, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    shard = sorted(glob.glob(str(data / "shard-*.bin")))[0]
    raw = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(UserError, match=os.path.basename(shard)):
        train(_opts(str(data), tmp_path / "r1", max_steps=1))
    with open(shard, "wb") as f:  # same size, one byte flipped: only a checksum sees it
        f.write(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    opts = _opts(str(data), tmp_path / "r2", max_steps=1, verify_data=True)
    with pytest.raises(UserError, match="corrupt"):
        train(opts)
