"""Every output path is checked before any work starts: --out and --csv of every command and the cache folder.
A folder where a file goes, a file where a folder goes, a missing folder, a read-only place and a full disk
each get one line naming the flag and the file and the fix, exit code 2, and nothing is written."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastcram.cli import main

from .disk import readonly_dir, small_disk  # noqa: F401 (fixtures)
from .helpers import write_small_corpus


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    return write_small_corpus(str(tmp_path_factory.mktemp("text") / "t.txt"), 30_000)


@pytest.fixture
def places(tmp_path, readonly_dir, small_disk):  # noqa: F811
    """Where an output cannot go: name -> (a path for a file output, a path for a folder output, what the line
    says). A file where a folder goes is "a-file"; a folder where a file goes, "a-folder"."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (folder / "mine.txt").write_text("the user's")
    disk = small_disk(1 << 20)
    disk.fill()
    out = {
        "a-file": (None, str(a_file), "is a file"),
        "a-folder": (str(folder), str(folder), "is a folder"),
        "under-a-file": (str(a_file / "x.out"), str(a_file / "d"), "is a file, not a folder"),
        "missing-folder": (str(tmp_path / "nope" / "x.out"), None, "does not exist; create it first"),
        "read-only": (os.path.join(readonly_dir, "x.out"), os.path.join(readonly_dir, "d"), "cannot write in")
        if readonly_dir else None,
        "full-disk": (os.path.join(disk.root, "x.out"), os.path.join(disk.root, "d"), "(ENOSPC)"),
    }
    return _Places(out)


class _Places(dict):
    def __getitem__(self, name):
        value = super().__getitem__(name)
        if value is None:
            pytest.skip("root can write into any folder and this machine allows no read-only mount")
        return value


def _check(capsys, rc, flag, path, says, *, nothing_at=None):
    line = error_line(capsys)
    assert rc == 2 and flag in line and says in line, line
    if path:
        assert path in line or os.path.dirname(path) in line, line
    if nothing_at:
        assert not os.path.exists(nothing_at)


PLACE_NAMES = ["a-folder", "under-a-file", "missing-folder", "read-only", "full-disk"]


@pytest.mark.parametrize("place", PLACE_NAMES)
def test_tokenizer_train_out(text, places, capsys, place):
    path, _, says = places[place]
    rc = main(["tokenizer", "train", "--input", text, "--out", path, "--vocab-size", "100"])
    _check(capsys, rc, "--out", path, says)
    if place == "a-folder":
        assert os.listdir(path) == ["mine.txt"]  # no temp file or folder left


@pytest.mark.parametrize("place", ["a-file", "a-folder", "under-a-file", "read-only", "full-disk"])
def test_data_prepare_out(text, places, tmp_path, capsys, place):
    _, path, says = places[place]
    says = "is not empty" if place == "a-folder" else says
    rc = main(["data", "prepare", "--input", text, "--out", path, "--vocab-size", "100", "--quiet"])
    _check(capsys, rc, "--out", path, says)


@pytest.fixture(scope="module")
def a_run(small_data, tmp_path_factory) -> str:
    """A run folder with a log (plot reads it) and nothing else: a command that got past its output check
    would fail on it in another way."""
    run = tmp_path_factory.mktemp("runs") / "run"
    run.mkdir()
    recs = [{"time": 1.0, "step": i, "loss": 6.0 - i / 10, "lr": 1e-3, "batch_size": 8, "tokens_per_s": 1e4,
             "mfu": None, "progress": i / 10} for i in range(1, 6)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "config.json").write_text("{}")
    return str(run)


@pytest.mark.parametrize("place", PLACE_NAMES)
def test_plot_out(a_run, places, capsys, place):
    pytest.importorskip("matplotlib")
    path, _, says = places[place]
    rc = main(["plot", a_run, "--out", path])
    _check(capsys, rc, "--out", path, says)


def test_plot_into_a_run_folder_that_cannot_be_written(a_run, small_disk, capsys):
    import shutil
    disk = small_disk(1 << 20)
    run = shutil.copytree(a_run, os.path.join(disk.root, "run"))
    disk.fill()
    rc = main(["plot", run])
    _check(capsys, rc, "--out", os.path.join(run, "run.png"), "(ENOSPC)", nothing_at=os.path.join(run, "run.png"))


@pytest.mark.parametrize("place", [p for p in PLACE_NAMES if p != "missing-folder"] + ["md-name"])
def test_eval_glue_out_is_checked_before_any_fine_tuning(a_run, places, tmp_path, capsys, place):
    path, _, says = places[place] if place != "md-name" else (str(tmp_path / "res.md"), None, "give a .json name")
    # a_run has no checkpoint: past the check, the command would stop on that instead
    rc = main(["eval", "glue", a_run, "--out", path, "--tasks", "rte", "--quiet"])
    _check(capsys, rc, "--out", path, says)


def test_eval_glue_default_report_in_a_full_run_folder(a_run, small_disk, capsys):
    import shutil
    disk = small_disk(1 << 20)
    run = shutil.copytree(a_run, os.path.join(disk.root, "run"))
    disk.fill()
    rc = main(["eval", "glue", run, "--tasks", "rte", "--quiet"])
    _check(capsys, rc, "--out", os.path.join(run, "glue.json"), "(ENOSPC)")


@pytest.mark.parametrize("kind", ["kernels", "step", "compile"])
@pytest.mark.parametrize("place", ["a-folder", "under-a-file", "read-only", "full-disk"])
def test_bench_csv(places, capsys, kind, place):
    path, _, says = places[place]
    extra = {"kernels": ["--quick", "--ops", "layer_norm", "--device", "cpu", "--no-compile"],
             "step": ["--steps", "1", "--repeats", "1", "--device", "cpu", "--no-compile"],
             "compile": ["--ops", "layer_norm", "--micro-batches", "8"]}[kind]
    rc = main(["bench", kind, "--csv", path, *extra])
    _check(capsys, rc, "--csv", path, says)


@pytest.mark.parametrize("place", ["under-a-file", "read-only", "full-disk"])
def test_bench_plot_out(places, tmp_path, capsys, place):
    _, path, says = places[place]
    csv = tmp_path / "k.csv"
    csv.write_text("op,provider\n")
    rc = main(["bench", "plot", str(csv), "--out", path])
    _check(capsys, rc, "--out", path, says)


@pytest.mark.parametrize("place", ["a-file", "read-only", "full-disk"])
def test_train_out(small_data, places, tmp_path, capsys, place):
    _, path, says = places[place]
    rc = main(["train", "--preset", "tiny", "--data", small_data, "--out", path, "--device", "cpu", "--no-compile",
               "--minutes", "1", "--quiet"])
    _check(capsys, rc, "--out", path, says)


@pytest.mark.parametrize("place", ["a-file", "read-only", "full-disk"])
def test_speedrun_out(heldout_data, places, tmp_path, capsys, place):
    _, path, says = places[place]
    rc = main(["bench", "speedrun", "--target-loss", "5", "--data", heldout_data, "--out", path, "--json",
               str(tmp_path / "r.json")])
    _check(capsys, rc, "--out", path, says)


@pytest.mark.parametrize("place", ["a-file", "read-only", "full-disk"])
def test_export_hf_out(a_run, places, tmp_path, capsys, place):
    for name in ("transformers", "safetensors", "accelerate"):
        pytest.importorskip(name, reason="the hf extra is not installed")
    _, path, says = places[place]
    says = "already exists" if place == "a-file" else says
    rc = main(["export", "hf", a_run, "--out", path, "--quiet"])
    _check(capsys, rc, "--out", path, says)


@pytest.mark.parametrize("uses", ["built-in-corpus", "compile-caches", "eager", "tuning-cache"])
@pytest.mark.parametrize("place", ["a-file", "read-only", "full-disk"])
def test_cache_folder(small_data, places, tmp_path, monkeypatch, capsys, place, uses):
    _, path, says = places[place]
    monkeypatch.setenv("FASTCRAM_CACHE", path)
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    how = {"built-in-corpus": ["--no-compile"], "compile-caches": ["--data", small_data, "--compile"],
           "eager": ["--data", small_data, "--no-compile"],  # importing torch's compiler makes inductor's folder
           "tuning-cache": ["--data", small_data, "--no-compile", "--micro-batch", "auto"]}[uses]
    rc = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--device", "cpu", "--minutes", "1",
               "--quiet", *how])
    line = error_line(capsys)
    assert rc == 2 and f"FASTCRAM_CACHE={path}" in line and says in line, line
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")  # checked before any work


def test_a_cache_folder_nothing_is_placed_in_is_not_checked(places, tmp_path, monkeypatch):
    """Both compile caches set by the user: an unusable FASTCRAM_CACHE is none of the compile caches' business."""
    from fastcram.train.compile_cache import compile_caches

    monkeypatch.setenv("FASTCRAM_CACHE", places["a-file"][1])
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    with compile_caches() as info:
        assert {v["set_by"] for v in info.values()} == {"the environment, TORCHINDUCTOR_CACHE_DIR",
                                                         "the environment, TRITON_CACHE_DIR"}
    monkeypatch.delenv("TRITON_CACHE_DIR")  # one placed there: checked, one line naming FASTCRAM_CACHE
    with pytest.raises(Exception, match="FASTCRAM_CACHE"):
        with compile_caches():
            pass


@pytest.mark.parametrize("place", ["a-file", "read-only", "full-disk"])
def test_cache_folder_of_the_step_benchmark(places, tmp_path, monkeypatch, capsys, place):
    """bench step puts inductor's and Triton's caches into the cache folder: checked before any variant."""
    _, path, says = places[place]
    monkeypatch.setenv("FASTCRAM_CACHE", path)
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    csv_path = tmp_path / "step.csv"
    rc = main(["bench", "step", "--device", "cpu", "--preset", "tiny", "--micro-batch", "2", "--steps", "1",
               "--warmup", "1", "--repeats", "3", "--variants", "kernels=torch", "--csv", str(csv_path)])
    line = error_line(capsys)
    assert rc == 2 and f"FASTCRAM_CACHE={path}" in line and says in line, line
    assert not csv_path.exists()


def test_a_tuning_cache_that_cannot_be_written_is_said_and_not_fatal(small_disk, capsys):
    from fastcram.train import tune_cache
    disk = small_disk(1 << 20)
    disk.fill()
    assert tune_cache.save_result({"k": 1}, {"choice": {"kernels": "torch"}}, root=disk.root) is None
    tune_cache.save_cost("abc", 1.5, root=disk.root)
    err = capsys.readouterr().err
    assert err.count("tuning cache: cannot write") == 2 and "(ENOSPC)" in err and "not remembered" in err


# ---------------------------------------------------------------- other bad input that used to crash

@pytest.mark.parametrize("argv, needle", [
    (["profile", "--warmup", "-5"], "--warmup must be 0 or more"),
    (["train", "--lr", "inf"], "--lr must be a finite positive number"),
    (["train", "--minutes", "inf"], "--minutes must be a finite positive number"),
    (["train", "--hours", "nan"], "--hours must be a finite positive number"),
    (["bench", "step", "--peak-tflops", "-1"], "--peak-tflops must be a finite positive number"),
])
def test_bad_flag_values_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in error_line(capsys)


def test_a_vocabulary_smaller_than_asked_is_said(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("a")
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--input", str(tmp_path / "tiny.txt"), "--out", str(out),
                 "--vocab-size", "300"]) == 0
    err = capsys.readouterr().err
    assert out.exists() and "--vocab-size 300 asked for more than this text holds" in err


def test_tokenizer_train_on_an_empty_file_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    out = tmp_path / "tok.json"
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "empty.txt"), "--out", str(out)])
    assert rc == 2 and "holds no text" in error_line(capsys) and not out.exists()
    assert os.listdir(tmp_path) == ["empty.txt"]


def test_a_run_that_never_starts_leaves_no_folder_of_its_own(tmp_path, capsys):
    """Bad data found after the run folder was made: the folder train made goes again; one the user made stays."""
    base = ["train", "--preset", "tiny", "--data", str(tmp_path / "nowhere"), "--device", "cpu", "--no-compile",
            "--quiet"]
    assert main(base + ["--out", str(tmp_path / "new")]) == 2
    assert "nowhere" in error_line(capsys) and not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert main(base + ["--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()


def test_little_room_for_checkpoints_is_said_before_training(small_data, small_disk, capsys):
    disk = small_disk(12 << 20)  # one checkpoint of the test model (~5.5 MiB) fits, four do not
    if disk.kind != "tmpfs":
        pytest.skip("statvfs sees the real disk where the small one is only simulated")
    assert main(["train", "--preset", "tiny", "--data", small_data, "--out", os.path.join(disk.root, "run"),
                 "--device", "cpu", "--no-compile", "--max-steps", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "MiB free; keeping 2 checkpoint(s), final.pt and the one being written takes about" in err


def test_flags_a_resumed_run_ignores_are_named(small_data, tmp_path, capsys):
    run = str(tmp_path / "run")
    base = ["--device", "cpu", "--no-compile", "--quiet"]
    assert main(["train", "--preset", "tiny", "--data", small_data, "--out", run, "--micro-batch", "8",
                 "--max-steps", "2", "--minutes", "600", *base]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", run, "--max-steps", "3", "--micro-batch", "16", "--kernels", "triton",
                 "--keep-checkpoints", "5", "--eval-every=0", *base]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "ignored:" in ln]
    assert "--micro-batch 16" in line and "--kernels triton" in line and "--keep-checkpoints 5" in line
    assert "--eval-every 0" in line and "(" not in line.split("ignored:")[1].split(" (a resumed")[0]  # as typed
    assert "--max-steps" not in line.split("ignored:")[1].split("(")[0]  # that one a resumed run takes


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(small_data, tmp_path, capsys):
    run = str(tmp_path / "run")
    base = ["--device", "cpu", "--no-compile", "--quiet"]
    assert main(["train", "--preset", "tiny", "--data", small_data, "--out", run, "--micro-batch", "8",
                 "--max-steps", "2", "--minutes", "600", *base]) == 0
    import shutil
    shutil.rmtree(os.path.join(run, "checkpoints"))  # as if killed before its first checkpoint
    capsys.readouterr()
    assert main(["train", "--out", run, "--preset", "tiny", *base]) == 2  # a new run there: pointed at --resume
    assert f"--resume {run}" in error_line(capsys)
    assert main(["train", "--resume", run, *base]) == 0  # ...which starts it again instead of sending it back
    assert "starting it again from step 0" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(run, "checkpoints", "final.pt"))


@pytest.mark.slow
def test_ctrl_c_in_the_first_seconds_of_train_is_one_line(small_data, tmp_path):
    """SIGINT at moments from importing the command line (torch among it) to the first steps: never a traceback.
    (Earlier than about 0.3 s the Python interpreter itself is still starting, before any fastcram code runs.)"""
    for i, delay in enumerate((0.5, 0.8, 1.2, 2.0, 3.0)):
        out = str(tmp_path / f"run{i}")
        proc = subprocess.Popen([sys.executable, "-m", "fastcram", "train", "--preset", "tiny", "--data", small_data,
                                 "--out", out, "--device", "cpu", "--no-compile", "--micro-batch", "8", "--minutes",
                                 "1"], stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, (delay, err[-3000:])
        # 130, or death by SIGINT (-2: a shell shows 130 as well) when the interrupt lands in interpreter shutdown
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, err[-2000:])
        if proc.returncode != 0:
            assert err.strip().splitlines()[-1] == "fastcram: interrupted"
        else:  # the loop had started: it saved and says how to resume
            assert f"resume with: fastcram train --resume {out}" in err
