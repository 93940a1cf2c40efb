import gzip
import json
import lzma
import os

import numpy as np
import pytest
import torch

from fastcram.config import DataConfig
from fastcram.data.loader import BlockDataset, BlockLoader, mask_batch
from fastcram.data.prepare import prepare
from fastcram.errors import UserError
from fastcram.data.tokenizer import load_tokenizer

from .helpers import write_small_corpus


def test_shards_and_manifest(small_data):
    ds = BlockDataset(small_data)
    m = ds.manifest
    assert m["total_blocks"] == len(ds) == sum(s["blocks"] for s in m["shards"])
    assert len(m["shards"]) >= 2  # shard_blocks=256 forces several shards
    for s in m["shards"]:
        assert os.path.getsize(os.path.join(small_data, s["file"])) == s["blocks"] * 128 * 2
    blocks = ds.gather(np.arange(len(ds)))
    assert blocks.shape == (len(ds), 128) and blocks.max() < ds.vocab_size
    # documents are joined with <sep>: it appears, and the stream decodes to real words
    assert (blocks == ds.special.sep).sum() >= m["filter"]["kept_docs"] - 1
    tok = load_tokenizer(os.path.join(small_data, "tokenizer.json"))
    assert "the" in tok.decode(blocks[0].tolist()).split()
    assert m["filter"]["kept_docs"] > 0 and m["tokenizer_hash"]


def test_compression_filter(tmp_path):
    good = "It is a truth universally acknowledged that a single man in possession of a good fortune must be in want of a wife. " * 40
    noise = "x7Q#zz9 kP2@w " * 300  # compresses badly: many tokens per character
    src = tmp_path / "c.jsonl"
    with open(src, "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": good}) + "\n")
            f.write(json.dumps({"text": noise}) + "\n")
    tok_dir = tmp_path / "tok"
    cfg = DataConfig(vocab_size=400, compression_threshold=0.25)
    m = prepare([str(src)], str(tok_dir), cfg, progress=False)
    tok = load_tokenizer(str(tok_dir / "tokenizer.json"))
    ratio_good = len(tok.encode(good).ids) / len(good)
    ratio_noise = len(tok.encode(noise).ids) / len(noise)
    assert ratio_good < 0.25 <= ratio_noise  # the premise of the test
    assert m["filter"]["kept_docs"] == 30 and m["filter"]["dropped_docs"] == 30
    # a threshold above both ratios keeps everything
    m2 = prepare([str(src)], str(tmp_path / "all"), DataConfig(vocab_size=400, compression_threshold=10.0),
                 tokenizer_path=str(tok_dir / "tokenizer.json"), progress=False)
    assert m2["filter"]["dropped_docs"] == 0 and m2["filter"]["kept_docs"] == 60


def test_reads_compressed_and_folders(tmp_path):
    src = write_small_corpus(str(tmp_path / "a.txt"), 60_000)
    text = open(src).read()
    folder = tmp_path / "in"
    folder.mkdir()
    with lzma.open(folder / "b.txt.xz", "wt") as f:
        f.write(text)
    with gzip.open(folder / "c.txt.gz", "wt") as f:
        f.write(text)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    m = prepare([str(folder)], str(tmp_path / "out"), DataConfig(vocab_size=300, compression_threshold=0.9),
                progress=False)
    assert [s["path"] for s in m["sources"]] == ["b.txt.xz", "c.txt.gz"]
    assert m["total_blocks"] > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_mask_count_and_80_10_10(seed):
    cfg = DataConfig()
    from fastcram.data.tokenizer import SpecialIds
    special = SpecialIds(0, 1, 2, 3, 4, 5, 6)
    V, B, L = 1000, 512, 128
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, V, (B, L), generator=g)
    b = mask_batch(ids, cfg, special, V, g)
    m = cfg.masked_per_seq
    assert m == 32
    assert b.positions.shape == (B * m,) and b.labels.shape == (B * m,)
    rows = b.positions // L
    assert torch.equal(torch.bincount(rows, minlength=B), torch.full((B,), m))  # exactly m per row
    assert len(torch.unique(b.positions)) == B * m  # distinct positions
    assert torch.equal(b.labels, ids.view(-1)[b.positions])  # labels are the original tokens
    chosen = b.input_ids.view(-1)[b.positions]
    frac_mask = (chosen == special.mask).float().mean().item()
    frac_same = (chosen == b.labels).float().mean().item()
    frac_rand = 1 - frac_mask - frac_same
    n = B * m  # 16384 draws: 3 sigma of a 10% rate is about 0.7%
    assert abs(frac_mask - 0.8) < 0.015 and abs(frac_rand - 0.1) < 0.012 and abs(frac_same - 0.1) < 0.012, n
    # positions not chosen are untouched; random replacements are never special tokens
    untouched = torch.ones(B * L, dtype=torch.bool)
    untouched[b.positions] = False
    assert torch.equal(b.input_ids.view(-1)[untouched], ids.view(-1)[untouched])
    assert (chosen[(chosen != special.mask)] >= 7).all()


def test_loader_is_deterministic_and_resumable(small_data):
    ds = BlockDataset(small_data)
    a = BlockLoader(ds, 8, seed=3)
    first = [a.next()[0] for _ in range(5)]
    pos = a.position
    nxt = a.next()[0]
    a.close()
    b = BlockLoader(ds, 8, seed=3, position=pos)
    assert torch.equal(b.next()[0], nxt)
    b.close()
    c = BlockLoader(ds, 8, seed=3)
    assert all(torch.equal(c.next()[0], f) for f in first)
    c.close()
    # an epoch covers every block at most once
    d = BlockLoader(ds, 8, seed=4)
    seen = torch.cat([d.next()[0] for _ in range(len(ds) // 8)])
    d.close()
    assert seen.shape[0] == (len(ds) // 8) * 8


def test_tokenizer_mismatch_is_refused(small_data, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(small_data, copy)
    from fastcram.data.tokenizer import train_tokenizer
    train_tokenizer(["other words entirely"] * 20, vocab_size=100, out_path=str(copy / "tokenizer.json"))
    with pytest.raises(UserError, match="does not match"):
        BlockDataset(str(copy))
