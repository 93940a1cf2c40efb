"""`fastcram export hf RUN_DIR --out DIR`: a run as a self-contained Hugging Face model folder.

DIR holds model.safetensors (the weights under the `encoder.` prefix), config.json (model_type "fastcram",
auto_map to the modeling code, the run's provenance under "fastcram"), modeling_fastcram.py (torch and
transformers only: masked LM, sequence classification, base model), and the tokenizer files. Before DIR
appears, the written folder is checked: its masked-LM logits on a probe batch (one row padded) must equal
fastcram's own torch-backend model's. The folder is built under a temporary name and renamed into place, so a
DIR that exists is complete.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..files import atomic_write_bytes, check_output_dir
from ..model import CrammedBert
from ..ops import get_ops
from .hf_tokenizer import tokenizer_files
from .run import RunExport, read_run

TEMPLATE = os.path.join(os.path.dirname(__file__), "hf_template", "modeling_fastcram.py")
MODULE = "modeling_fastcram"
WEIGHTS = "model.safetensors"
PREFIX = "encoder."  # base_model_prefix of the written models
# fastcram's GLUE fine-tuning protocol (glue/finetune.py Protocol): encoder dropout, head width, head dropout
FINETUNE_DROPOUT, HEAD_DIM = 0.1, 1024
CHECK_TOLERANCE = 1e-4  # max |logit difference| the export's own check accepts (fp32; the tests ask 1e-5)
HF_PACKAGES = ("transformers", "safetensors", "accelerate")


@dataclass
class ExportOptions:
    run_dir: str
    out: str
    checkpoint: str | None = None  # None: the run's newest (final.pt, else the latest step-*.pt)
    tokenizer: str | None = None  # None: the tokenizer of the run's data folder
    trust_checkpoint: bool = False  # read a version-1 checkpoint the user vouches for (full unpickling)
    progress: bool = True


def require_hf() -> None:
    """The `hf` extra is installed, or one UserError that says how to install it."""
    missing = []
    for name in HF_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"fastcram export hf needs the hf extra ({', '.join(HF_PACKAGES)}); missing: "
                        f"{', '.join(missing)}; install it with pip install -e '.[hf]' in a fastcram checkout "
                        f"(or pip install 'fastcram[hf]')")


def hf_config(cfg: ModelConfig, special, provenance: dict) -> dict:
    """config.json of the exported folder (written by hand: the same bytes whatever transformers is installed)."""
    auto = {"AutoConfig": "FastcramConfig", "AutoModel": "FastcramModel",
            "AutoModelForMaskedLM": "FastcramForMaskedLM",
            "AutoModelForSequenceClassification": "FastcramForSequenceClassification"}
    return {
        "architectures": ["FastcramForMaskedLM"],
        "model_type": "fastcram",
        "auto_map": {k: f"{MODULE}.{v}" for k, v in auto.items()},
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "ffn": cfg.ffn,
        "intermediate_size": cfg.intermediate,
        "max_position_embeddings": cfg.seq_len,
        "layer_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "hidden_dropout_prob": FINETUNE_DROPOUT,  # active only in train mode: fine-tuning, as fastcram's GLUE
        "classifier_hidden_size": HEAD_DIM,
        "classifier_dropout": FINETUNE_DROPOUT,
        "pad_token_id": special.pad, "bos_token_id": special.bos, "eos_token_id": special.eos,
        "sep_token_id": special.sep, "cls_token_id": special.cls, "mask_token_id": special.mask,
        "torch_dtype": "float32",
        "fastcram": provenance,
    }


def reference_model(run: RunExport) -> CrammedBert:
    """fastcram's own model (torch backend) with the run's weights; a checkpoint that does not fit is named."""
    model = CrammedBert(run.cfg, get_ops("torch"))
    try:
        model.load_state_dict(run.state)
    except RuntimeError as e:
        raise UserError(f"checkpoint {run.provenance['checkpoint']} does not fit the model its run config "
                        f"describes ({str(e).splitlines()[0]})") from None
    return model.eval()


def _write_folder(tmp: str, run: RunExport) -> None:
    from safetensors.torch import save

    os.makedirs(tmp)
    weights = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in sorted(run.state.items())}
    files = {WEIGHTS: save(weights, metadata={"format": "pt"}),  # bytes: written below like the other files
             "config.json": (json.dumps(hf_config(run.cfg, run.special, run.provenance), indent=2) + "\n").encode(),
             **tokenizer_files(run.tokenizer, run.special, run.cfg.seq_len)}
    with open(TEMPLATE, "rb") as f:
        files[f"{MODULE}.py"] = f.read()
    for name, data in files.items():
        atomic_write_bytes(os.path.join(tmp, name), data)  # fsynced before the folder is renamed into place


def _load_written(folder: str):
    """The written folder's masked-LM model, built from its own files (no transformers auto-loading)."""
    from safetensors.torch import load_file

    name = f"_fastcram_export_check_{os.getpid()}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{MODULE}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass-like machinery in transformers looks modules up by name
    try:
        spec.loader.exec_module(module)
        config = module.FastcramConfig.from_json_file(os.path.join(folder, "config.json"))
        model = module.FastcramForMaskedLM(config)
        model.load_state_dict(load_file(os.path.join(folder, WEIGHTS)), strict=True)
    finally:
        del sys.modules[name]
    return model.eval()


def probe_batch(cfg: ModelConfig, special) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of ordinary token ids (fixed seed); the second padded after about a third of the length."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(special.all), cfg.vocab_size, (2, cfg.seq_len), generator=g)  # [2, L]
    mask = torch.ones_like(ids)
    n = max(1, cfg.seq_len // 3)
    ids[1, n:], mask[1, n:] = special.pad, 0
    return ids, mask


@torch.no_grad()
def check_folder(folder: str, ref: CrammedBert, run: RunExport) -> float:
    """Largest |logit difference| between the written model and fastcram's on the probe batch (each row of
    fastcram's computed alone, unpadded); a UserError above CHECK_TOLERANCE."""
    model = _load_written(folder)
    ids, mask = probe_batch(run.cfg, run.special)
    got = model(input_ids=ids, attention_mask=mask).logits  # [2, L, V]
    worst = 0.0
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        want = ref.encode(ids[row:row + 1, :n]) @ ref.tok_emb.weight.T  # [1, n, V]
        worst = max(worst, (got[row:row + 1, :n] - want).abs().max().item())
    if not worst <= CHECK_TOLERANCE:
        raise UserError(f"the exported model's logits differ from fastcram's by {worst:.3g} (more than "
                        f"{CHECK_TOLERANCE}); nothing was written to the output folder. Please report this")
    return worst


def _check_out(out: str) -> None:
    """Before anything is read: --out is new or an empty folder, and its parent (where the folder is built under
    a temporary name) exists and takes files."""
    if not out.strip():
        raise UserError("--out is empty; give the folder to write, e.g. --out exported-model")
    if os.path.abspath(out) == os.getcwd():
        raise UserError(f"--out {out} is the current folder; give a new folder inside it, e.g. --out exported-model")
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise UserError(f"--out {out} already exists and is not an empty folder; choose another --out or remove it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"--out {out}: its parent folder {parent} does not exist; create it first")
    check_output_dir(parent, f"--out {out}: its parent folder")


def export_hf(opts: ExportOptions) -> dict:
    """Write the folder; returns {"out", "max_abs_diff", "provenance"}."""
    require_hf()
    _check_out(opts.out)
    run = read_run(opts.run_dir, opts.checkpoint, opts.tokenizer, opts.trust_checkpoint)
    ref = reference_model(run)
    out = os.path.abspath(opts.out)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        _write_folder(tmp, run)
        worst = check_folder(tmp, ref, run)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above): the rename below needs the name free
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    if opts.progress:
        print(f"fastcram export hf: wrote {opts.out} ({run.provenance['checkpoint']}, step "
              f"{run.provenance['step']}); its masked-LM logits equal fastcram's within {worst:.2g}",
              file=sys.stderr)
    return {"out": out, "max_abs_diff": worst, "provenance": run.provenance}
