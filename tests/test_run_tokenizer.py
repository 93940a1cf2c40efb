"""run_tokenizer: the one lookup of a run's tokenizer that GLUE and the export share. Each refusal is checked
against a folder built to trip exactly that rule; the accepted cases against the tokenizer's own fingerprint."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from fastcram.data.prepare import MANIFEST, TOKENIZER_FILE
from fastcram.data.run_tokenizer import run_tokenizer
from fastcram.data.tokenizer import load_tokenizer, tokenizer_hash
from fastcram.errors import UserError


@pytest.fixture
def data_dir(small_data, tmp_path) -> str:
    """A writable copy of the small prepared corpus (its manifest and tokenizer only)."""
    out = tmp_path / "data"
    out.mkdir()
    for name in (MANIFEST, TOKENIZER_FILE):
        shutil.copy(os.path.join(small_data, name), out / name)
    return str(out)


def _edit_manifest(data_dir: str, **changes) -> None:
    path = os.path.join(data_dir, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(changes)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _vocab(data_dir: str) -> int:
    return load_tokenizer(os.path.join(data_dir, TOKENIZER_FILE)).get_vocab_size()


def test_finds_the_manifests_tokenizer_and_checks_its_fingerprint(data_dir):
    found = run_tokenizer({"data_dir": data_dir}, _vocab(data_dir), "RUN")
    assert found.path == os.path.join(data_dir, TOKENIZER_FILE)
    assert found.manifest_path == os.path.join(data_dir, MANIFEST)
    with open(found.manifest_path) as f:
        assert found.hash == json.load(f)["tokenizer_hash"] == tokenizer_hash(found.tokenizer)
    assert found.special.pad == 0


def test_without_a_manifest_the_folders_tokenizer_is_used(data_dir):
    os.remove(os.path.join(data_dir, MANIFEST))
    found = run_tokenizer({"data_dir": data_dir}, _vocab(data_dir), "RUN")
    assert found.manifest_path is None and found.path.endswith(TOKENIZER_FILE)


@pytest.mark.parametrize("name", ["/etc/passwd", "../tokenizer.json", "sub/../../x.json"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(data_dir, name):
    _edit_manifest(data_dir, tokenizer=name)
    with pytest.raises(UserError, match="not in .*--tokenizer FILE"):
        run_tokenizer({"data_dir": data_dir}, _vocab(data_dir), "RUN")


def test_a_tokenizer_of_other_data_is_refused(data_dir, tmp_path):
    """Two ordinary tokens swap ids: same size, same special ids, a different vocabulary."""
    with open(os.path.join(data_dir, TOKENIZER_FILE)) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = str(tmp_path / "other.json")
    with open(other, "w") as f:
        json.dump(spec, f)
    with pytest.raises(UserError, match="other.json is not the tokenizer .* fingerprint differs"):
        run_tokenizer({"data_dir": data_dir}, _vocab(data_dir), "RUN", override=other)
    _edit_manifest(data_dir, tokenizer_hash=tokenizer_hash(load_tokenizer(other)))  # the manifest vouches for it
    assert run_tokenizer({"data_dir": data_dir}, _vocab(data_dir), "RUN", override=other).path == other


def test_a_vocabulary_size_other_than_the_models_is_refused(data_dir):
    with pytest.raises(UserError, match=r"has \d+ tokens but the model of RUN has 7"):
        run_tokenizer({"data_dir": data_dir}, 7, "RUN")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_damaged_manifest_is_named(data_dir, content):
    with open(os.path.join(data_dir, MANIFEST), "w") as f:
        f.write(content)
    with pytest.raises(UserError, match=f"{MANIFEST}.*--tokenizer FILE"):
        run_tokenizer({"data_dir": data_dir}, _vocab(data_dir), "RUN")


def test_no_data_folder_and_no_override_says_what_to_pass():
    with pytest.raises(UserError, match="records no data folder.*--tokenizer FILE"):
        run_tokenizer({}, 512, "RUN")
