"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing half-written that looks valid."""
import os
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None, env_extra=None):
    env = {**os.environ, "FASTCRAM_CACHE": str(cwd or "."), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fastcram", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_one_line_error(res, *needles):
    """Progress lines may come first; the error is exactly one line, the last one."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def assert_no_valid_output(folder):
    assert not os.path.exists(os.path.join(folder, "manifest.json"))
    assert not [f for f in os.listdir(folder) if f.endswith(".bin")] if os.path.isdir(folder) else True


def test_missing_input_path(tmp_path):
    out = tmp_path / "out"
    res = run_cli("data", "prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(out))
    assert_one_line_error(res, "nope.txt", "does not exist")
    assert_no_valid_output(str(out))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "new" / "deeper" / "out"  # every folder prepare made for it is gone again
    res = run_cli("data", "prepare", "--input", str(tmp_path / "empty.txt"), "--out", str(out))
    assert_one_line_error(res, "empty.txt", "no text")
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


def test_folder_without_text_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "image.png").write_bytes(b"\x89PNG")
    res = run_cli("data", "prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert_one_line_error(res, "holds no text files")


def test_non_utf8_file_fails_naming_it(tmp_path):
    from .helpers import write_small_corpus
    folder = tmp_path / "in"
    write_small_corpus(str(folder / "a_good.txt"), 50_000)
    (folder / "b_bad.txt").write_bytes("caf\u00e9 latin-1 text\n".encode("latin-1") * 10)
    out = tmp_path / "out"
    res = run_cli("data", "prepare", "--input", str(folder), "--out", str(out), "--vocab-size", "300")
    assert_one_line_error(res, "b_bad.txt", "not UTF-8")
    assert_no_valid_output(str(out))


def test_data_folder_without_manifest(tmp_path):
    (tmp_path / "data").mkdir()
    res = run_cli("train", "--preset", "tiny", "--minutes", "1", "--data", str(tmp_path / "data"),
                  "--out", str(tmp_path / "run"))
    assert_one_line_error(res, "manifest.json", "fastcram data prepare")


def test_tokenizer_not_matching_shards(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    from fastcram.data.tokenizer import train_tokenizer
    train_tokenizer(["some other text"] * 30, vocab_size=100, out_path=str(data / "tokenizer.json"))
    res = run_cli("train", "--preset", "tiny", "--minutes", "1", "--data", str(data), "--out", str(tmp_path / "r"))
    assert_one_line_error(res, "tokenizer.json", "does not match")


@pytest.mark.parametrize("flag, value", [("--minutes", "0"), ("--hours", "-1"), ("--minutes", "abc"),
                                         ("--hours", "1e308"), ("--minutes", "1e307")])
def test_zero_or_negative_budget(tmp_path, flag, value):
    res = run_cli("train", flag, value, "--out", str(tmp_path / "run"))
    assert_one_line_error(res, flag)
    assert not (tmp_path / "run").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    res = run_cli("train", "--resume", str(tmp_path / "notarun"))
    assert_one_line_error(res, "notarun", "not a fastcram run folder")
