"""GLUE: file parsers on files in the GLUE layout, metrics against hand-computed values, fine-tuning a tiny
checkpoint on a separable synthetic task, the report (table + JSON), and clear errors for bad input."""
import json
import math
import os
import random
import sys

import numpy as np
import pytest
import torch

from fastcram.train import checkpoint as ckpt
from fastcram.glue import data as glue_data
from fastcram.glue import metrics as glue_metrics
from fastcram.cli import main
from fastcram.config import ModelConfig, TrainConfig, to_dict
from fastcram.errors import UserError
from fastcram.glue.finetune import (DeviceSplit, GlueModel, GlueOptions, Protocol, build_encoder, encode_split,
                               eval_batches, load_run, lr_multiplier, pair_budget, run_glue, train_batches)
from fastcram.model import CrammedBert
from fastcram.ops import get_ops
from fastcram.data.tokenizer import train_tokenizer

# ---------------------------------------------------------------- synthetic GLUE folders

FILLER = "the cat dog sat on mat a house tree ran big small red blue old new".split()
KEYWORDS = ["good great nice fine".split(), "bad awful poor sad".split(), "maybe perhaps possibly".split()]


def _sentence(rng, cls=None):
    words = rng.choices(FILLER, k=rng.randint(2, 7))
    if cls is not None:
        words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[cls]))
    return " ".join(words)


def _examples(rng, n, classes, pair):
    """(a, b, class id): the class is written into the last sentence as a keyword: separable."""
    out = []
    for _ in range(n):
        c = rng.randrange(classes)
        out.append((_sentence(rng), _sentence(rng, c), c) if pair else (_sentence(rng, c), None, c))
    return out


def _write(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if header:
            f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")


MNLI_LABELS = ["entailment", "neutral", "contradiction"]
ENT = ["entailment", "not_entailment"]


def _rows(task, exs, dev):
    """Rows of one task file; other columns hold decoys so a wrong column index fails the parser test."""
    if task == "cola":
        return None, [("gj04", c, "" if c else "*", a) for a, _, c in exs]
    if task == "sst2":
        return ["sentence", "label"], [(a, c) for a, _, c in exs]
    if task == "mrpc":
        return (["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                [(c, 100 + i, 200 + i, a, b) for i, (a, b, c) in enumerate(exs)])
    if task == "stsb":
        head = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
        return head, [(i, "main", "f", "2012", 7, "none", "none", a, b, f"{2.5 * c:.3f}")
                      for i, (a, b, c) in enumerate(exs)]
    if task == "qqp":
        return (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                [(i, 2 * i, 2 * i + 1, a, b, c) for i, (a, b, c) in enumerate(exs)])
    if task == "mnli":
        extra = ["label1", "label2", "label3", "label4", "label5"] if dev else ["label1"]
        head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", *extra, "gold_label"]
        decoy = MNLI_LABELS[0]  # label1.. differ from gold: only the last column is the gold label
        return head, [(i, 1, "1e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", a, b,
                       *[decoy] * len(extra), MNLI_LABELS[c]) for i, (a, b, c) in enumerate(exs)]
    if task == "qnli":
        return ["index", "question", "sentence", "label"], [(i, a, b, ENT[c]) for i, (a, b, c) in enumerate(exs)]
    if task == "rte":
        return ["index", "sentence1", "sentence2", "label"], [(i, a, b, ENT[c]) for i, (a, b, c) in enumerate(exs)]
    raise KeyError(task)


def write_glue(root, n_train=64, n_dev=24, seed=0, tasks=tuple(glue_data.TASKS)):
    """GLUE-layout folders for `tasks`; returns {task: {file: examples}} as written."""
    rng = random.Random(seed)
    written = {}
    for task in tasks:
        spec = glue_data.TASKS[task]
        classes = 3 if spec.classes is None else len(spec.classes)  # STS-B: scores 0, 2.5, 5
        files = {"train.tsv": n_train, **{f: n_dev for f in spec.dev_files.values()}}
        written[task] = {}
        for fname, n in files.items():
            exs = _examples(rng, n, classes, spec.is_pair)
            head, rows = _rows(task, exs, dev=fname != "train.tsv")
            _write(os.path.join(root, spec.folder, fname), head, rows)
            written[task][fname] = exs
    return written


# ---------------------------------------------------------------- a tiny "pretrained" run folder

@pytest.fixture(autouse=True, scope="module")
def _tiny_models_use_one_thread(one_thread):
    """conftest's one_thread for every test of this module."""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """config.json + checkpoints/final.pt in the format train.py writes, and the data folder's tokenizer."""
    root = tmp_path_factory.mktemp("glue_run")
    rng = random.Random(1)
    texts = [_sentence(rng, rng.randrange(3)) for _ in range(400)]
    data_dir = root / "data"
    data_dir.mkdir()
    tok = train_tokenizer(texts, vocab_size=120, out_path=str(data_dir / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden=32, layers=2, heads=2, intermediate=64, seq_len=32)
    torch.manual_seed(0)
    model = CrammedBert(cfg, get_ops("torch"))
    run = root / "run"
    run.mkdir()
    config = {"preset": "tiny", "data_dir": str(data_dir), "model": to_dict(cfg), "train": to_dict(TrainConfig()),
              "data": {}}
    (run / "config.json").write_text(json.dumps(config))
    ckpt.save(os.path.join(run, "checkpoints", "final.pt"), {"model": model.state_dict(), "step": 0})
    return str(run)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_data")
    written = write_glue(str(root))
    return str(root), written


# ---------------------------------------------------------------- parsers

@pytest.mark.parametrize("task", list(glue_data.TASKS))
def test_each_task_parser_reads_the_glue_layout(glue_dir, task):
    root, written = glue_dir
    data = glue_data.load_task(task, root)
    spec = glue_data.TASKS[task]
    assert set(data.dev) == set(spec.dev_files)
    for split, fname in [("train", "train.tsv"), *spec.dev_files.items()]:
        got = data.train if split == "train" else data.dev[split]
        want = written[task][fname]
        assert got.a == [a for a, _, _ in want]
        assert got.b == (None if not spec.is_pair else [b for _, b, _ in want])
        if spec.classes is None:
            assert got.labels.dtype == np.float32
            np.testing.assert_allclose(got.labels, [2.5 * c for _, _, c in want])
        else:
            assert got.labels.dtype == np.int64
            assert got.labels.tolist() == [c for _, _, c in want]


def test_mnli_label_ids_match_hugging_face_order(tmp_path):
    rows = [(0, 1, "1e", "g", "", "", "", "", "A man sleeps.", "A man is awake.", "neutral", "neutral",
             "neutral", "neutral", "neutral", "contradiction")]
    head = _rows("mnli", [], dev=True)[0]
    _write(str(tmp_path / "dev_matched.tsv"), head, rows)
    split = glue_data.read_tsv(glue_data.TASKS["mnli"], str(tmp_path / "dev_matched.tsv"))
    assert (split.a, split.b, split.labels.tolist()) == (["A man sleeps."], ["A man is awake."], [2])


def test_max_examples_is_a_fixed_subset(glue_dir):
    root, _ = glue_dir
    a = glue_data.load_task("rte", root, max_examples=10)
    b = glue_data.load_task("rte", root, max_examples=10)
    assert len(a.train) == 10 and len(a.dev["dev"]) == 10 and a.train.a == b.train.a


def test_task_names_accept_folder_spellings():
    assert glue_data.parse_tasks("SST-2, sts-b,mnli,sst2") == ["sst2", "stsb", "mnli"]
    with pytest.raises(UserError, match="unknown GLUE task 'wnli'"):
        glue_data.parse_tasks("cola,wnli")


@pytest.mark.parametrize("task,line,bad,needle", [
    ("sst2", 3, "only one column", "malformed row"),
    ("cola", 2, "gj04\tyes\t\tA sentence.", "label 'yes'"),
    ("stsb", 2, "\t".join(["0"] * 9 + ["6.5"]), "score '6.5'"),
    ("rte", 4, "3\tA.\tB.\tmaybe", "label 'maybe'"),
])
def test_malformed_row_names_file_and_line(tmp_path, task, line, bad, needle):
    write_glue(str(tmp_path), n_train=5, n_dev=3, tasks=(task,))
    path = tmp_path / glue_data.TASKS[task].folder / "train.tsv"
    lines = path.read_text().splitlines()
    lines[line - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        glue_data.load_task(task, str(tmp_path))
    assert f"{path}:{line}:" in str(e.value) and needle in str(e.value)


def test_wrong_header_and_missing_files_are_named(tmp_path):
    write_glue(str(tmp_path), n_train=5, n_dev=3, tasks=("qnli", "mnli"))
    qnli = tmp_path / "QNLI" / "train.tsv"
    qnli.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(UserError, match=r"QNLI/train.tsv:1: header"):
        glue_data.load_task("qnli", str(tmp_path))
    os.remove(tmp_path / "MNLI" / "dev_mismatched.tsv")
    with pytest.raises(UserError, match=r"MNLI/dev_mismatched.tsv does not exist"):
        glue_data.load_task("mnli", str(tmp_path))
    with pytest.raises(UserError, match=r"CoLA does not exist"):
        glue_data.load_task("cola", str(tmp_path))


def test_hugging_face_path_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError, match="`datasets` package, which is not installed"):
        glue_data.load_task("sst2", None)


def test_hugging_face_columns_and_splits(monkeypatch):
    datasets = pytest.importorskip("datasets")  # optional extra; no network needed: the hub is faked

    def fake_load(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        split = {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [0, 1]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(split) for s in
                                     ("train", "validation_matched", "validation_mismatched")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = glue_data.load_task("mnli", None)
    assert set(data.dev) == {"matched", "mismatched"}
    assert (data.train.a, data.train.b, data.train.labels.tolist()) == (["p1", "p2"], ["h1", "h2"], [2, 0])


# ---------------------------------------------------------------- metrics, hand-computed

def test_metrics_against_hand_computed_values():
    pred = [1, 1, 0, 0, 1, 0, 1, 1]
    gold = [1, 0, 0, 1, 1, 0, 1, 0]
    # tp = 3 (0, 4, 6), fp = 2 (1, 7), fn = 1 (3), tn = 2 (2, 5)
    assert glue_metrics.accuracy(pred, gold) == pytest.approx(5 / 8)
    assert glue_metrics.f1(pred, gold) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert glue_metrics.matthews(pred, gold) == pytest.approx((3 * 2 - 2 * 1) / math.sqrt(5 * 4 * 4 * 3))
    assert glue_metrics.matthews([1, 1, 1], [0, 1, 1]) == 0.0  # one predicted class: defined as 0
    assert glue_metrics.f1([0, 0], [1, 0]) == 0.0
    # Pearson of x = (1, 2, 3, 4), y = (2, 1, 4, 3): dx = dy-ish (-1.5, -.5, .5, 1.5) vs (-.5, -1.5, 1.5, .5)
    # sum dx*dy = .75 + .75 + .75 + .75 = 3.0; sum dx^2 = sum dy^2 = 5.0 -> 0.6
    assert glue_metrics.pearson([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert glue_metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    # ranks with ties take the mean rank: (10, 20, 20, 30) -> (1, 2.5, 2.5, 4)
    np.testing.assert_allclose(glue_metrics.rank([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(glue_metrics.rank([3.0, 1.0, 3.0, 2.0, 3.0]), [4, 1, 4, 2, 4])
    # Spearman: monotone but nonlinear -> 1; ranks (1,2.5,2.5,4) vs (1,2,3,4): 4.5 / sqrt(4.5 * 5)
    assert glue_metrics.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert glue_metrics.spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))


def test_median_average_and_table_order():
    runs = [{"dev": {"accuracy": a}} for a in (70.0, 90.0, 80.0)]
    assert glue_metrics.median_over_seeds(runs) == {"dev": {"accuracy": 80.0}}
    medians = {"mnli": {"matched": {"accuracy": 80.0}, "mismatched": {"accuracy": 81.0}},
               "cola": {"dev": {"accuracy": 70.0, "matthews": 40.0}},
               "mrpc": {"dev": {"accuracy": 80.0, "f1": 88.0}},
               "stsb": {"dev": {"pearson": 85.0, "spearman": 84.0}}}
    s = glue_metrics.summarize(medians)
    assert s["scores"] == {"mnli_m": 80.0, "mnli_mm": 81.0, "stsb": 85.0, "mrpc": 88.0, "cola": 40.0}
    assert s["avg"] == pytest.approx((80 + 81 + 85 + 88 + 40) / 5) and not s["complete"]
    table = glue_metrics.format_table("run", s).splitlines()
    assert table[0] == "| model | MNLI m/mm | SST-2 | STS-B | RTE | QNLI | QQP | MRPC | CoLA | avg |"
    assert table[2] == "| run | 80.0/81.0 | - | 85.0 | - | - | - | 88.0 | 40.0 | 74.8 (5 of 9) |"


# ---------------------------------------------------------------- encoding, batching, schedule

def test_pair_truncation_longest_first():
    assert pair_budget(3, 4, 10) == (3, 4)
    assert pair_budget(2, 20, 10) == (2, 8)
    assert pair_budget(20, 3, 10) == (7, 3)
    assert pair_budget(20, 20, 11) == (6, 5)


def test_encoding_layout_and_truncation(tiny_run):
    pre = load_run(tiny_run)
    sp = pre.special
    split = glue_data.Split(["the cat", "dog " * 40], ["sat", "mat " * 40], np.array([0, 1]))
    enc = encode_split(pre.tokenizer, sp, split, max_len=16)
    a = pre.tokenizer.encode("the cat", add_special_tokens=False).ids
    b = pre.tokenizer.encode("sat", add_special_tokens=False).ids
    row = [sp.cls, *a, sp.sep, *b, sp.sep]
    assert enc.lengths[0] == len(row) and enc.ids[0, :len(row)].tolist() == row
    assert (enc.ids[0, len(row):] == sp.pad).all()
    assert enc.lengths[1] == 16 and enc.ids[1, 15] == sp.sep and (enc.ids[1] == sp.sep).sum() == 2
    single = encode_split(pre.tokenizer, sp, glue_data.Split(["the cat"], None, np.array([1])), 16)
    assert single.ids[0, :len(a) + 2].tolist() == [sp.cls, *a, sp.sep]


def test_batches_cover_everything_and_bucket_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=1000)
    batches = train_batches(lengths, 16, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(len(b) == 16 for b in batches if len(b) != 1000 % 16)
    waste = sum(len(b) * lengths[b].max() for b in batches) / lengths.sum()
    rand = sum(len(b) * lengths[b].max() for b in np.array_split(rng.permutation(1000), 63)) / lengths.sum()
    assert waste < 1.1 < rand  # bucketing pads little; random batches pad a lot
    assert sorted(np.concatenate(eval_batches(lengths, 64)).tolist()) == list(range(1000))


def test_warmup_then_cosine_schedule():
    total, warm = 100, 10
    m = [lr_multiplier(s, total, warm) for s in range(total)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0) and m[10] == pytest.approx(1.0)
    assert m[55] == pytest.approx(0.5) and all(a >= b for a, b in zip(m[10:], m[11:])) and m[-1] < 0.01


def test_padding_with_the_attention_mask_does_not_change_outputs(tiny_run):
    pre = load_run(tiny_run)
    torch.manual_seed(0)
    model = GlueModel(build_encoder(pre, "torch", 0.1, "cpu"), 3, 64, 0.1).eval()
    texts = ["the cat sat on the mat and the dog sat on a tree", "dog", "a big red house ran"]
    split = glue_data.Split(texts, None, np.zeros(3, int))
    dev = DeviceSplit(encode_split(pre.tokenizer, pre.special, split, 32), "cpu")
    ids, lens, _ = next(dev.batches([np.arange(3)]))
    assert ids.shape[1] % 8 == 0 and (lens < ids.shape[1]).all() and len(set(lens.tolist())) == 3
    with torch.no_grad():
        together = model(ids, lens)
        alone = [model(ids[i:i + 1, :int(lens[i])], lens[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- fine-tuning end to end

def _opts(run, data_dir, out, tasks, **kw):
    proto = Protocol(**{"epochs": 3, "lr": 2e-3, **kw.pop("proto", {})})
    return GlueOptions(run_dir=run, tasks=tasks, data_dir=data_dir, out=str(out), kernels="torch", device="cpu",
                       protocol=proto, progress=False, **kw)


def test_tiny_checkpoint_learns_a_separable_task(tiny_run, tmp_path):
    # The checkpoint is random (not pretrained), so the recipe's lr 4e-5 would need far more steps: the
    # protocol is the recipe's except lr (2e-3) and epochs (8). Chance is 50% (SST-2) and 33% (MNLI); the
    # class keyword sits in sentence B for MNLI, so the pair path (and its padding mask) must work.
    write_glue(str(tmp_path / "glue"), n_train=320, n_dev=64, seed=3, tasks=("sst2", "mnli"))
    report = run_glue(_opts(tiny_run, str(tmp_path / "glue"), tmp_path / "r.json", ["sst2", "mnli"], seeds=1,
                            proto={"epochs": 8}))
    assert report["scores"]["sst2"] >= 85.0, report["scores"]
    assert report["scores"]["mnli_m"] >= 70.0 and report["scores"]["mnli_mm"] >= 70.0, report["scores"]
    run = report["tasks"]["sst2"]["runs"][0]
    assert run["steps"] == 8 * 20 and run["train_examples_per_s"] > 0 and 0.5 < run["pad_efficiency"] <= 1.0


def test_report_table_and_json_for_all_tasks(tiny_run, glue_dir, tmp_path):
    root, _ = glue_dir
    out = tmp_path / "out" / "glue.json"
    rc = main(["eval", "glue", tiny_run, "--data-dir", root, "--seeds", "3", "--epochs", "1", "--out", str(out),
               "--device", "cpu", "--kernels", "torch", "--max-examples", "32", "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    md = (tmp_path / "out" / "glue.md").read_text()
    assert md == report["table"]
    head, _, row = md.splitlines()
    assert head == "| model | MNLI m/mm | SST-2 | STS-B | RTE | QNLI | QQP | MRPC | CoLA | avg |"
    assert report["complete"] and len(report["scores"]) == 9 and " - " not in row
    assert report["avg"] == pytest.approx(np.mean(list(report["scores"].values())))
    for task, res in report["tasks"].items():
        assert len(res["runs"]) == 3 and res["train_examples"] == 32
        for split, metrics in res["median"].items():
            for m, v in metrics.items():
                assert v == pytest.approx(np.median([r["dev"][split][m] for r in res["runs"]]))
    assert set(report["tasks"]["mrpc"]["median"]["dev"]) == {"accuracy", "f1"}
    assert set(report["tasks"]["stsb"]["median"]["dev"]) == {"pearson", "spearman"}
    assert report["scores"]["cola"] == report["tasks"]["cola"]["median"]["dev"]["matthews"]
    assert report["protocol"]["batch_size"] == 16 and report["protocol"]["max_len"] == 32  # model seq_len caps


# ---------------------------------------------------------------- bad input through the CLI

def _cli_error(capsys, *argv):
    rc = main(["eval", "glue", *argv, "--device", "cpu", "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("fastcram: error:"), err
    return err[0]


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    write_glue(str(tmp_path / "g"), n_train=5, n_dev=3, tasks=("rte",))
    assert "CoLA does not exist" in _cli_error(capsys, tiny_run, "--data-dir", str(tmp_path / "g"))
    bad = tmp_path / "g" / "RTE" / "dev.tsv"
    bad.write_text(bad.read_text() + "7\tonly two\n")
    assert f"{bad}:5: malformed row" in _cli_error(capsys, tiny_run, "--data-dir", str(tmp_path / "g"),
                                                   "--tasks", "rte")
    assert "not a fastcram run folder" in _cli_error(capsys, str(tmp_path), "--data-dir", str(tmp_path / "g"))
    assert "unknown GLUE task" in _cli_error(capsys, tiny_run, "--tasks", "sst2,wnli")
    assert "--data-dir" in _cli_error(capsys, tiny_run, "--data-dir", str(tmp_path / "nope"))
    assert not os.path.exists(os.path.join(tiny_run, "glue.json"))  # nothing written on error


def test_default_fine_tuning_lr_follows_the_preset(tiny_run, glue_dir, tmp_path):
    """The tiny preset fine-tunes at 1e-3, crammed-bert at the recipe's 4e-5; --lr overrides either."""
    import shutil

    from fastcram.config import PRESETS

    root, _ = glue_dir
    big = tmp_path / "big"
    shutil.copytree(tiny_run, big)  # the same run, labelled crammed-bert
    config = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "preset": "crammed-bert"}))

    def report(run, *extra):
        out = tmp_path / f"r{len(os.listdir(tmp_path))}.json"
        assert main(["eval", "glue", str(run), "--data-dir", root, "--tasks", "rte", "--seeds", "1", "--epochs", "1",
                     "--max-examples", "32", "--device", "cpu", "--kernels", "torch", "--out", str(out), "--quiet",
                     *extra]) == 0
        return json.loads(out.read_text())

    tiny, given, slow, recipe = (report(tiny_run), report(tiny_run, "--lr", "1e-3"), report(tiny_run, "--lr", "4e-5"),
                                 report(big))
    assert PRESETS["tiny"].finetune_lr == 1e-3 and PRESETS["crammed-bert"].finetune_lr == 4e-5
    assert tiny["protocol"]["lr"] == 1e-3 and tiny["lr_from"] == "preset tiny"
    assert recipe["protocol"]["lr"] == 4e-5 and recipe["lr_from"] == "preset crammed-bert"
    assert given["lr_from"] == "--lr" and slow["protocol"]["lr"] == 4e-5
    loss = {name: r["tasks"]["rte"]["runs"][0]["train_loss"] for name, r in
            (("tiny", tiny), ("given", given), ("slow", slow), ("recipe", recipe))}
    assert loss["tiny"] == loss["given"] and loss["slow"] == loss["recipe"] != loss["tiny"]  # the lr that trained
