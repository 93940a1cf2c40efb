"""A full disk: every write names ENOSPC and the file, training goes on where it can and stops when it has
gone too long without a checkpoint, nothing half-written is left that looks valid, and a run log cut mid-record
is repaired on resume and read by plot.

On a real tmpfs of a few MB where the machine allows the mount, else with ENOSPC injected at the one write
function (tests/disk.py).
"""
import json
import os

import pytest

from fastcram import files
from fastcram.cli import main
from fastcram.config import RunOptions, TrainConfig, preset
from fastcram.observe.plot import plot_run
from fastcram.observe.telemetry import TelemetrySampler
from fastcram.train import checkpoint as ckpt
from fastcram.train.loop import train

from .disk import small_disk  # noqa: F401 (fixture)
from .helpers import FakeClock

CKPT_MB = 5  # a tiny-preset checkpoint of the test corpus (model + AdamW moments) is about 4.8 MB


def _opts(small_data, out, **kw) -> RunOptions:
    tcfg = TrainConfig(**{**preset("tiny").train_overrides, "compile": False, "device": "cpu", "micro_batch": 8,
                          "final_batch": 8, "log_interval_s": 0.0, **kw})
    return RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(out), progress=False)


def _lines(path):
    with open(path, "rb") as f:
        raw = f.read()
    assert raw == b"" or raw.endswith(b"\n"), "the file ends inside a record"
    return [json.loads(line) for line in raw.splitlines()]  # every line a whole record


def _leftovers(folder):
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if ".tmp" in n]


class ScriptedClock(FakeClock):
    """A fake clock that runs actions when it passes given times (seconds since its start)."""

    def __init__(self, actions: dict, tick: float = 1.0):
        super().__init__(tick)
        self.t0, self.actions = self.t, sorted(actions.items())

    def __call__(self) -> float:
        t = super().__call__()
        while self.actions and t - self.t0 >= self.actions[0][0]:
            self.actions.pop(0)[1]()
        return t


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("fastcram: error")]


# ---------------------------------------------------------------- the writers themselves

def test_an_atomic_write_on_a_full_disk_names_enospc_and_leaves_the_old_file(small_disk):
    disk = small_disk(1 << 20)
    path = os.path.join(disk.root, "config.json")
    files.atomic_write_json(path, {"old": True})
    disk.fill()
    with pytest.raises(files.WriteError) as e:
        files.atomic_write_json(path, {"new": "x" * 200_000})
    assert str(e.value).startswith(f"cannot write {path}: ") and "(ENOSPC)" in str(e.value)
    assert "free disk space" in str(e.value)
    assert json.load(open(path)) == {"old": True} and not _leftovers(disk.root)


def test_a_checkpoint_that_does_not_fit_names_enospc_and_leaves_nothing(small_disk):
    import torch
    disk = small_disk(1 << 20)
    path = os.path.join(disk.root, "checkpoints", "step-00000007.pt")
    with pytest.raises(files.WriteError) as e:
        ckpt.save(path, {"model": {"w": torch.randn(600, 600)}, "step": 7})  # 1.4 MB
    assert "(ENOSPC)" in str(e.value) and "step-00000007.pt" in str(e.value)
    assert os.listdir(os.path.dirname(path)) == []  # no temp file, no record without its checkpoint


def test_a_jsonl_record_that_does_not_fit_leaves_the_file_whole(small_disk):
    disk = small_disk(1 << 20)
    path = os.path.join(disk.root, "log.jsonl")
    out = files.JsonlAppender(path)
    out.append({"step": 1, "loss": float("nan")})  # non-finite values are written as null, never as NaN
    disk.fill(leave=100)
    with pytest.raises(files.WriteError, match=r"log\.jsonl: .*\(ENOSPC\)"):
        out.append({"step": 2, "pad": "x" * 50_000})  # the part that fits is cut off again
    disk.free()
    out.append({"step": 3})
    out.close()
    assert _lines(path) == [{"step": 1, "loss": None}, {"step": 3}]


def test_telemetry_samples_that_cannot_be_written_are_reported_once_and_kept(small_disk, capsys):
    disk = small_disk(1 << 20)
    t = TelemetrySampler(os.path.join(disk.root, "telemetry.jsonl"))
    t._file, t._failing = files.JsonlAppender(t.path, sync=False), False  # as start() sets them up with NVML
    t._append({"time": 1.0, "gpu_util": 50})
    disk.fill()
    for i in range(3):
        t._append({"time": 2.0 + i, "gpu_util": 60, "pad": "x" * 20_000})
    err = capsys.readouterr().err
    assert err.count("telemetry: cannot write") == 1 and "(ENOSPC)" in err and "telemetry.jsonl" in err
    disk.free()
    t._append({"time": 9.0, "gpu_util": 70})
    assert [r["time"] for r in _lines(t.path)] == [1.0, 9.0]


def test_a_benchmark_csv_that_fills_the_disk_names_the_file(small_disk):
    from fastcram.benchmarks.kernels import CsvSink
    disk = small_disk(1 << 20)
    if disk.kind == "injected":
        pytest.skip("the CSV is written row by row through the csv module, past the injected write function")
    path = os.path.join(disk.root, "kernels.csv")
    disk.fill()
    with pytest.raises(files.WriteError, match=r"kernels\.csv: No space left on device \(ENOSPC\)"):
        CsvSink(path)


def test_profile_files_on_a_full_disk_are_said_and_the_breakdown_kept(small_disk, capsys):
    import torch
    from fastcram.observe.profiling import ProfileWindow
    disk = small_disk(1 << 20)
    window = ProfileWindow(os.path.join(disk.root, "profile"), 0, 1, "cpu")
    window.before_step(0)
    x = torch.randn(64, 64)
    (x @ x).sum()
    disk.fill()
    window.after_step(1, 0.0)
    err = capsys.readouterr().err
    assert "fastcram: profile: cannot write" in err and "(ENOSPC)" in err
    assert window.result is not None and window.result["steps"] == 1
    assert not os.path.exists(os.path.join(disk.root, "profile", "breakdown.json"))


# ---------------------------------------------------------------- training on a full disk

def test_train_on_a_disk_full_from_the_start_is_one_line_and_leaves_nothing(small_data, small_disk, capsys):
    disk = small_disk(1 << 20)
    disk.fill()
    out = os.path.join(disk.root, "run")
    rc = main(["train", "--preset", "tiny", "--data", small_data, "--out", out, "--device", "cpu", "--no-compile",
               "--micro-batch", "8", "--minutes", "1", "--quiet"])
    (line,) = _error_lines(capsys.readouterr().err)
    assert rc == 2 and "--out" in line and out in line and "(ENOSPC)" in line
    assert sorted(os.listdir(disk.root)) == (["filler"] if disk.kind == "tmpfs" else [])


def test_no_room_for_any_checkpoint_stops_at_the_stated_share_and_resumes_from_scratch(small_data, small_disk,
                                                                                       capsys):
    disk = small_disk(1 << 20)  # config and log fit, no checkpoint does
    out = os.path.join(disk.root, "run")
    opts = _opts(small_data, out, budget_s=100.0, checkpoint_interval_s=3.0)
    opts.progress = True
    s = train(opts, now=FakeClock(1.0))
    err = capsys.readouterr().err
    assert s["stopped_by"] == "checkpoint-error" and s["exit_code"] == 1
    if disk.kind == "tmpfs":  # said before training: statvfs sees a real small filesystem, not an injected one
        assert "MiB free but one checkpoint of this model needs about" in err.split("not saved")[0]
    failures = [ln for ln in err.splitlines() if "not saved" in ln]
    assert failures and all("(ENOSPC)" in ln and "step-" in ln and "no checkpoint yet" in ln for ln in failures)
    assert "intact" not in err
    stop = [ln for ln in err.splitlines() if ln.startswith("fastcram: stopping")][0]
    assert "no checkpoint could be written for" in stop and "the limit is 10%" in stop
    recs = _lines(os.path.join(out, "log.jsonl"))
    spent = recs[-2].get("budget_spent_s") or max(r.get("budget_spent_s") or 0 for r in recs)
    assert 10 <= spent < 100  # it stopped past 10% of the budget, long before its end
    assert not ckpt.candidates(out) and not _leftovers(out)

    disk.grow((3 * CKPT_MB + 2) << 20)  # with room, --resume starts the checkpoint-less run over
    assert main(["train", "--resume", out, "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "has no checkpoint yet" in err and "starting it again from step 0" in err
    assert ckpt.load_checkpoint(out)["step"] == 3


def test_stop_on_checkpoint_error_stops_at_the_first_failure(small_data, small_disk, capsys):
    disk = small_disk(1 << 20)
    opts = _opts(small_data, os.path.join(disk.root, "run"), budget_s=1e6, max_steps=50, checkpoint_interval_s=2.0,
                 stop_on_checkpoint_error=True)
    s = train(opts, now=FakeClock(1.0))
    err = capsys.readouterr().err
    assert s["stopped_by"] == "checkpoint-error" and s["step"] < 10
    assert err.count("not saved") == 1 and "stopping (--stop-on-checkpoint-error)" in err and "(ENOSPC)" in err


def test_a_disk_that_fills_mid_run_loses_no_training_and_leaves_whole_files(small_data, small_disk, capsys):
    disk = small_disk((3 * CKPT_MB + 2) << 20)
    out = os.path.join(disk.root, "run")
    full_at, free_at = 60, 140
    clock = ScriptedClock({full_at: disk.fill, free_at: disk.free})
    s = train(_opts(small_data, out, budget_s=1e6, max_steps=40, checkpoint_interval_s=10.0), now=clock)
    err = capsys.readouterr().err
    assert s["exit_code"] == 0 and s["steps"] == 40  # training went on through the full disk
    assert err.count("run log: cannot write") == 1  # said once (not at every record), with the file and ENOSPC
    assert [ln for ln in err.splitlines() if "run log" in ln][0].count("log.jsonl: No space left on device (ENOSPC)")
    assert any("not saved" in ln and "(ENOSPC)" in ln and "the newest checkpoint is" in ln for ln in err.splitlines())
    recs = _lines(os.path.join(out, "log.jsonl"))  # every line whole
    gap = [r for r in recs if r.get("event") == "log-gap"]  # where it continues, the log says what it lost
    assert gap and all(r["lost_records"] > 0 for r in gap)
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == 40
    failed = [r for r in recs if r.get("event") == "checkpoint" and "error" in r]
    assert all("(ENOSPC)" in r["error"] for r in failed)  # those the log could take
    for path in ckpt.candidates(out):  # what is on disk is complete and verified
        ckpt.load_checkpoint(path)
    assert ckpt.load_checkpoint(out)["step"] == 40 and not _leftovers(out)


def test_a_disk_still_full_at_the_end_names_the_newest_checkpoint_and_resume_continues(small_data, small_disk,
                                                                                       capsys):
    disk = small_disk((3 * CKPT_MB + 2) << 20)
    out = os.path.join(disk.root, "run")
    clock = ScriptedClock({60: disk.fill})
    opts = _opts(small_data, out, budget_s=1e6, max_steps=30, checkpoint_interval_s=10.0)
    with pytest.raises(Exception) as e:
        train(opts, now=clock)
    newest = ckpt.load_checkpoint(out)
    msg = str(e.value)
    assert "could not write the final checkpoint" in msg and "(ENOSPC)" in msg
    assert f"the newest checkpoint is {newest['_path']} (step {newest['step']})" in msg
    assert 0 < newest["step"] < 30 and not _leftovers(out)
    capsys.readouterr()
    disk.free()
    assert main(["train", "--resume", out, "--quiet"]) == 0
    assert ckpt.load_checkpoint(out)["step"] == 30


def test_a_summary_that_cannot_be_written_is_named_and_the_final_checkpoint_kept(small_data, small_disk, capsys):
    disk = small_disk((3 * CKPT_MB + 2) << 20)
    out = os.path.join(disk.root, "run")
    final = os.path.join(out, "checkpoints", "final.pt")

    clock, filled = FakeClock(1.0), []

    def now():  # the disk fills once final.pt is written, before the summary is
        if os.path.exists(final) and not filled:
            disk.fill()
            filled.append(True)
        return clock()

    s = train(_opts(small_data, out, budget_s=1e6, max_steps=2), now=now)
    err = capsys.readouterr().err
    assert s["exit_code"] == 1 and f"cannot write {os.path.join(out, 'summary.json')}" in err and "(ENOSPC)" in err
    assert ckpt.load_checkpoint(final)["step"] == 2 and not os.path.exists(os.path.join(out, "summary.json"))
    assert not _leftovers(out)


# ---------------------------------------------------------------- data prepare

def test_a_prepare_that_fills_the_disk_resumes_to_the_same_bytes(small_disk, tmp_path, capsys):
    from .helpers import write_small_corpus
    src = write_small_corpus(str(tmp_path / "src" / "corpus.txt"), 200_000)
    args = ["data", "prepare", "--input", src, "--vocab-size", "512", "--shard-blocks", "64",
            "--compression-threshold", "0.6", "--workers", "1", "--quiet"]
    ref = str(tmp_path / "ref")
    assert main([*args, "--out", ref]) == 0
    disk = small_disk(96 << 10)  # room for the tokenizer, not for all the shards
    out = os.path.join(disk.root, "data")
    capsys.readouterr()
    assert main([*args, "--out", out]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "(ENOSPC)" in line and out in line and "rerun the same command to resume" in line
    assert not os.path.exists(os.path.join(out, "manifest.json")) and not _leftovers(out)
    disk.grow(8 << 20)
    assert main([*args, "--out", out]) == 0  # the same command, with room: resumed, not restarted
    want, got = (json.load(open(os.path.join(d, "manifest.json"))) for d in (ref, out))
    assert got["shards"] == want["shards"] and got["tokenizer_hash"] == want["tokenizer_hash"]
    for entry in got["shards"]:
        assert files.sha256_file(os.path.join(out, entry["file"])) == entry["sha256"]


# ---------------------------------------------------------------- a log cut mid-record

def test_a_log_cut_mid_record_is_repaired_on_resume_and_plotted(small_data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "run")
    train(_opts(small_data, out, budget_s=1e6, max_steps=3), now=FakeClock(1.0))
    log = os.path.join(out, "log.jsonl")
    with open(log, "ab") as f:
        f.write(b'{"time": 1.0, "step": 4, "loss": 5.1, "lr"')  # what a process killed mid-write leaves
    assert plot_run(out).endswith("run.png")  # plot reads around it
    assert "skipped 1 damaged line" in capsys.readouterr().err

    assert main(["train", "--resume", out, "--max-steps", "5", "--quiet"]) == 0
    recs = _lines(log)  # repaired: every line whole again
    repaired = [r for r in recs if r.get("event") == "log-repaired"]
    assert len(repaired) == 1 and repaired[0]["removed_bytes"] == len(b'{"time": 1.0, "step": 4, "loss": 5.1, "lr"')
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5]
    assert main(["plot", out]) == 0
