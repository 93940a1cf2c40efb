"""data prepare at scale: every input format, hf: datasets offline, weighted mixes and limits, 1 vs N workers,
interrupt-and-resume, block orders, bounded memory; and the two-level shuffled loader."""
import dataclasses
import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastcram.data.loader as loader_mod
import fastcram.data.prepare as prep
from fastcram.config import DataConfig
from fastcram.data.builtin import builtin_corpus_path
from fastcram.data.loader import BlockDataset, BlockLoader, DataPosition, EpochOrder
from fastcram.data.prepare import PrepareOptions, prepare
from fastcram.data.sources import _plain_documents, iter_documents
from fastcram.data.tokenizer import train_tokenizer
from fastcram.errors import UserError
from tests.helpers import held_out_indices
from tests.test_tokenizer import byte_level_bpe
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = DataConfig(vocab_size=400, compression_threshold=0.9, shard_blocks=64, doc_chars=1500)
SMALL = dict(chunk_chars=20_000, workers=1)  # many chunks and shards from a small corpus


def _corpus_text(chars: int) -> str:
    with lzma.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        return f.read(chars)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """About 400 KB of real prose as ~270 documents."""
    return list(_plain_documents(_corpus_text(400_000).splitlines(), CFG.doc_chars))


@pytest.fixture(scope="module")
def work(tmp_path_factory, docs):
    """A folder with the documents as JSONL and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("scale")
    write_jsonl(str(root / "docs.jsonl"), docs)
    train_tokenizer(docs, CFG.vocab_size, out_path=str(root / "tok.json"))
    return root


def write_jsonl(path: str, docs, opener=open, field="text") -> str:
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "meta": 1}) + "\n")
    return path


def write_parquet(path: str, docs) -> str:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": list(docs), "n": list(range(len(docs)))}), path, row_group_size=50)
    return path


def run_prepare(work, out: str, inputs=None, **opts) -> dict:
    options = PrepareOptions(**{**SMALL, **opts})
    return prepare(inputs or [str(work / "docs.jsonl")], str(out), CFG, tokenizer_path=str(work / "tok.json"),
                   progress=False, options=options)


def shard_bytes(folder) -> dict[str, bytes]:
    """Training and held-out shards."""
    m = json.load(open(os.path.join(folder, "manifest.json")))
    return {s["file"]: open(os.path.join(folder, s["file"]), "rb").read()
            for s in m["shards"] + m["holdout"]["shards"]}


def all_blocks(folder) -> np.ndarray:
    ds = BlockDataset(str(folder))
    return ds.gather(np.arange(len(ds)))


def same_manifest(a: dict, b: dict) -> bool:
    drop = ("created", "inputs", "sources")  # input paths differ between runs; content is compared
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def rows(blocks: np.ndarray) -> np.ndarray:
    """Blocks sorted as rows: a multiset to compare orders by."""
    return blocks[np.lexsort(blocks.T[::-1])]


@pytest.fixture(scope="module")
def reference(work, tmp_path_factory):
    """Uninterrupted prepares, one per order, to compare other runs with."""
    root = tmp_path_factory.mktemp("ref")
    return {order: (str(root / order), run_prepare(work, root / order, order=order))
            for order in ("stream", "shuffle", "curriculum")}


# ---------------------------------------------------------------- inputs

@pytest.mark.parametrize("suffix", ["", ".gz", ".xz", ".zst"])
def test_jsonl_and_txt_readers(tmp_path, docs, suffix):
    if suffix == ".zst":
        zstd = pytest.importorskip("zstandard")
    opener = {"": open, ".gz": gzip.open, ".xz": lzma.open}.get(suffix) or zstd.open
    path = write_jsonl(str(tmp_path / f"d.jsonl{suffix}"), docs, opener)
    assert list(iter_documents([path], 1500)) == docs
    text = _corpus_text(50_000)
    with opener(str(tmp_path / f"t.txt{suffix}"), "wt", encoding="utf-8") as f:
        f.write(text)
    assert list(iter_documents([str(tmp_path / f"t.txt{suffix}")], 1500)) == \
        list(_plain_documents(text.splitlines(), 1500))


def test_parquet_gives_the_same_shards_as_jsonl(work, tmp_path, docs, reference):
    folder = tmp_path / "pq"
    folder.mkdir()
    write_parquet(str(folder / "a.parquet"), docs[:100])
    write_parquet(str(folder / "b.parquet"), docs[100:])
    assert list(iter_documents([str(folder / "a.parquet"), str(folder / "b.parquet")], 1500)) == docs
    m = run_prepare(work, tmp_path / "out", [str(folder)], order="stream")
    assert shard_bytes(tmp_path / "out") == shard_bytes(reference["stream"][0])
    assert same_manifest(m, reference["stream"][1])


def test_bad_text_field_is_named(work, tmp_path, docs):
    path = write_jsonl(str(tmp_path / "d.jsonl"), docs[:3], field="body")
    with pytest.raises(UserError, match="d.jsonl:1.*\"text\""):
        run_prepare(work, tmp_path / "out", [path])
    assert not os.path.exists(tmp_path / "out")  # the folder it made for the output is gone with it
    m = run_prepare(work, tmp_path / "ok", [path], text_field="body", order="stream")
    assert m["inputs"][0]["docs"] == 3


def test_hf_dataset_from_local_files_offline(work, tmp_path, docs, reference):
    """`hf:FOLDER` streamed by the datasets library, offline, through the CLI, gives the local run's shards."""
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    write_parquet(str(folder / "train-00000-of-00002.parquet"), docs[:150])
    write_parquet(str(folder / "train-00001-of-00002.parquet"), docs[150:])
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "fastcram", "data", "prepare", "--input", f"hf:{folder}::train",
                          "--out", str(out), "--tokenizer", str(work / "tok.json"), "--order", "stream",
                          "--compression-threshold", "0.9", "--shard-blocks", "64", "--workers", "1", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert shard_bytes(out) == shard_bytes(reference["stream"][0])
    m = json.load(open(out / "manifest.json"))
    assert m["inputs"][0]["input"] == f"hf:{folder}::train" and m["inputs"][0]["docs"] == len(docs)
    # a dataset that is not there is one clear line, even offline
    res = subprocess.run([sys.executable, "-m", "fastcram", "data", "prepare", "--input", "hf:no-such/dataset",
                          "--out", str(tmp_path / "x"), "--tokenizer", str(work / "tok.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "hf:no-such/dataset" in res.stderr


# ---------------------------------------------------------------- mixing and limits

def test_weighted_mix_and_limits(work, tmp_path, docs):
    a = write_jsonl(str(tmp_path / "a.jsonl"), docs[:120])
    b = write_jsonl(str(tmp_path / "b.jsonl"), docs[120:])
    m = run_prepare(work, tmp_path / "w", [a, b], weights=[1.0, 3.0], order="stream")
    ia, ib = m["inputs"]
    share = ia["chars"] / (ia["chars"] + ib["chars"])
    assert abs(share - 0.25) < 2 * CFG.doc_chars / (ia["chars"] + ib["chars"])  # within a document or two
    assert ib["docs"] == len(docs) - 120 and ia["docs"] < 120  # ends when the first input (b) runs out
    # without weights everything is read, and a prefix already holds both inputs
    m = run_prepare(work, tmp_path / "all", [a, b], order="stream")
    assert [i["docs"] for i in m["inputs"]] == [120, len(docs) - 120]
    m = run_prepare(work, tmp_path / "few", [a, b], order="stream", max_documents=11)
    assert sum(i["docs"] for i in m["inputs"]) == 11 and min(i["docs"] for i in m["inputs"]) >= 4
    m = run_prepare(work, tmp_path / "tok", [a, b], order="shuffle", max_tokens=100 * 128 + 5)
    assert m["total_blocks"] == 100
    with pytest.raises(UserError, match="--weights gives 1 weight"):
        run_prepare(work, tmp_path / "bad", [a, b], weights=[1.0])


def test_tokenizer_trained_on_a_sample(tmp_path, docs):
    cyrillic = ["жук жаба жираф " * 40] * 30  # characters that appear only after the sample
    path = write_jsonl(str(tmp_path / "d.jsonl"), docs[:60] + cyrillic)
    opts = PrepareOptions(order="stream", workers=1)
    cfg = dataclasses.replace(CFG, vocab_size=300)
    m = prepare([path], str(tmp_path / "sample"), cfg, progress=False,
                options=dataclasses.replace(opts, tokenizer_sample_docs=60))
    assert BlockDataset(str(tmp_path / "sample")).tokenizer.token_to_id("ж") is None
    assert m["limits"]["tokenizer_sample_docs"] == 60 and m["inputs"][0]["docs"] == 90  # all are still prepared
    prepare([path], str(tmp_path / "whole"), cfg, progress=False, options=opts)
    assert BlockDataset(str(tmp_path / "whole")).tokenizer.token_to_id("ж") is not None


# ---------------------------------------------------------------- parallel, restartable, ordered

def test_one_and_n_workers_write_the_same_bytes(work, tmp_path, reference):
    m = run_prepare(work, tmp_path / "n", order="shuffle", workers=3)
    assert shard_bytes(tmp_path / "n") == shard_bytes(reference["shuffle"][0])
    assert same_manifest(m, reference["shuffle"][1])
    assert len(m["shards"]) > 10


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("order, phase, nth, workers", [
    ("curriculum", "stream", 3, 1),
    ("shuffle", "stream", 2, 2),
    ("curriculum", "scatter", 4, 1),
    ("shuffle", "gather", 3, 1),
    ("stream", "stream", 5, 1),
])
def test_interrupt_and_resume_is_byte_identical(work, tmp_path, monkeypatch, reference, order, phase, nth, workers):
    seen = []

    def interrupt_at(state):
        if state["phase"] == phase:
            seen.append(1)
            if len(seen) == nth:
                raise Interrupt()

    monkeypatch.setattr(prep, "_after_journal", interrupt_at)
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        run_prepare(work, out, order=order, workers=workers)
    assert os.path.isfile(out / prep.JOURNAL) and not os.path.exists(out / "manifest.json")
    with pytest.raises(UserError, match="unfinished"):
        BlockDataset(str(out))
    changed = {"seed": 99} if order != "stream" else {"max_tokens": 7}
    with pytest.raises(UserError, match=f"other settings.*{next(iter(changed))}"):  # a rerun must match
        run_prepare(work, out, order=order, **changed)
    monkeypatch.setattr(prep, "_after_journal", lambda state: None)
    m = run_prepare(work, out, order=order, workers=workers)
    assert shard_bytes(out) == shard_bytes(reference[order][0])
    assert same_manifest(m, reference[order][1])
    assert sorted(f for f in os.listdir(out) if not f.startswith("shard-")) == ["holdout-00000.bin", "manifest.json",
                                                                              "tokenizer.json"]
    with pytest.raises(UserError, match="already holds a prepared corpus"):  # never rewritten in place
        run_prepare(work, out, order=order, workers=workers)


def test_killed_cli_prepare_resumes(work, tmp_path, docs):
    """SIGKILL in the middle (no cleanup at all), then the same command again: identical to an uninterrupted run."""
    text = write_jsonl(str(tmp_path / "big.jsonl"), docs * 6)  # ~2.4 MB: a few 1M-character chunks
    cmd = [sys.executable, "-m", "fastcram", "data", "prepare", "--input", text, "--tokenizer", str(work / "tok.json"),
           "--compression-threshold", "0.9", "--shard-blocks", "256", "--order", "curriculum", "--workers", "2",
           "--quiet", "--out"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd + [str(tmp_path / "killed")], env=env, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "killed" / prep.JOURNAL
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.load(open(journal))["stream"]["shards"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, f"prepare ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(tmp_path / "killed" / "manifest.json")
    for folder in ("killed", "clean"):
        res = subprocess.run(cmd + [str(tmp_path / folder)], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "clean")


def test_orders(reference, work, tmp_path):
    stream, shuffled, curriculum = (all_blocks(reference[o][0]) for o in ("stream", "shuffle", "curriculum"))
    assert np.array_equal(rows(stream), rows(shuffled)) and np.array_equal(rows(stream), rows(curriculum))
    assert not np.array_equal(stream, shuffled)
    dot = BlockDataset(reference["curriculum"][0]).tokenizer.token_to_id(".")
    dots = (curriculum == dot).sum(axis=1)
    assert np.all(np.diff(dots) <= 0) and dots[0] > dots[-1]  # most "." first
    # ties are shuffled, not left in stream order
    tied = dots == np.bincount(dots).argmax()
    stream_rank = {row.tobytes(): i for i, row in enumerate(stream)}
    ranks = [stream_rank[row.tobytes()] for row in curriculum[tied]]
    assert ranks != sorted(ranks)
    assert BlockDataset(reference["curriculum"][0]).order == "curriculum"
    reseeded = run_prepare(work, tmp_path / "seed1", order="shuffle", seed=1)
    assert reseeded["total_blocks"] == len(shuffled)
    assert not np.array_equal(all_blocks(tmp_path / "seed1"), shuffled)


def test_progress_line(capsys):
    bar = prep.ProgressLine(True)
    bar.update(0, 0, 0, 0.0, force=True)
    bar.t0 -= 10.0  # ten seconds later: 25 MB of text, a quarter done
    bar.update(1234, 5_600_000, 25_000_000, 0.25, force=True)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.split() == ["1,234", "docs,", "5.6M", "tokens,", "2.5", "MB/s,", "25.0%,", "ETA", "0m30s"], line


def tokenizer_stream(tok_path: str, docs: list[str], held_out: bool = False) -> list[int]:
    """The kept training documents' ids (held_out: the kept held-out documents'), each followed by <sep>, as
    the tokenizer itself encodes them; the held-out ones by the default rule (tests/helpers.py)."""
    tok = Tokenizer.from_file(tok_path)
    sep = tok.token_to_id("<sep>")
    tok.encode_special_tokens = True
    held = set(held_out_indices(len(docs)))
    stream = []
    for i, (doc, enc) in enumerate(zip(docs, tok.encode_batch(docs, add_special_tokens=False))):
        if enc.ids and len(enc.ids) / len(doc) < CFG.compression_threshold and (i in held) == held_out:
            stream += enc.ids + [sep]
    return stream


def test_stream_holds_the_tokenizers_own_ids(work, docs, reference):
    flat = all_blocks(reference["stream"][0]).reshape(-1)
    assert flat.tolist() == tokenizer_stream(str(work / "tok.json"), docs)[:len(flat)]
    held = BlockDataset(reference["stream"][0]).holdout.read().reshape(-1)
    assert len(held) > 0 and held.tolist() == tokenizer_stream(str(work / "tok.json"), docs, held_out=True)[:len(held)]


def test_a_tokenizer_that_is_not_separable_is_encoded_whole(work, tmp_path, docs, capsys):
    bpe_path, out = str(tmp_path / "bpe.json"), str(tmp_path / "out")
    byte_level_bpe(docs[:100], vocab_size=1000).save(bpe_path)
    m = prepare([str(work / "docs.jsonl")], out, CFG, tokenizer_path=bpe_path, progress=True,
                options=PrepareOptions(**{**SMALL, "order": "stream"}))
    assert "encoded whole" in capsys.readouterr().err and m["total_blocks"] > 10
    flat = all_blocks(out).reshape(-1)
    assert flat.tolist() == tokenizer_stream(bpe_path, docs)[:len(flat)]


# ---------------------------------------------------------------- memory

# Peak RSS from VmHWM, which exec resets (ru_maxrss would keep the forking pytest's size); the workers' peaks
# are sampled from /proc while they run.
MEMORY_SCRIPT = r"""
import json, os, sys, threading, time
from fastcram.config import DataConfig
from fastcram.data.prepare import PrepareOptions, prepare

def hwm_mb(pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0

worker_peak = [0.0]
def sample():
    me = os.getpid()
    while True:
        try:
            kids = open(f"/proc/{me}/task/{me}/children").read().split()
        except OSError:
            kids = []
        worker_peak[0] = max([worker_peak[0]] + [hwm_mb(k) for k in kids])
        time.sleep(0.05)

if __name__ == "__main__":
    threading.Thread(target=sample, daemon=True).start()
    src, out, tok, shard_blocks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    m = prepare([src], out, DataConfig(vocab_size=400, compression_threshold=0.9, shard_blocks=shard_blocks),
                tokenizer_path=tok, progress=False, options=PrepareOptions(workers=2, order="curriculum"))
    print(json.dumps({"main_mb": hwm_mb(), "worker_mb": worker_peak[0], "text_mb": m["filter"]["bytes"] / 1e6,
                      "blocks": m["total_blocks"]}))
"""


def write_generated_corpus(folder, megabytes: float) -> str:
    """Real prose repeated to size in .txt files, plus one JSONL holding a single 3 MB document."""
    os.makedirs(folder, exist_ok=True)
    text = _corpus_text(4_000_000)
    with open(os.path.join(folder, "a_one_big_doc.jsonl"), "w") as f:
        f.write(json.dumps({"text": text[:3_000_000]}) + "\n")
    size = 3.0
    for i in range(1_000_000):
        if size >= megabytes:
            break
        with open(os.path.join(folder, f"part-{i:04d}.txt"), "w") as f:
            f.write(text)
        size += len(text) / 1e6
    return str(folder)


def measure_prepare_memory(work, tmp_path, megabytes: float, shard_blocks: int) -> dict:
    src = write_generated_corpus(tmp_path / "gen", megabytes)
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, src, str(tmp_path / "out"), str(work / "tok.json"),
                          str(shard_blocks)], capture_output=True, text=True, timeout=3600, env={
                              **os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS for {report['text_mb']:.0f} MB of text ({report['blocks']} blocks): main process "
          f"{report['main_mb']:.0f} MB, largest worker {report['worker_mb']:.0f} MB")
    return report


def test_memory_stays_bounded_small(work, tmp_path, record_property):
    report = measure_prepare_memory(work, tmp_path, 6, shard_blocks=2048)
    record_property("peak_rss", report)
    assert 0 < report["main_mb"] < 300 and 0 < report["worker_mb"] < 300, report


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTCRAM_SLOW_TESTS"), reason="writes 300 MB of text and its shards to a temporary folder; "
                    "set FASTCRAM_SLOW_TESTS=1 to run it")
def test_memory_stays_bounded_large(work, tmp_path, record_property):
    report = measure_prepare_memory(work, tmp_path, 300, shard_blocks=65536)
    record_property("peak_rss", report)
    assert report["text_mb"] > 250
    assert 0 < report["main_mb"] < 300 and 0 < report["worker_mb"] < 300, report


# ---------------------------------------------------------------- the loader

def test_epoch_order_is_a_permutation_reachable_anywhere():
    n = 1000
    order = EpochOrder(n, seed=5, epoch=2, chunk_blocks=37, window_chunks=3)
    full = order.take(0, n)
    assert np.array_equal(np.sort(full), np.arange(n))
    assert not np.array_equal(full, np.arange(n))
    # any slice equals the same slice of the full order, from a fresh object (a resumed loader)
    for start, count in ((0, 7), (110, 300), (999, 1), (555, 445)):
        assert np.array_equal(EpochOrder(n, 5, 2, chunk_blocks=37, window_chunks=3).take(start, count),
                              full[start:start + count])
    # a window spans 3 chunks: the first 111 positions come from 3 runs of 37 consecutive blocks
    assert len(np.unique(full[:111] // 37)) == 3
    assert not np.array_equal(EpochOrder(n, 5, 3, chunk_blocks=37, window_chunks=3).take(0, n), full)
    assert np.array_equal(EpochOrder(n, 5, 2, shuffle=False).take(10, 5), np.arange(10, 15))


def test_loader_resumes_exactly_across_windows_and_epochs(reference, monkeypatch):
    monkeypatch.setattr(loader_mod, "CHUNK_BLOCKS", 50)
    monkeypatch.setattr(loader_mod, "WINDOW_CHUNKS", 2)
    monkeypatch.setattr(BlockDataset, "MAX_OPEN", 3)  # many more shards than maps: the LRU is exercised
    ds = BlockDataset(reference["shuffle"][0])
    n, B = len(ds), 24
    per_epoch = n // B
    loader = BlockLoader(ds, B, seed=7)
    batches, positions = [], []
    for _ in range(per_epoch + 5):
        batches.append(loader.next()[0])
        positions.append(loader.position)
    loader.close()
    assert positions[per_epoch] == DataPosition(1, B)  # the tail of epoch 0 was dropped
    epoch0 = torch.cat(batches[:per_epoch])
    expected = torch.from_numpy(ds.gather(EpochOrder(n, 7, 0, chunk_blocks=50, window_chunks=2)
                                          .take(0, per_epoch * B)).astype(np.int64))
    assert torch.equal(epoch0, expected)
    for k in (3, per_epoch - 1, per_epoch + 2):  # mid-window, at the epoch's end, in the next epoch
        resumed = BlockLoader(ds, B, seed=7, position=DataPosition(**dataclasses.asdict(positions[k - 1])))
        assert all(torch.equal(resumed.next()[0], batches[j]) for j in range(k, min(k + 3, len(batches))))
        resumed.close()


def test_curriculum_data_is_read_in_order(reference):
    ds = BlockDataset(reference["curriculum"][0])
    loader = BlockLoader(ds, 16, seed=1)
    got = torch.cat([loader.next()[0] for _ in range(3)])
    loader.close()
    assert torch.equal(got, torch.from_numpy(ds.gather(np.arange(48)).astype(np.int64)))
