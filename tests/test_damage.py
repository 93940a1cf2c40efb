"""Damaged files: a checkpoint overwritten in place, a state that is no longer finite, a damaged config.json, a
checkpoint without the expected entries, a corrupt shard anywhere in the data, a bad manifest. Nothing damaged
is used, nothing good is removed, and each case is named."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch

from fastcram.cli import main
from fastcram.config import DataConfig, RunOptions, TrainConfig, preset
from fastcram.data.prepare import PrepareOptions, prepare
from fastcram.errors import UserError
from fastcram.files import sha256_file
from fastcram.train import checkpoint as ckpt
from fastcram.train.loop import train

from .helpers import FakeClock, write_small_corpus


def _opts(data, out, **kw) -> RunOptions:
    tcfg = TrainConfig(**{**preset("tiny").train_overrides, "compile": False, "device": "cpu", "micro_batch": 8,
                          "final_batch": 8, "log_interval_s": 0.0, "budget_s": 1e6, **kw})
    return RunOptions(train=tcfg, preset="tiny", data_dir=data, out_dir=str(out), progress=False)


@pytest.fixture
def run(checkpointed_run, tmp_path) -> str:
    return shutil.copytree(checkpointed_run, str(tmp_path / "run"))


def final(run: str) -> str:
    return os.path.join(run, "checkpoints", "final.pt")


def records(run: str) -> list[dict]:
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def error_line(capsys) -> str:
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fastcram: error")]
    return line


def rewrite_record(path: str) -> None:
    """A record matching the file as it is now: only the checks after the checksum can refuse it."""
    rec = json.load(open(ckpt.record_path(path)))
    rec.update(bytes=os.path.getsize(path), sha256=sha256_file(path))
    json.dump(rec, open(ckpt.record_path(path), "w"))


# ---------------------------------------------------------------- checkpoints damaged in place

@pytest.mark.parametrize("fill", [b"\x00", b"\xff"], ids=["zeros", "0xFF"])
def test_a_checkpoint_overwritten_in_place_is_never_used(run, capsys, fill):
    size = os.path.getsize(final(run))
    with open(final(run), "r+b") as f:  # same size, same name: only the checksum sees it
        f.write(fill * size)
    assert main(["train", "--resume", run, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {final(run)} fails its checksum" in err
    resumed = [r for r in records(run) if r.get("event") == "resume"][-1]
    assert resumed["checkpoint"] == ckpt.step_path(run, 3)
    saved = ckpt.load_checkpoint(final(run))  # written again, from good weights: finite
    assert saved["step"] == 4 and all(torch.isfinite(t).all() for t in saved["model"].values())

    with open(final(run), "r+b") as f:
        f.write(fill * size)
    assert main(["eval", "glue", final(run), "--quiet", "--tasks", "rte"]) == 2  # that one file: refused
    line = error_line(capsys)
    assert final(run) in line and "fails its checksum" in line


def test_pruning_counts_only_checkpoints_that_verify(tmp_path):
    run = str(tmp_path / "run")
    for step in range(1, 5):
        ckpt.save(ckpt.step_path(run, step), {"model": {"w": torch.randn(7, 5)}, "step": step})
    for step in (3, 4):  # the two newest damaged in place
        path = ckpt.step_path(run, step)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.write(b"\xff" * size)
    assert ckpt.prune(run, keep=2) == []  # a name-based prune would have removed steps 1 and 2, the good ones
    assert ckpt.load_checkpoint(run, say=lambda m: None)["step"] == 2
    assert ckpt.prune(run, keep=1) == [ckpt.step_path(run, 1)]  # the newest good one stays, always
    assert ckpt.load_checkpoint(run, say=lambda m: None)["step"] == 2
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(run)] == [
        "step-00000002.pt", "step-00000003.pt", "step-00000004.pt"]  # damaged ones newer than it are left named


def test_a_checkpoint_holding_nan_weights_is_refused(run, capsys):
    payload = ckpt.load_checkpoint(final(run))
    payload.pop("_path")
    payload["model"]["tok_emb.weight"][5, 3] = float("nan")
    torch.save(payload, final(run))
    rewrite_record(final(run))
    with pytest.raises(ckpt.CheckpointError, match="non-finite weights"):
        ckpt.load_checkpoint(final(run))
    assert main(["train", "--resume", run, "--quiet"]) == 0
    assert "non-finite weights" in capsys.readouterr().err
    assert [r for r in records(run) if r.get("event") == "resume"][-1]["checkpoint"] == ckpt.step_path(run, 3)


def test_a_diverged_state_is_never_written_over_the_last_finite_checkpoint(run, capsys):
    # resumed at an infinite learning rate (the command line refuses it; the library takes it), the first update
    # makes the weights non-finite; the fused AdamW's step itself is finite, so the non-finite guard cannot see it
    before = {p: sha256_file(p) for p in ckpt.candidates(run)}
    opts = _opts(None, None, lr=float("inf"), max_steps=30, checkpoint_interval_s=2.0)
    opts.resume, opts.lr_given, opts.budget_given, opts.progress = run, True, False, True
    s = train(opts, now=FakeClock(1.0))
    err = capsys.readouterr().err
    assert s["stopped_by"] == "non-finite" and s["exit_code"] == 1
    assert "not written: the weights are not finite" in err and "stopping: the weights are no longer finite" in err
    assert "the newest checkpoint is " in err and "(step 4)" in err and "--lr 0.0005" in err
    assert all(sha256_file(p) == sha for p, sha in before.items())  # nothing written over, nothing pruned
    for path in ckpt.candidates(run):  # only the finite states of step 4 and before are on disk
        assert ckpt.load_checkpoint(path)["step"] <= 4
    assert ckpt.load_checkpoint(run)["step"] == 4


# ---------------------------------------------------------------- config.json and checkpoint entries

@pytest.mark.parametrize("damage", [b'{"preset": "tiny", "data_dir": "/x", "tra', b"\x00\xff\xfe binary \x9c",
                                    b"[1, 2, 3]", b'{"train": 5}'], ids=["truncated", "binary", "a-list", "wrong-shape"])
def test_a_damaged_config_falls_back_to_the_checkpoints_copy(run, capsys, damage):
    good = json.load(open(os.path.join(run, "config.json")))
    with open(os.path.join(run, "config.json"), "wb") as f:
        f.write(damage)
    assert main(["train", "--resume", run, "--max-steps", "5", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{os.path.join(run, 'config.json')} is unreadable" in err
    assert f"using the copy of the configuration stored in {final(run)}" in err
    assert json.load(open(os.path.join(run, "config.json"))) == good  # written again from the copy
    assert ckpt.load_checkpoint(final(run))["step"] == 5


@pytest.mark.parametrize("edit,why", [
    (lambda c: c["train"].update(lr="x"), "lr = 'x' is not a float"),
    (lambda c: c["train"].update(budget_s=None), "budget_s = None is not a float"),
    (lambda c: c["train"].update(micro_batch=-4), "micro_batch = -4 must be positive"),
    (lambda c: c["train"].update(micro_batch=True), "micro_batch = True is not a int"),
    (lambda c: c["data"].update(seq_len=0), "seq_len = 0 must be positive"),
    (lambda c: c.update(preset="nope"), "preset 'nope' is not one of"),
    (lambda c: c.update(train={}), "lacks budget_s, micro_batch"),
], ids=["lr-text", "budget-null", "micro-batch-negative", "micro-batch-bool", "seq-len-0", "preset", "train-empty"])
def test_a_config_with_bad_values_falls_back_to_the_checkpoints_copy(run, capsys, edit, why):
    """Valid JSON whose values `fastcram train` never writes: damaged all the same, never silently defaulted."""
    path = os.path.join(run, "config.json")
    good = json.load(open(path))
    bad = json.loads(json.dumps(good))
    edit(bad)
    with open(path, "w") as f:
        json.dump(bad, f)
    assert main(["train", "--resume", run, "--max-steps", "5", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{path} is unreadable or not valid" in err and why in err and "Traceback" not in err
    assert json.load(open(path)) == good  # written again from the checkpoint's copy
    assert ckpt.load_checkpoint(final(run))["step"] == 5


def test_a_damaged_config_without_any_checkpoint_is_one_line(run, capsys):
    shutil.rmtree(os.path.join(run, "checkpoints"))
    with open(os.path.join(run, "config.json"), "wb") as f:
        f.write(b"{")
    assert main(["train", "--resume", run, "--quiet"]) == 2
    line = error_line(capsys)
    assert "config.json is unreadable" in line and "no checkpoint" in line


def test_a_checkpoint_without_the_expected_entries_is_named(run, capsys):
    payload = ckpt.load_checkpoint(final(run))
    torch.save({"format": 2, "model": payload["model"], "step": 4}, final(run))  # weights only, a hand-made file
    rewrite_record(final(run))
    assert main(["train", "--resume", run, "--quiet"]) == 0  # passed over for the newest whole one
    assert "lacks 'optimizer'" in capsys.readouterr().err
    for step in range(4):
        os.remove(ckpt.step_path(run, step))
    torch.save({"format": 2, "model": payload["model"], "step": 4}, final(run))
    rewrite_record(final(run))
    assert main(["train", "--resume", run, "--quiet"]) == 2
    line = error_line(capsys)
    assert final(run) in line and "lacks 'optimizer', 'micro_steps'" in line


def test_a_checkpoint_whose_weights_do_not_fit_names_the_keys(run, capsys):
    payload = ckpt.load_checkpoint(final(run))
    key = sorted(payload["model"])[-1]
    del payload["model"][key]
    payload["model"]["not_a_parameter"] = torch.zeros(1)
    payload.pop("_path", None)
    torch.save(payload, final(run))
    rewrite_record(final(run))
    for step in range(4):
        os.remove(ckpt.step_path(run, step))
    assert main(["train", "--resume", run, "--quiet"]) == 2
    line = error_line(capsys)
    assert "does not fit this run" in line and f'Missing key(s) in state_dict: "{key}"' in line
    assert 'Unexpected key(s) in state_dict: "not_a_parameter"' in line


# ---------------------------------------------------------------- shards

@pytest.fixture(scope="module")
def stream_data(tmp_path_factory) -> str:
    """Many small shards, read in order (a curriculum is): shard k is first used long after start-up."""
    root = tmp_path_factory.mktemp("stream")
    src = write_small_corpus(str(root / "corpus.txt"), 120_000)
    out = str(root / "data")
    prepare([src], out, DataConfig(vocab_size=512, shard_blocks=16, compression_threshold=0.6), progress=False,
            options=PrepareOptions(order="curriculum", workers=1))
    return out


def _spoil(data: str, tmp_path, how: str) -> tuple[str, str]:
    """A copy of the data with its 10th shard damaged; (folder, shard path)."""
    copy = shutil.copytree(data, str(tmp_path / "data"))
    shard = sorted(glob.glob(os.path.join(copy, "shard-*.bin")))[9]
    ids = np.fromfile(shard, dtype=np.uint16)
    rng = np.random.default_rng()
    if how == "0xFF":
        ids[:] = 0xFFFF
    elif how == "in-range-garbage":
        ids[:] = rng.integers(7, 512, len(ids))
    ids.tofile(shard)
    if how == "ids-out-of-range":  # a manifest whose checksum matches ids the vocabulary does not have
        ids[rng.integers(0, len(ids))] = 600
        ids.tofile(shard)
        m = json.load(open(os.path.join(copy, "manifest.json")))
        entry = next(s for s in m["shards"] if s["file"] == os.path.basename(shard))
        entry["sha256"] = sha256_file(shard)
        json.dump(m, open(os.path.join(copy, "manifest.json"), "w"))
    return copy, shard


@pytest.mark.parametrize("how", ["0xFF", "in-range-garbage", "ids-out-of-range"])
def test_a_corrupt_shard_stops_the_run_with_a_checkpoint_naming_it(stream_data, tmp_path, how):
    data, shard = _spoil(stream_data, tmp_path, how)
    out = str(tmp_path / "run")
    with pytest.raises(UserError) as e:  # never skipped silently, never an IndexError
        train(_opts(data, out, max_steps=200, checkpoint_interval_s=1e9), now=FakeClock(1.0))
    msg = str(e.value)
    assert shard in msg and ("corrupt" in msg or "outside the 512-token vocabulary" in msg)
    stopped = [r for r in records(out) if r.get("event") == "stopped"][0]
    assert stopped["reason"] == "bad-data" and stopped["step"] > 10  # mid-run: shard 10 is first read then
    saved = ckpt.load_checkpoint(stopped["checkpoint"])
    assert saved["step"] == stopped["step"] and f"saved {stopped['checkpoint']}" in msg
    assert f"fastcram train --resume {out}" in msg


def test_a_corrupt_shard_is_named_by_the_command_line(stream_data, tmp_path, capsys):
    data, shard = _spoil(stream_data, tmp_path, "0xFF")
    rc = main(["train", "--preset", "tiny", "--data", data, "--out", str(tmp_path / "run"), "--device", "cpu",
               "--no-compile", "--micro-batch", "8", "--max-steps", "200", "--minutes", "600", "--quiet"])
    assert rc == 2
    line = error_line(capsys)
    assert shard in line and "training stopped at step" in line


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(seq_len=0), "seq_len 0"),
    (lambda m: [s.pop("sha256") for s in m["shards"]], "no SHA-256 checksum of shard"),
    (lambda m: m["shards"][0].update(blocks=-3), "-3 blocks"),
], ids=["seq-len-0", "no-checksums", "negative-blocks"])
def test_a_bad_manifest_is_one_line(small_data, tmp_path, capsys, change, needle):
    data = shutil.copytree(small_data, str(tmp_path / "data"))
    m = json.load(open(os.path.join(data, "manifest.json")))
    change(m)
    json.dump(m, open(os.path.join(data, "manifest.json"), "w"))
    rc = main(["train", "--preset", "tiny", "--data", data, "--out", str(tmp_path / "run"), "--device", "cpu",
               "--no-compile", "--minutes", "1", "--quiet"])
    assert rc == 2
    line = error_line(capsys)
    assert "manifest.json" in line and needle in line and "prepare the data again" in line
