"""fastcram deletes or overwrites only files it wrote: `data prepare --out` refuses a folder of the user's, and a
journal or manifest that names a file outside its folder is refused before anything is read or deleted; and
`data prepare` is reproducible: the same command twice gives the same bytes."""
import json
import os

import numpy as np
import pytest

import fastcram.data.prepare as prep
from fastcram.cli import main
from fastcram.config import DataConfig
from fastcram.data.loader import BlockDataset
from fastcram.data.prepare import PrepareOptions, prepare
from fastcram.errors import UserError
from fastcram.files import inside
from tests.helpers import write_small_corpus

CFG = DataConfig(vocab_size=600, compression_threshold=0.9, shard_blocks=32, doc_chars=1500)
USER_FILES = ["notes.tmpl", "thesis.tmp.docx", "bucket-list.md", "shard-plan.txt", "stream-of-consciousness.txt",
              "shard-00000.bin", "prepare-state.json.bak", "tokenizer.json.tmp"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_small_corpus(str(tmp_path_factory.mktemp("src") / "corpus.txt"), 120_000)


def snapshot(folder) -> dict:
    """Every file under folder (not following links) -> (bytes, mtime_ns)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for f in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.join(root, f)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (b"" if os.path.islink(p) else open(p, "rb").read(), st.st_mtime_ns)
    return out


def folder_bytes(folder) -> dict:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_same_prepare_twice_gives_the_same_bytes(corpus, tmp_path, capsys):
    """The tokenizer is trained each time; 2 workers, then the same command again, then 1 worker."""
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, workers in zip(outs, ("2", "2", "1")):
        assert main(["data", "prepare", "--input", corpus, "--out", str(out), "--vocab-size", "600",
                     "--compression-threshold", "0.9", "--shard-blocks", "32", "--workers", workers, "--quiet"]) == 0
    a, b, c = (folder_bytes(o) for o in outs)
    manifests = [json.loads(x.pop("manifest.json")) for x in (a, b, c)]
    assert a == b == c and len(a) > 3 and "tokenizer.json" in a
    for m in manifests:
        m.pop("created")
    assert manifests[0] == manifests[1] == manifests[2]


def test_a_folder_of_user_files_survives_prepare_out(corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name in USER_FILES:
        (out / name).write_text(f"the user's {name}")
    (out / "sub").mkdir()
    (out / "sub" / "shard-00001.bin").write_bytes(b"x" * 256)
    before = snapshot(tmp_path)
    assert main(["data", "prepare", "--input", corpus, "--out", str(out), "--vocab-size", "600",
                 "--compression-threshold", "0.9", "--quiet"]) == 2  # input that would prepare fine elsewhere
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not empty" in err and str(out) in err and "--out" in err
    assert snapshot(tmp_path) == before
    with pytest.raises(UserError, match="is a file"):
        prepare([corpus], str(out / "notes.tmpl"), CFG, progress=False)
    assert snapshot(tmp_path) == before


def test_an_empty_folder_or_a_lone_journal_temp_file_is_fine(corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    prepare([corpus], str(tmp_path / "empty"), CFG, progress=False, options=PrepareOptions(workers=1))
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "prepare-state.json.tmp4242").write_text("{")  # the very first journal write was cut
    prepare([corpus], str(tmp_path / "killed"), CFG, progress=False, options=PrepareOptions(workers=1))
    assert folder_bytes(tmp_path / "killed").keys() == folder_bytes(tmp_path / "empty").keys()


class Interrupt(KeyboardInterrupt):
    pass


def unfinished_in_scatter(corpus, out, monkeypatch) -> dict:
    """An unfinished prepare stopped after its first stream shard was scattered (and deleted)."""
    def stop(state):
        if state["phase"] == "scatter" and state["scatter"] and state["scatter"]["next"] == 1:
            raise Interrupt()

    monkeypatch.setattr(prep, "_after_journal", stop)
    with pytest.raises(Interrupt):
        prepare([corpus], str(out), CFG, progress=False, options=PrepareOptions(workers=1, chunk_chars=20_000))
    monkeypatch.setattr(prep, "_after_journal", lambda state: None)
    return json.load(open(out / prep.JOURNAL))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link", "not-a-shard-name"])
def test_a_crafted_journal_naming_an_outside_file_is_refused(corpus, tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    state = unfinished_in_scatter(corpus, out, monkeypatch)
    assert len(state["stream"]["shards"]) >= 2
    victim = tmp_path / "victim.bin"
    victim.write_bytes(np.arange(CFG.seq_len * 4, dtype=np.uint16).tobytes())  # reads as 4 blocks
    name = {"absolute": str(victim), "dotdot": "../victim.bin", "link": "stream-00077.bin",
            "not-a-shard-name": "victim.bin"}[how]
    if how == "link":
        os.symlink(victim, out / name)
    if how == "not-a-shard-name":
        os.link(victim, out / name)  # inside the folder, but not a name the prepare gives its files
    state["stream"]["shards"][0]["file"] = name  # the one a resume deletes at once (already scattered)
    state["stream"]["shards"][1]["file"] = name  # the one it would read, scatter, then delete
    (out / prep.JOURNAL).write_text(json.dumps(state))
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=f"{prep.JOURNAL} names a file that is not this prepare's"):
        prepare([corpus], str(out), CFG, progress=False, options=PrepareOptions(workers=1, chunk_chars=20_000))
    assert snapshot(tmp_path) == before


def test_a_link_among_an_unfinished_prepares_files_is_refused(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    unfinished_in_scatter(corpus, out, monkeypatch)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"the user's" * 1000)
    bucket = next(f for f in sorted(os.listdir(out)) if f.startswith("bucket-"))
    os.remove(out / bucket)
    os.symlink(victim, out / bucket)  # a resume would truncate, then append to, the bucket
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=f"{bucket} is a link"):
        prepare([corpus], str(out), CFG, progress=False, options=PrepareOptions(workers=1, chunk_chars=20_000))
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("prepared") / "data")
    prepare([corpus], out, CFG, progress=False, options=PrepareOptions(workers=1))
    return out


@pytest.mark.parametrize("field", ["shard", "tokenizer"])
@pytest.mark.parametrize("how", ["absolute", "dotdot", "link"])
def test_a_crafted_manifest_naming_an_outside_file_is_refused(prepared, tmp_path, field, how, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for f in os.listdir(prepared):
        os.link(os.path.join(prepared, f), data / f)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    m = json.load(open(data / "manifest.json"))
    target = m["shards"][0]["file"] if field == "shard" else m["tokenizer"]
    os.link(data / target, outside / target)  # a valid file: only where it lies is wrong
    name = {"absolute": str(outside / target), "dotdot": f"../elsewhere/{target}", "link": "linked"}[how]
    if how == "link":
        os.symlink(outside / target, data / "linked")
    if field == "shard":
        m["shards"][0]["file"] = name
    else:
        m["tokenizer"] = name
    os.remove(data / "manifest.json")
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="manifest.json names a file that is not in"):
        BlockDataset(str(data))
    rc = main(["train", "--preset", "tiny", "--minutes", "1", "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "names a file that is not in" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_inside_accepts_plain_names_only(tmp_path):
    assert inside(str(tmp_path), "shard-00001.bin") == os.path.join(str(tmp_path), "shard-00001.bin")
    for bad in ["", "/etc/passwd", "../x", "a/../../x", "./x", "a//b", None, 3, "x\0y"]:
        with pytest.raises(ValueError):
            inside(str(tmp_path), bad)


def test_train_and_tokenizer_outputs_never_replace_user_files(corpus, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("the user's")
    (tmp_path / "tok.json").write_text("the user's")
    before = snapshot(tmp_path)
    assert main(["train", "--preset", "tiny", "--minutes", "1", "--out", str(mine), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", corpus, "--out", str(tmp_path / "tok.json")]) == 2
    assert "does not overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
