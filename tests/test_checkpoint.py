"""Checkpoint format 2 and its one loader: plain values read with weights_only=True, a checksum record checked
before anything is unpickled, a failing file named and passed over (resume, eval of a run) or refused (one file),
version-1 files only with --trust-checkpoint."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from fastcram.cli import main
from fastcram.files import sha256_file
from fastcram.glue.finetune import load_run
from fastcram.train import checkpoint as ckpt


@pytest.fixture
def run(checkpointed_run, tmp_path) -> str:
    """A copy of the trained run to spoil."""
    return shutil.copytree(checkpointed_run, str(tmp_path / "run"))


def final(run: str) -> str:
    return os.path.join(run, "checkpoints", "final.pt")


def resume(run: str, *extra: str) -> int:
    return main(["train", "--resume", run, "--quiet", *extra])


def resumed_from(run: str) -> str:
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f if '"resume"' in line][-1]["checkpoint"]


def errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fastcram: error")]


def rewrite_record(path: str) -> None:
    """A record that matches the file as it is now: only the unpickling can stop it."""
    rec = json.load(open(ckpt.record_path(path)))
    rec.update(bytes=os.path.getsize(path), sha256=sha256_file(path))
    json.dump(rec, open(ckpt.record_path(path), "w"))


# ---------------------------------------------------------------- the format

def test_a_checkpoint_is_plain_values_with_its_record(checkpointed_run):
    trained = checkpointed_run
    path = final(trained)
    payload = torch.load(path, map_location="cpu", weights_only=True)  # the stock safe loader reads it whole
    rec = json.load(open(ckpt.record_path(path)))
    assert rec == {"format": 2, "file": "final.pt", "step": 4, "bytes": os.path.getsize(path),
                   "sha256": sha256_file(path)}
    assert payload["format"] == 2 and payload["step"] == 4
    assert ckpt.candidates(trained) == [path] + [ckpt.step_path(trained, s) for s in (3, 2, 1, 0)]


def test_rng_states_round_trip_through_a_file(tmp_path):
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    random.random(), np.random.standard_normal(), torch.rand(3), torch.rand(3, generator=gen)  # advance all four
    path = str(tmp_path / "checkpoints" / "step-00000001.pt")
    ckpt.save(path, {"rng": ckpt.rng_state(gen), "step": 1})

    def draws():
        return (random.random(), np.random.standard_normal(5).tolist(), np.random.randint(0, 1 << 30, 3).tolist(),
                torch.rand(4).tolist(), torch.rand(4, generator=gen).tolist())

    want = draws()
    random.seed(), np.random.seed(), torch.seed(), gen.seed()  # scrambled
    ckpt.set_rng_state(ckpt.load_checkpoint(path, require=())["rng"], gen)
    assert draws() == want


# ---------------------------------------------------------------- a crafted checkpoint never runs

class CreatesAFile:
    """Unpickling this calls open(path, "w"): code run by merely reading the checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def craft(path: str, marker: str, record: bool) -> None:
    payload = ckpt.load_checkpoint(path)
    payload["config"]["note"] = CreatesAFile(marker)
    torch.save(payload, path)
    if record:
        rewrite_record(path)
    else:
        os.remove(ckpt.record_path(path))


@pytest.mark.parametrize("record", [True, False], ids=["with-a-matching-record", "without-record"])
def test_a_crafted_checkpoint_is_refused_by_resume_and_eval(run, tmp_path, capsys, record):
    marker = str(tmp_path / "pwned")
    craft(final(run), marker, record)
    shutil.copy(final(run), tmp_path / "copy.pt")
    torch.load(tmp_path / "copy.pt", weights_only=False)  # the premise: reading it unsafely runs its code...
    assert os.path.exists(marker)
    os.remove(marker)

    why = "more than tensors and plain values" if record else "no checksum record"
    pre = load_run(run)  # eval of the run: final.pt is passed over (named when it has a record: it ranks first;
    assert pre.checkpoint == ckpt.step_path(run, 3)  # without one it ranks after every file that has one)
    err = capsys.readouterr().err
    assert (final(run) in err and why in err) == record
    assert main(["eval", "glue", final(run), "--quiet"]) == 2  # eval of that one file: exit 2, naming it
    (line,) = errors(capsys)
    assert final(run) in line and why in line and "--trust-checkpoint" in line
    assert ("unsupported global" in line.lower() and "open" in line) == record  # what it asked to run
    for step in range(4):  # resume with no other checkpoint left: exit 2, naming it
        os.remove(ckpt.step_path(run, step))
    assert resume(run) == 2
    (line,) = errors(capsys)
    assert final(run) in line and "--resume" in line
    assert not os.path.exists(marker)  # ...and it never ran


def test_resume_passes_over_a_crafted_checkpoint(run, tmp_path, capsys):
    marker = str(tmp_path / "pwned")
    craft(final(run), marker, record=True)
    assert resume(run) == 0
    assert resumed_from(run) == ckpt.step_path(run, 3)
    assert "more than tensors and plain values" in capsys.readouterr().err
    assert not os.path.exists(marker)
    assert ckpt.load_checkpoint(final(run))["step"] == 4  # the resumed run wrote a good final.pt again


def test_newer_checkpoints_whose_records_are_lost_are_named(run, capsys):
    """A missing or unreadable record ranks a checkpoint last: the loader takes an older one and says which newer
    ones it could not check, instead of passing over them without a word."""
    os.remove(ckpt.record_path(final(run)))
    with open(ckpt.record_path(ckpt.step_path(run, 3)), "w") as f:
        f.write('{"bytes": 12')  # cut short
    payload = ckpt.load_checkpoint(run)
    assert payload["_path"] == ckpt.step_path(run, 2)
    err = capsys.readouterr().err
    for lost in (final(run), ckpt.step_path(run, 3)):
        assert f"{lost} was not used: its checksum record is missing or unreadable" in err
    assert ckpt.step_path(run, 1) not in err  # older ones with good records are not mentioned
    assert load_run(run).checkpoint == ckpt.step_path(run, 2)  # eval glue's loader names them as well
    assert f"{final(run)} was not used" in capsys.readouterr().err


def test_export_passes_over_a_crafted_checkpoint(run, tmp_path, capsys):
    pytest.importorskip("transformers")
    marker = str(tmp_path / "pwned")
    craft(final(run), marker, record=True)
    assert main(["export", "hf", run, "--out", str(tmp_path / "hf"), "--quiet"]) == 0
    assert "more than tensors and plain values" in capsys.readouterr().err
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["fastcram"]["checkpoint"] == os.path.basename(ckpt.step_path(run, 3))
    assert main(["export", "hf", run, "--checkpoint", final(run), "--out", str(tmp_path / "hf2"), "--quiet"]) == 2
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "hf2")


# ---------------------------------------------------------------- damaged files

@pytest.mark.parametrize("damage", ["flipped-byte", "truncated"])
def test_a_checkpoint_with_a_wrong_checksum_is_named_and_skipped(run, capsys, damage):
    raw = bytearray(open(final(run), "rb").read())
    if damage == "flipped-byte":
        raw[len(raw) // 2] ^= 0x10  # same size: only the SHA-256 sees it
    else:
        raw = raw[:-1000]
    open(final(run), "wb").write(raw)
    assert resume(run) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {final(run)} fails its checksum" in err and "trying an older checkpoint" in err
    assert resumed_from(run) == ckpt.step_path(run, 3)


def test_no_usable_checkpoint_left_exits_2(run, capsys):
    for path in ckpt.candidates(run):
        raw = bytearray(open(path, "rb").read())
        raw[100] ^= 1
        open(path, "wb").write(raw)
    assert resume(run) == 2
    err = capsys.readouterr().err
    assert err.count("fails its checksum") == 5  # one warning each; the error names the run
    assert main(["eval", "glue", run, "--quiet"]) == 2
    (line,) = errors(capsys)
    assert "none of the 5 checkpoints" in line


# ---------------------------------------------------------------- version 1

def make_version_1(path: str) -> None:
    """What fastcram wrote before format 2: RNG states as tuples and a numpy array, no format, no record."""
    payload = ckpt.load_checkpoint(path)
    payload.pop("format"), payload.pop("_path")
    rng = payload["rng"]
    rng["python"] = (rng["python"][0], tuple(rng["python"][1]), rng["python"][2])
    n = rng["numpy"]
    rng["numpy"] = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    torch.save(payload, path)
    os.remove(ckpt.record_path(path))


def test_version_1_is_refused_naming_the_flag_and_loads_with_it(run, capsys):
    for step in range(4):
        os.remove(ckpt.step_path(run, step))
    make_version_1(final(run))
    with pytest.raises(Exception):
        torch.load(final(run), weights_only=True)  # the premise: the safe loader cannot read it
    assert resume(run) == 2
    (line,) = errors(capsys)
    assert final(run) in line and "version-1" in line and "--trust-checkpoint" in line
    assert main(["eval", "glue", final(run), "--quiet"]) == 2
    assert "--trust-checkpoint" in errors(capsys)[0]
    assert load_run(final(run), trust=True).checkpoint == final(run)
    assert resume(run, "--trust-checkpoint", "--max-steps", "6") == 0
    assert resumed_from(run) == final(run)
    saved = ckpt.load_checkpoint(final(run))  # written again, in format 2
    assert saved["step"] == 6 and saved["format"] == 2


def test_killed_writes_leave_only_what_cleanup_removes(run):
    folder = os.path.join(run, "checkpoints")
    leftovers = ["step-00000009.pt.tmp123", "final.pt.sha256.json.tmp77", "step-00000009.pt.sha256.json"]
    mine = ["notes.tmp", "step-old.pt", "final.pt.bak"]  # not names fastcram gives: never touched
    for name in leftovers + mine:
        open(os.path.join(folder, name), "w").write("x")
    assert sorted(map(os.path.basename, ckpt.cleanup_temp_files(run))) == sorted(leftovers)
    assert all(os.path.exists(os.path.join(folder, n)) for n in mine)
    assert ckpt.candidates(run)[0] == final(run)
