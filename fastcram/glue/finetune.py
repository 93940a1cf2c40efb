"""GLUE fine-tuning and scoring of a pretrained run: `fastcram eval glue RUN_DIR`.

Protocol (RECIPE "Evaluation: GLUE"): per task and seed, the pretrained encoder (dropout 0.1) plus a fresh
head (first token -> Linear hidden->1024, Tanh, dropout, Linear -> classes; 1 output and MSE for STS-B) is
fine-tuned 5 epochs, batch 16, AdamW lr 4e-5, betas (0.9, 0.98), eps 1e-6, no weight decay, cosine decay
with 10% linear warmup, max length 128; then scored on the dev split(s). The learning rate is the run's
preset's (config.Preset.finetune_lr: the recipe's 4e-5 is for crammed-bert; the tiny preset's is 1e-3) unless
--lr gives one. The reported number of a task is
the median over seeds; the average is over the 9 numbers (MNLI matched and mismatched separately).

Speed: inputs are `<cls> A <sep> [B <sep>]`, padded only to the longest sequence of their batch (rounded up
to a multiple of 8) with an SDPA attention mask. Training batches are length-bucketed (shuffle, sort within
pools of 50 batches, shuffle the batch order) so little compute goes to padding; evaluation runs in length
order. The encoded task lives on the device and each epoch's order is sent once, so the loop never copies
per step nor synchronises with the host except once per epoch (the loss for the log line). The model runs
on the same ops backend as pretraining, under bf16 autocast and torch.compile on a GPU, eagerly on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..train import checkpoint as ckpt
from . import data as glue_data
from . import metrics as glue_metrics
from ..config import PRESETS, ModelConfig, Preset, TrainConfig, from_dict
from ..config import positive_float as _positive_float, positive_int as _positive_int
from ..files import WriteError, atomic_write_bytes, atomic_write_json, check_output_file
from ..errors import UserError
from ..model import CrammedBert
from ..data.run_tokenizer import run_tokenizer
from ..data.tokenizer import DocumentEncoder, SpecialIds


@dataclass
class Protocol:
    """The recipe's fine-tuning hyperparameters (the CLI may shorten epochs for smoke runs)."""
    epochs: int = 5
    batch_size: int = 16
    lr: float | None = None  # None: the run's preset's (config.Preset.finetune_lr)
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps with a linear warmup, then cosine decay to 0
    max_len: int = 128
    dropout: float = 0.1
    head_dim: int = 1024
    eval_batch: int = 256  # evaluation only: any size gives the same predictions


@dataclass
class GlueOptions:
    run_dir: str
    tasks: list[str] = field(default_factory=lambda: list(glue_data.TASKS))
    data_dir: str | None = None  # None: Hugging Face nyu-mll/glue
    seeds: int = 5
    out: str | None = None  # JSON path; the table goes beside it as .md. None: RUN_DIR/glue.json
    kernels: str | None = None  # None: the run's own backend (torch where triton cannot run here)
    max_examples: int | None = None  # cap every split (smoke runs on CPU)
    device: str = "auto"
    compile: bool | None = None  # None: on GPU only
    tokenizer: str | None = None  # None: the tokenizer of the run's data folder
    trust_checkpoint: bool = False  # also read a checkpoint without checksum (version 1) by full unpickling
    protocol: Protocol = field(default_factory=Protocol)
    progress: bool = True


def finetune_lr(preset_name: str | None) -> float:
    """The fine-tuning learning rate a preset's model takes (the recipe's 4e-5 for an unknown preset)."""
    return (PRESETS[preset_name] if preset_name in PRESETS else Preset(ModelConfig())).finetune_lr


def _say(opts: GlueOptions, msg: str) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the pretrained run

@dataclass
class Pretrained:
    cfg: ModelConfig
    state: dict  # encoder state_dict
    tokenizer: object
    special: SpecialIds
    checkpoint: str
    kernels: str  # the backend the run was trained with
    preset: str | None = None  # the run's preset


def run_folder_of(path: str) -> str:
    """The run folder of a run folder or of one of its checkpoint files (RUN/checkpoints/NAME.pt)."""
    if os.path.isdir(path):
        return path
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == ckpt.CKPT_DIR else folder


def load_run(path: str, tokenizer: str | None = None, trust: bool = False) -> Pretrained:
    """Config, checkpoint and tokenizer of a `fastcram train` run: a run folder (its newest usable checkpoint:
    one that fails its checks is named and the next older one tried) or one checkpoint file of it (exit 2
    when that one fails). Checkpoints are read by checkpoint.load_checkpoint, the one loader."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; pass a run folder `fastcram train` wrote or a checkpoint file")
    run_dir = run_folder_of(path)
    config_path = os.path.join(run_dir, "config.json")
    if os.path.isdir(path) and not os.path.isfile(config_path):
        raise UserError(f"{run_dir} is not a fastcram run folder (no config.json); pass a folder `fastcram "
                        f"train` wrote")
    if os.path.isdir(path) and not ckpt.candidates(run_dir):
        raise UserError(f"{run_dir} has no checkpoint (checkpoints/final.pt or step-*.pt); train it first")
    saved = ckpt.load_checkpoint(path, trust=trust)
    config = saved.get("config")
    if not isinstance(config, dict):  # written without its config (tests, old files): the run folder's
        if not os.path.isfile(config_path):
            raise UserError(f"checkpoint {path} holds no run config and {config_path} does not exist; keep the "
                            f"checkpoint in its run folder's {ckpt.CKPT_DIR}/")
        try:
            with open(config_path) as f:
                config = json.load(f)
        except ValueError as e:
            raise UserError(f"{config_path} is not a valid run config ({e})") from None
    try:
        cfg = from_dict(ModelConfig, config["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the run config of {saved['_path']} is not valid ({e})") from None
    ck = saved["_path"]
    state = {k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()}  # a compiled module's keys too
    found = run_tokenizer(config, cfg.vocab_size, ck, tokenizer)
    kernels = config.get("train", {}).get("kernels", "torch")
    return Pretrained(cfg, state, found.tokenizer, found.special, ck, kernels, config.get("preset"))


# ---------------------------------------------------------------- model: encoder + head

class GlueModel(nn.Module):
    """The pretrained encoder and a classification/regression head on the first token."""

    def __init__(self, encoder: CrammedBert, num_outputs: int, head_dim: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dense = nn.Linear(encoder.cfg.hidden, head_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(head_dim, num_outputs)
        self.reset_head()

    def reset_head(self) -> None:
        for lin in (self.dense, self.out):
            nn.init.normal_(lin.weight, 0.0, self.encoder.cfg.init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] padded; lengths [B] -> outputs [B, num_outputs] in fp32."""
        L = input_ids.shape[1]
        keep = torch.arange(L, device=input_ids.device) < lengths[:, None]  # [B, L], True = a real token
        h = self.encoder.encode(input_ids, keep[:, None, None, :])  # [B, L, D]; mask [B, 1, 1, L]
        x = self.drop(torch.tanh(self.dense(h[:, 0])))  # [B, head_dim]
        return self.out(x).float()  # [B, C]


def build_encoder(pre: Pretrained, kernels: str, dropout: float, device: str) -> CrammedBert:
    from ..train.step import build_model  # the same backend checks and errors as pretraining

    cfg = dataclasses.replace(pre.cfg, dropout=dropout)
    enc = build_model(cfg, TrainConfig(kernels=kernels), device)
    _load_encoder(enc, pre)
    return enc


def _load_encoder(enc: CrammedBert, pre: Pretrained) -> None:
    try:
        enc.load_state_dict(pre.state)
    except RuntimeError as e:
        raise UserError(f"checkpoint {pre.checkpoint} does not fit the model its run config describes "
                        f"({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- encoding and batches

@dataclass
class Encoded:
    """A task split as token ids: ids [N, max_len] (pad after each sequence), lengths [N], labels [N]."""
    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def pair_budget(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation of a pair to at most `budget` tokens (A keeps the odd token)."""
    if la + lb <= budget:
        return la, lb
    half_a, half_b = budget - budget // 2, budget // 2
    if la <= half_a:
        return la, budget - la
    if lb <= half_b:
        return budget - lb, lb
    return half_a, half_b


def encode_split(tok, special: SpecialIds, split: glue_data.Split, max_len: int) -> Encoded:
    """`<cls> A <sep>` or `<cls> A <sep> B <sep>`, truncated longest-first to max_len tokens."""
    encode = DocumentEncoder(tok)  # as pretraining encoded text: "<sep>" spelled out in a sentence is not <sep>
    ta = encode(split.a)
    tb = None if split.b is None else encode(split.b)
    n = len(ta)
    ids = np.full((n, max_len), special.pad, dtype=np.int32)
    lengths = np.empty(n, dtype=np.int64)
    for i in range(n):
        if tb is None:
            a = ta[i][:max_len - 2]
            seq = [special.cls, *a, special.sep]
        else:
            la, lb = pair_budget(len(ta[i]), len(tb[i]), max_len - 3)
            seq = [special.cls, *ta[i][:la], special.sep, *tb[i][:lb], special.sep]
        ids[i, :len(seq)] = seq
        lengths[i] = len(seq)
    return Encoded(ids, lengths, split.labels)


def train_batches(lengths: np.ndarray, batch: int, rng: np.random.Generator, pool: int = 50) -> list[np.ndarray]:
    """Length-bucketed batches: shuffle, sort pools of `pool` batches by length, cut, shuffle batch order.
    Only the very last batch can be short."""
    idx = rng.permutation(len(lengths))
    batches = []
    for s in range(0, len(idx), batch * pool):
        block = idx[s:s + batch * pool]
        block = block[np.argsort(lengths[block], kind="stable")]
        batches += [block[i:i + batch] for i in range(0, len(block), batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: np.ndarray, batch: int) -> list[np.ndarray]:
    order = np.argsort(-lengths, kind="stable")  # longest first: the biggest shapes compile first
    return [order[i:i + batch] for i in range(0, len(order), batch)]


PAD_MULTIPLE = 8  # pad each batch to a multiple of 8 tokens: fewer distinct shapes, tensor-core sizes


def padded_len(lengths: np.ndarray, cap: int) -> int:
    m = int(lengths.max())
    return min(-(-m // PAD_MULTIPLE) * PAD_MULTIPLE, cap)


class DeviceSplit:
    """An encoded split resident on the device; batches are gathered there from one index upload/epoch."""

    def __init__(self, enc: Encoded, device: str):
        self.enc = enc
        self.ids = torch.from_numpy(enc.ids).to(device)  # [N, max_len] int32
        self.lengths = torch.from_numpy(enc.lengths).to(device)  # [N]
        self.labels = torch.from_numpy(enc.labels).to(device)  # [N]
        self.device = device

    def batches(self, order: list[np.ndarray]):
        """Yield (input_ids [B, L] int64, lengths [B], labels [B]) per index array; no host sync."""
        flat = torch.from_numpy(np.concatenate(order)).to(self.device, non_blocking=True)  # one upload
        start = 0
        for idx in order:
            rows = flat[start:start + len(idx)]
            L = padded_len(self.enc.lengths[idx], self.ids.shape[1])  # from the host copy: no sync
            start += len(idx)
            yield self.ids[rows, :L].long(), self.lengths[rows], self.labels[rows]


# ---------------------------------------------------------------- fine-tune one seed

def lr_multiplier(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps (step 0 already > 0), then cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _loss(out: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(out[:, 0], labels.float())
    return F.cross_entropy(out, labels)


@torch.no_grad()
def predict(forward, split: DeviceSplit, batch: int, autocast) -> np.ndarray:
    """Model outputs [N, C] for a split, in its original order; one device->host copy at the end."""
    order = eval_batches(split.enc.lengths, batch)
    outs = []
    for ids, lens, _ in split.batches(order):
        with autocast:
            outs.append(forward(ids, lens))
    out = torch.cat(outs).cpu().numpy()
    result = np.empty_like(out)
    result[np.concatenate(order)] = out
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def finetune_seed(model: GlueModel, forward, pre: Pretrained, spec: glue_data.TaskSpec, train: DeviceSplit,
                  dev: dict[str, DeviceSplit], seed: int, proto: Protocol, device: str, say) -> dict:
    """Reset the model to the pretrained weights + a fresh head, fine-tune, score every dev split."""
    torch.manual_seed(seed)
    _load_encoder(model.encoder, pre)
    model.reset_head()
    regression = spec.classes is None
    opt = torch.optim.AdamW(model.parameters(), lr=proto.lr, betas=tuple(proto.betas), eps=proto.eps,
                            weight_decay=proto.weight_decay, fused=device.startswith("cuda"))
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(train.enc) // proto.batch_size)
    total = proto.epochs * steps_per_epoch
    warmup = max(1, round(proto.warmup * total))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    step, real, padded, loss = 0, 0, 0, float("nan")
    _sync(device)
    t0 = time.perf_counter()
    t_first = t0  # end of the first epoch: later epochs give the steady rate (no compile in them)
    model.train()
    for epoch in range(proto.epochs):
        order = train_batches(train.enc.lengths, proto.batch_size, rng)
        loss_sum = torch.zeros((), device=device)  # summed on device, read once per epoch
        for ids, lens, labels in train.batches(order):
            for group in opt.param_groups:
                group["lr"] = proto.lr * lr_multiplier(step, total, warmup)
            with autocast:
                out = forward(ids, lens)
            batch_loss = _loss(out, labels, regression)
            batch_loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += batch_loss.detach()
            step += 1
        real += int(train.enc.lengths.sum())
        padded += sum(len(i) * padded_len(train.enc.lengths[i], train.ids.shape[1]) for i in order)
        loss = loss_sum.item() / len(order)  # the one host sync per epoch
        t_first = time.perf_counter() if epoch == 0 else t_first
        say(f"  {spec.name} seed {seed} epoch {epoch + 1}/{proto.epochs}: train loss {loss:.4f}")
    _sync(device)
    t_end = time.perf_counter()
    train_s = t_end - t0
    steady = (proto.epochs - 1) * len(train.enc) / (t_end - t_first) if proto.epochs > 1 else None

    model.eval()
    t0 = time.perf_counter()
    metrics, n_eval = {}, 0
    for name, split in dev.items():
        out = predict(forward, split, proto.eval_batch, autocast)  # [N, C]
        pred = out[:, 0] if regression else out.argmax(axis=1)
        metrics[name] = glue_metrics.task_metrics(spec.name, pred, split.enc.labels)
        n_eval += len(split.enc)
    eval_s = time.perf_counter() - t0
    return {"seed": seed, "dev": metrics, "train_loss": loss, "train_s": round(train_s, 3),
            "train_examples_per_s": round(proto.epochs * len(train.enc) / train_s, 1),
            "train_examples_per_s_steady": None if steady is None else round(steady, 1),
            "eval_examples_per_s": round(n_eval / max(eval_s, 1e-9), 1),
            "pad_efficiency": round(real / max(padded, 1), 4), "steps": step}


# ---------------------------------------------------------------- the whole evaluation

def _resolve(opts: GlueOptions, pre: Pretrained) -> tuple[str, str, bool]:
    """device, kernels, compile."""
    from ..ops import triton_unavailable_reason
    from ..train.step import resolve_device

    device = resolve_device(opts.device)
    kernels = opts.kernels
    if kernels is None:
        kernels = pre.kernels
        if kernels == "triton" and triton_unavailable_reason(device.split(":")[0]):
            _say(opts, f"fastcram: the run used --kernels triton, which cannot run on {device} here; "
                       f"fine-tuning with --kernels torch")
            kernels = "torch"
    compile_ = device.startswith("cuda") if opts.compile is None else opts.compile
    return device, kernels, compile_


def _check_opts(opts: GlueOptions) -> None:
    p = opts.protocol
    for name, v in (("--seeds", opts.seeds), ("--epochs", p.epochs), ("--batch-size", p.batch_size)):
        if v < 1:
            raise UserError(f"{name} must be at least 1, got {v}")
    if opts.max_examples is not None and opts.max_examples < 1:
        raise UserError(f"--max-examples must be at least 1, got {opts.max_examples}")
    if opts.data_dir is not None and not os.path.isdir(opts.data_dir):
        raise UserError(f"--data-dir {opts.data_dir} does not exist; pass the folder that holds the GLUE "
                        f"task folders (CoLA/, SST-2/, ...)")


def _run_tasks(opts: GlueOptions, pre: Pretrained, data: dict, encoder: CrammedBert, proto: Protocol,
               device: str, compile_: bool) -> dict:
    """Every task and seed -> {task: runs, medians over seeds, throughput}."""
    tasks = {}
    for name, td in data.items():
        t0 = time.perf_counter()
        enc = {"train": encode_split(pre.tokenizer, pre.special, td.train, proto.max_len)}
        enc.update({s: encode_split(pre.tokenizer, pre.special, d, proto.max_len) for s, d in td.dev.items()})
        train = DeviceSplit(enc.pop("train"), device)
        dev = {s: DeviceSplit(e, device) for s, e in enc.items()}
        model = GlueModel(encoder, td.spec.num_outputs, proto.head_dim, proto.dropout).to(device)
        forward = torch.compile(model) if compile_ else model  # one compile per task, reused by every seed
        runs = []
        for seed in range(opts.seeds):
            r = finetune_seed(model, forward, pre, td.spec, train, dev, seed, proto, device,
                              lambda m: _say(opts, m))
            runs.append(r)
            _say(opts, f"{name} seed {seed}: " + "; ".join(
                f"{s} " + " ".join(f"{k} {v:.2f}" for k, v in m.items()) for s, m in r["dev"].items())
                 + f" | {r['train_examples_per_s_steady'] or r['train_examples_per_s']:.0f} train ex/s, "
                   f"{r['eval_examples_per_s']:.0f} eval ex/s, padding efficiency {100 * r['pad_efficiency']:.0f}%")
        rates = [r["train_examples_per_s_steady"] or r["train_examples_per_s"] for r in runs]
        tasks[name] = {"train_examples": len(train.enc), "dev_examples": {s: len(d.enc) for s, d in dev.items()},
                       "runs": runs, "median": glue_metrics.median_over_seeds([r["dev"] for r in runs]),
                       "train_examples_per_s": float(np.median(rates)), "wall_s": round(time.perf_counter() - t0, 3)}
    return tasks


@contextlib.contextmanager
def _recompile_limit(n: int):
    """Allow more compiled variants of GlueModel.forward than dynamo's default 8: each head width
    (2, 3 or 1 outputs) x train/eval x the first static shape is one, and past the limit dynamo would
    silently fall back to eager."""
    import torch._dynamo  # noqa: F401 (makes torch._dynamo.config importable on every version)

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(n, getattr(cfg, name))}):
        yield


def report_paths(out: str | None, run_dir: str) -> tuple[str, str]:
    """(JSON report, markdown table) of --out, checked before any work: both writable, and two files (a
    --out ending in .md would be overwritten by the table)."""
    flag = "--out" if out else f"the default report path (--out {os.path.join(run_dir, 'glue.json')})"
    out_json = out or os.path.join(run_dir, "glue.json")
    out_md = os.path.splitext(out_json)[0] + ".md"
    if os.path.abspath(out_md) == os.path.abspath(out_json):
        raise WriteError(out_json, message=f"--out {out_json}: the report is JSON and the table is written beside "
                                           f"it as {os.path.basename(out_md)}, the same file; give a .json name, "
                                           f"e.g. {os.path.splitext(out_json)[0]}.json")
    check_output_file(out_json, flag, make_parent=True, example="glue.json")
    check_output_file(out_md, f"{flag} (its table {out_md})", example="glue.md")
    return out_json, out_md


def run_glue(opts: GlueOptions) -> dict:
    """Fine-tune and score every task and seed; write the JSON report and the markdown table."""
    _check_opts(opts)
    if not os.path.exists(opts.run_dir):
        raise UserError(f"{opts.run_dir} does not exist; pass a run folder `fastcram train` wrote or a checkpoint "
                        f"file")
    run_dir = run_folder_of(opts.run_dir)
    out_json, out_md = report_paths(opts.out, run_dir)  # before hours of fine-tuning, not after
    pre = load_run(opts.run_dir, opts.tokenizer, opts.trust_checkpoint)
    device, kernels, compile_ = _resolve(opts, pre)
    lr_from = "--lr" if opts.protocol.lr is not None else f"preset {pre.preset}"
    opts = dataclasses.replace(opts, protocol=dataclasses.replace(opts.protocol, lr=opts.protocol.lr or
                                                                  finetune_lr(pre.preset)))
    proto = dataclasses.replace(opts.protocol, max_len=min(opts.protocol.max_len, pre.cfg.seq_len))

    # all data first: a bad file in the last task must not surface after hours of fine-tuning
    data = {t: glue_data.load_task(t, opts.data_dir, opts.max_examples) for t in opts.tasks}
    encoder = build_encoder(pre, kernels, proto.dropout, device)
    _say(opts, f"fastcram eval glue: {opts.run_dir} ({os.path.basename(pre.checkpoint)}), tasks "
               f"{','.join(opts.tasks)}, {opts.seeds} seed(s), {proto.epochs} epoch(s), lr {proto.lr:g} "
               f"({lr_from}), kernels {kernels}, "
               f"compile {compile_}, device {device}")

    with _recompile_limit(64):
        tasks = _run_tasks(opts, pre, data, encoder, proto, device, compile_)
    _say(opts, "train examples/s (median over seeds, steady epochs where there are several): " + ", ".join(
        f"{t} {v['train_examples_per_s']:.0f}" for t, v in tasks.items()))

    summary = glue_metrics.summarize({t: v["median"] for t, v in tasks.items()})
    label = os.path.basename(os.path.normpath(run_dir))
    table = glue_metrics.format_table(label, summary)
    report = {"run_dir": os.path.abspath(run_dir), "checkpoint": pre.checkpoint, "kernels": kernels,
              "device": device, "compile": compile_, "seeds": opts.seeds, "data": opts.data_dir or glue_data.HF_DATASET,
              "max_examples": opts.max_examples, "protocol": dataclasses.asdict(proto),
              "lr_from": lr_from, **summary,
              "tasks": tasks, "table": table}
    atomic_write_json(out_json, report)
    atomic_write_bytes(out_md, table.encode())
    return {**report, "json_path": out_json, "md_path": out_md}


# ---------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run (GLUE fine-tuning)")
    esub = p.add_subparsers(dest="eval_cmd", required=True)
    g = esub.add_parser("glue", help="fine-tune a run on GLUE tasks and score it on the dev sets")
    g.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `fastcram train` (its newest usable "
                                                      "checkpoint), or one checkpoint file of it")
    g.add_argument("--tasks", default=",".join(glue_data.TASKS),
                   help=f"comma-separated tasks (default all: {','.join(glue_data.TASKS)})")
    g.add_argument("--data-dir", metavar="DIR", help="GLUE folders (CoLA/, SST-2/, MRPC/, STS-B/, QQP/, MNLI/, "
                                                     "QNLI/, RTE/); default: Hugging Face nyu-mll/glue")
    g.add_argument("--seeds", type=_positive_int("--seeds"), default=5, help="fine-tuning runs per task; the "
                                                                             "median is reported (default 5)")
    g.add_argument("--out", metavar="FILE", help="JSON report (default RUN_DIR/glue.json); the markdown "
                                                 "table is written beside it as .md")
    g.add_argument("--kernels", choices=["torch", "triton"], help="ops backend (default: the run's own)")
    g.add_argument("--epochs", type=_positive_int("--epochs"), default=5)
    g.add_argument("--max-examples", type=_positive_int("--max-examples"),
                   help="use at most N examples of every split (a fixed random subset; smoke runs)")
    g.add_argument("--batch-size", type=_positive_int("--batch-size"), default=16)
    g.add_argument("--lr", type=_positive_float("--lr"),
                   help="fine-tuning learning rate (default: the run's preset's: 4e-5 for crammed-bert, the "
                        "recipe's; 1e-3 for tiny)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model (default on GPU)")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly (default on CPU)")
    g.add_argument("--tokenizer", metavar="FILE", help="the run's tokenizer.json, if its data folder moved")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="also read a checkpoint without checksum (version 1) by full unpickling, which can run "
                        "code; only for checkpoints you made yourself")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.set_defaults(func=cmd_eval_glue)


def cmd_eval_glue(args) -> int:
    proto = Protocol(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    opts = GlueOptions(run_dir=args.run_dir, tasks=glue_data.parse_tasks(args.tasks), data_dir=args.data_dir,
                       seeds=args.seeds, out=args.out, kernels=args.kernels, max_examples=args.max_examples,
                       device=args.device, compile=args.compile, tokenizer=args.tokenizer, protocol=proto,
                       progress=not args.quiet, trust_checkpoint=args.trust_checkpoint)
    report = run_glue(opts)
    print(report["table"], end="")
    print(f"wrote {report['json_path']} and {report['md_path']}", file=sys.stderr)
    return 0
