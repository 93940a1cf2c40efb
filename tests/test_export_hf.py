"""`fastcram export hf`: a trained tiny run as a Hugging Face folder, checked against fastcram itself.

Offline (HF_HUB_OFFLINE=1): the folder loads through transformers' Auto classes with trust_remote_code; its
masked-LM logits equal fastcram's torch backend within 1e-5 (fp32) on held-out text, padded or not; its
tokenizer gives fastcram's ids; fill-mask's top token is fastcram's argmax; the classification model has
fastcram's GLUE head and dropouts and fine-tunes under transformers' Trainer; a compiled model's checkpoint
(`_orig_mod.` keys) exports to the same bytes. Needs the hf extra (pip install -e '.[hf]').
"""
import ast
import dataclasses
import json
import lzma
import os
import random
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

for _name in ("transformers", "safetensors", "accelerate"):
    pytest.importorskip(_name, reason="the hf extra is not installed (pip install -e '.[hf]')")

from safetensors.torch import load_file  # noqa: E402
from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification,  # noqa: E402
                          AutoTokenizer, pipeline)

from fastcram import __version__  # noqa: E402
from fastcram.cli import main  # noqa: E402
from fastcram.config import ModelConfig, RunOptions, TrainConfig, preset  # noqa: E402
from fastcram.data.builtin import builtin_corpus_path  # noqa: E402
from fastcram.data.tokenizer import DocumentEncoder  # noqa: E402
from fastcram.export.hf import ExportOptions, export_hf, reference_model  # noqa: E402
from fastcram.export.run import checkpoint_payload, read_run  # noqa: E402
from fastcram.files import sha256_file  # noqa: E402
from fastcram.glue import data as glue_data  # noqa: E402
from fastcram.glue.finetune import GlueModel, Protocol, encode_split  # noqa: E402
from fastcram.model import CrammedBert  # noqa: E402
from fastcram.ops import get_ops  # noqa: E402
from fastcram.train import checkpoint as ckpt  # noqa: E402
from fastcram.train.loop import train  # noqa: E402

from .helpers import FakeClock  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
HELD_OUT = (3_000_000, 3_400_000)  # characters of the built-in corpus; the small corpus is its first 200,000


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_use_one_thread(one_thread):
    """conftest's one_thread for every test of this module."""


@pytest.fixture(scope="module")
def trained_run(small_data, tmp_path_factory) -> str:
    """A tiny run trained for 20 steps on the small corpus (vocabulary 512, 128-token blocks)."""
    out = tmp_path_factory.mktemp("export_run") / "run"
    tcfg = TrainConfig(**{**preset("tiny").train_overrides, "compile": False, "device": "cpu", "micro_batch": 8,
                          "final_batch": 8, "log_interval_s": 1e9, "budget_s": 1e6, "max_steps": 20, "lr": 3e-3})
    torch.manual_seed(0)
    summary = train(RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(out), progress=False),
                    now=FakeClock(tick=0.0))
    assert summary["steps"] == 20
    return str(out)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("export_hf") / "model")
    report = export_hf(ExportOptions(trained_run, out, progress=False))
    assert report["max_abs_diff"] <= 1e-5
    return out


@pytest.fixture(scope="module")
def fastcram_model(trained_run) -> CrammedBert:
    """fastcram's own model (torch backend) with the run's final weights."""
    return reference_model(read_run(trained_run))


@pytest.fixture(scope="module")
def hf_tok(exported):
    return AutoTokenizer.from_pretrained(exported, trust_remote_code=True)


@pytest.fixture(scope="module")
def hf_mlm(exported):
    return AutoModelForMaskedLM.from_pretrained(exported, trust_remote_code=True).eval()


def held_out_texts(n: int, rng: random.Random, min_chars: int = 20, max_chars: int = 600) -> list[str]:
    """n passages from a random stretch of the corpus the run never saw, of random lengths."""
    with lzma.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        f.read(HELD_OUT[0])
        text = f.read(HELD_OUT[1] - HELD_OUT[0])
    out = []
    for _ in range(n):
        start = rng.randrange(len(text) - max_chars)
        out.append(text[start:start + rng.randint(min_chars, max_chars)])
    return out


def fastcram_logits(model: CrammedBert, ids: list[int]) -> torch.Tensor:
    """[n, V] logits of one unpadded row, as fastcram computes them: every position, tied decoder."""
    with torch.no_grad():
        h = model.encode(torch.tensor([ids]))  # [1, n, D]
        return (h @ model.tok_emb.weight.T)[0]


# ---------------------------------------------------------------- the folder

def test_the_folder_is_self_contained_with_provenance(exported, trained_run, small_data):
    names = sorted(os.listdir(exported))
    assert names == ["config.json", "model.safetensors", "modeling_fastcram.py", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["model_type"] == "fastcram"
    assert {k: v.split(".")[0] for k, v in config["auto_map"].items()} == {
        "AutoConfig": "modeling_fastcram", "AutoModel": "modeling_fastcram",
        "AutoModelForMaskedLM": "modeling_fastcram", "AutoModelForSequenceClassification": "modeling_fastcram"}
    manifest = json.load(open(os.path.join(small_data, "manifest.json")))
    prov = config["fastcram"]
    assert prov["fastcram_version"] == __version__
    assert prov["data_manifest_sha256"] == sha256_file(os.path.join(small_data, "manifest.json"))
    assert prov["tokenizer_hash"] == manifest["tokenizer_hash"]
    assert prov["tokenizer_sha256"] == sha256_file(os.path.join(small_data, manifest["tokenizer"]))
    assert prov["step"] == 20 and prov["checkpoint"] == "final.pt" and prov["kernels"] == "torch"

    # the modeling code imports torch, transformers and the standard library only
    tree = ast.parse(open(os.path.join(exported, "modeling_fastcram.py")).read())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "math", "torch", "transformers"}, roots

    # the weights are the checkpoint's, every one of them, under the base model's prefix
    state = checkpoint_payload(os.path.join(trained_run, "checkpoints", "final.pt"))["model"]
    weights = load_file(os.path.join(exported, "model.safetensors"))
    assert sorted(weights) == sorted("encoder." + k for k in state)
    for k, v in state.items():
        assert torch.equal(weights["encoder." + k], v), k


def test_a_compiled_models_checkpoint_exports_to_the_same_folder(trained_run, exported, tmp_path):
    """Keys with torch.compile's `_orig_mod.` component give the same bytes as plain keys (through the CLI)."""
    saved = checkpoint_payload(os.path.join(trained_run, "checkpoints", "final.pt"))
    saved["model"] = {f"_orig_mod.{k}": v for k, v in saved["model"].items()}
    compiled = tmp_path / "compiled" / "final.pt"  # the same file name: the config records it
    ckpt.save(str(compiled), saved)
    out = tmp_path / "from_compiled"
    assert main(["export", "hf", trained_run, "--out", str(out), "--checkpoint", str(compiled), "--quiet"]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(exported))
    for name in os.listdir(exported):
        assert (out / name).read_bytes() == open(os.path.join(exported, name), "rb").read(), name


def test_every_backend_names_its_parameters_the_same(exported):
    """The export reads state_dict keys only: a run on any ops backend exports the same way."""
    cfg = ModelConfig(**{**dataclasses.asdict(preset("tiny").model), "vocab_size": 512})
    keys = {backend: sorted(CrammedBert(cfg, get_ops(backend)).state_dict()) for backend in ("torch", "triton")}
    assert keys["torch"] == keys["triton"]
    assert sorted("encoder." + k for k in keys["torch"]) == sorted(load_file(
        os.path.join(exported, "model.safetensors")))


def test_the_classic_gelu_ffn_exports_too(small_data, tmp_path):
    """A run with the classic GELU FFN (bert-classic-ffn's kind, at the tiny size): the folder's masked-LM
    logits equal fastcram's own on random ids, padded and not."""
    tcfg = TrainConfig(**{**preset("tiny").train_overrides, "compile": False, "device": "cpu", "micro_batch": 4,
                          "final_batch": 4, "log_interval_s": 1e9, "budget_s": 1e6, "max_steps": 3})
    run = str(tmp_path / "gelu_run")
    train(RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=run, progress=False,
                     model_overrides={"ffn": "gelu"}), now=FakeClock(tick=0.0))
    out = str(tmp_path / "gelu_hf")
    assert export_hf(ExportOptions(run, out, progress=False))["max_abs_diff"] <= 1e-5
    assert json.load(open(os.path.join(out, "config.json")))["ffn"] == "gelu"
    ref = reference_model(read_run(run))
    hf = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(7, ref.cfg.vocab_size, (2, 37))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], fastcram_logits(ref, ids[0].tolist()), **TOL)
    torch.testing.assert_close(got[1, :20], fastcram_logits(ref, ids[1, :20].tolist()), **TOL)


# ---------------------------------------------------------------- numerics against fastcram

def test_masked_lm_logits_equal_fastcram_padded_and_not(hf_tok, hf_mlm, fastcram_model):
    rng = random.Random()
    texts = held_out_texts(5, rng)
    batch = hf_tok(texts, padding=True, truncation=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1 and 0 in batch["attention_mask"]  # really padded
    with torch.no_grad():
        padded = hf_mlm(**batch).logits  # [5, L, V]
    for row, n in enumerate(lengths):
        ids = batch["input_ids"][row, :n]
        want = fastcram_logits(fastcram_model, ids.tolist())  # [n, V]
        torch.testing.assert_close(padded[row, :n], want, **TOL)
        with torch.no_grad():  # the padded row equals its unpadded self
            alone = hf_mlm(input_ids=ids[None]).logits[0]
        torch.testing.assert_close(padded[row, :n], alone, **TOL)

    # a full batch without padding or attention mask (pretraining's shape: whole 128-token blocks)
    encode = DocumentEncoder(fastcram_model_tokenizer(hf_tok))
    ids = torch.cat([torch.from_numpy(encode([t])[0].astype("int64"))
                     for t in held_out_texts(3, rng, 2000, 2500)])  # plenty of tokens
    L = fastcram_model.cfg.seq_len
    blocks = ids[:3 * L].view(3, L)  # [3, L]
    with torch.no_grad():
        got = hf_mlm(input_ids=blocks).logits
        want = fastcram_model.encode(blocks) @ fastcram_model.tok_emb.weight.T
    torch.testing.assert_close(got, want, **TOL)


def fastcram_model_tokenizer(hf_tok):
    """fastcram's own tokenizer object for the exported files' vocabulary (the run's tokenizer.json)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(hf_tok.name_or_path, "tokenizer.json"))


def test_bf16_runs_close_to_fp32(exported, hf_tok, hf_mlm):
    """Loaded in bf16 (as on a GPU), the model computes in bf16 and stays near its fp32 self."""
    bf16 = AutoModelForMaskedLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.bfloat16).eval()
    batch = hf_tok(held_out_texts(3, random.Random()), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want, got = hf_mlm(**batch).logits, bf16(**batch).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.03 * want.abs().max()


def test_base_model_gives_fastcrams_hidden_states(exported, hf_tok, fastcram_model):
    base = AutoModel.from_pretrained(exported, trust_remote_code=True).eval()
    batch = hf_tok(held_out_texts(3, random.Random()), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = base(**batch).last_hidden_state  # [3, L, D]
        for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            want = fastcram_model.encode(batch["input_ids"][row:row + 1, :n])[0]
            torch.testing.assert_close(h[row, :n], want, **TOL)


def test_tokenizer_gives_fastcrams_ids(trained_run, hf_tok):
    run = read_run(trained_run)
    encode = DocumentEncoder(run.tokenizer)  # how fastcram's data encodes text
    sp = run.special
    texts = held_out_texts(20, random.Random()) + ["Éléonore's naïve café, ÀÉÎÕÜ ß -- \"quoted\"\ttabs\n\nlines"]
    for text in texts:
        ids = encode([text])[0].tolist()
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok(text)["input_ids"] == [sp.cls, *ids, sp.sep]  # fastcram's GLUE layout
    # sentence pairs: the layout of fastcram's GLUE encoding, `<cls> A <sep> B <sep>`
    a, b = texts[:3], texts[3:6]
    split = glue_data.Split(a=a, b=b, labels=torch.zeros(3, dtype=torch.long).numpy())
    enc = encode_split(run.tokenizer, sp, split, max_len=10_000)
    for i in range(3):
        assert hf_tok(a[i], b[i])["input_ids"] == enc.ids[i, :enc.lengths[i]].tolist()

    # the mask token: special in transformers input (fill-mask), text in fastcram's pretraining data
    assert hf_tok.mask_token == "<mask>" and hf_tok.mask_token_id == sp.mask
    assert hf_tok.pad_token_id == sp.pad == 0 and hf_tok.cls_token_id == sp.cls and hf_tok.sep_token_id == sp.sep
    assert hf_tok("a <mask> b", add_special_tokens=False)["input_ids"] == [*encode(["a"])[0], sp.mask,
                                                                           *encode(["b"])[0]]
    assert sp.mask not in encode(["a <mask> b"])[0].tolist()


def test_fill_mask_top_token_is_fastcrams_argmax(exported, hf_tok, fastcram_model):
    fill = pipeline("fill-mask", model=exported, tokenizer=exported, trust_remote_code=True, device="cpu")
    rng = random.Random()
    checked = 0
    for text in held_out_texts(12, rng, 80, 300):
        words = text.split()
        if len(words) < 4:
            continue
        words[rng.randrange(1, len(words) - 1)] = hf_tok.mask_token
        masked = " ".join(words)
        ids = hf_tok(masked, truncation=True)["input_ids"]
        if hf_tok.mask_token_id not in ids:
            continue  # truncation cut the mask off
        pos = ids.index(hf_tok.mask_token_id)
        want = int(fastcram_logits(fastcram_model, ids)[pos].argmax())
        top = fill(masked, top_k=1, tokenizer_kwargs={"truncation": True})[0]
        assert top["token"] == want, (masked, top)
        checked += 1
    assert checked >= 5


# ---------------------------------------------------------------- fine-tuning

def test_classification_head_and_dropouts_are_fastcrams_glue_model(exported, trained_run, hf_tok):
    """Same head, same dropouts: with the same seed, train mode (dropout on) gives fastcram's GlueModel output."""
    proto = Protocol()
    config = json.load(open(os.path.join(exported, "config.json")))
    assert (config["hidden_dropout_prob"], config["classifier_dropout"], config["classifier_hidden_size"]) == (
        proto.dropout, proto.dropout, proto.head_dim)
    run = read_run(trained_run)
    encoder = CrammedBert(dataclasses.replace(run.cfg, dropout=proto.dropout), get_ops("torch"))
    encoder.load_state_dict(run.state)
    glue = GlueModel(encoder, 3, proto.head_dim, proto.dropout)
    hf = AutoModelForSequenceClassification.from_pretrained(exported, num_labels=3, trust_remote_code=True)
    with torch.no_grad():
        for mine, theirs in ((hf.dense, glue.dense), (hf.out, glue.out)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    batch = hf_tok(held_out_texts(4, random.Random()), padding=True, truncation=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    for mode in ("eval", "train"):
        glue.train(mode == "train")
        hf.train(mode == "train")
        seed = random.randrange(1 << 30)
        torch.manual_seed(seed)
        want = glue(batch["input_ids"], lengths)
        torch.manual_seed(seed)
        got = hf(**batch).logits
        torch.testing.assert_close(got, want, **TOL)
    torch.manual_seed(seed + 1)
    assert not torch.allclose(hf(**batch).logits, got)  # dropout really is on in train mode


def test_trainer_fine_tunes_the_classification_model(exported, hf_tok, tmp_path):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    rng = random.Random()
    words = sorted({w.strip(".,;:!?'\"()").lower() for w in held_out_texts(1, rng, 8000, 8000)[0].split()} - {""})
    rng.shuffle(words)
    classes = (words[:40], words[40:80])  # a toy task: which of two word lists a sentence is drawn from

    def example() -> dict:
        label = rng.randrange(2)
        text = " ".join(rng.choices(classes[label], k=rng.randint(4, 12)))
        return {**hf_tok(text, truncation=True), "label": label}

    model = AutoModelForSequenceClassification.from_pretrained(exported, num_labels=2, trust_remote_code=True)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=40, per_device_train_batch_size=16,
                             learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=5, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=rng.randrange(1 << 30))
    trainer = Trainer(model=model, args=args, train_dataset=[example() for _ in range(640)],
                      data_collator=DataCollatorWithPadding(hf_tok))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 8
    # falling, by a margin: a halving (the earlier bar) was missed once in about 23 runs with fresh words
    assert sum(losses[-2:]) / 2 < 0.75 * sum(losses[:2]) / 2, losses


# ---------------------------------------------------------------- bad input

def _error(capsys, *argv) -> str:
    assert main(["export", "hf", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fastcram: error:"), err
    return err


def test_bad_input_is_one_line_and_writes_nothing(trained_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert "not a fastcram run folder" in _error(capsys, str(tmp_path), "--out", str(out))
    assert "--checkpoint" in _error(capsys, trained_run, "--out", str(out), "--checkpoint", str(tmp_path / "x.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "junk.pt" in _error(capsys, trained_run, "--out", str(out), "--checkpoint", str(tmp_path / "junk.pt"))
    other = tmp_path / "other_tokenizer.json"
    from fastcram.data.tokenizer import train_tokenizer

    train_tokenizer(["some other words entirely"] * 20, vocab_size=40, out_path=str(other))
    assert "--tokenizer" in _error(capsys, trained_run, "--out", str(out), "--tokenizer", str(other))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("out")]

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "not an empty folder" in _error(capsys, trained_run, "--out", str(taken))
    assert os.listdir(taken) == ["keep.txt"]
    assert "is a folder; give one checkpoint file" in _error(capsys, trained_run, "--out", str(out), "--checkpoint",
                                                             os.path.join(trained_run, "checkpoints"))
    here = tmp_path / "empty_here"
    here.mkdir()
    monkeypatch.chdir(here)  # an empty current folder: never removed to make room
    assert "--out is empty" in _error(capsys, trained_run, "--out", "")
    assert "is the current folder" in _error(capsys, trained_run, "--out", ".")
    assert here.is_dir() and os.listdir(here) == []

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the hf extra were not installed
    err = _error(capsys, trained_run, "--out", str(out))
    assert "pip install -e '.[hf]'" in err and "transformers" in err
    assert not out.exists()


def test_a_moved_data_folder_needs_the_tokenizer_flag(trained_run, small_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.load(open(run / "config.json"))
    config["data_dir"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    assert "--tokenizer FILE" in _error(capsys, str(run), "--out", str(tmp_path / "a"))
    (tmp_path / "a").mkdir()  # an empty folder may be the output
    tok = os.path.join(small_data, "tokenizer.json")
    assert main(["export", "hf", str(run), "--out", str(tmp_path / "a"), "--tokenizer", tok, "--quiet"]) == 0
    prov = json.load(open(tmp_path / "a" / "config.json"))["fastcram"]
    assert prov["data_manifest_sha256"] is None and prov["tokenizer_sha256"] == sha256_file(tok)
