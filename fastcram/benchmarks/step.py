"""End-to-end training-step throughput behind `fastcram bench step --variants ...`.

One timed step is what the training loop does for one micro-batch: mask a block of tokens on the device
(fastcram.data.loader.mask_batch), forward + backward (fastcram.train.step.make_step, compiled), clip the gradient
norm, AdamW step, zero the gradients. The data is synthetic (uniform random token ids): throughput does not
depend on which tokens they are. Warm-up steps (where torch.compile builds the graph) are not timed; the
host synchronises with the device only around each timed repeat.

A variant is a named set of step-level switch values in the grammar of fastcram.train.switches, e.g.
`kernels=torch,kernels=triton+residual=bf16,kernels=triton+compile_mode=reduce-overhead`; unset switches
keep their defaults (compile on a GPU, bf16 autocast on a GPU). Shorthands:
  fastcram fastcram as a run on this machine would start: on a GPU the switches the auto-tuner cached for
           this model and micro-batch (`fastcram train` tunes them once per machine), or, before any tuning,
           kernels=triton with the other switches at their defaults (the row's note says which); on a CPU
           a CPU run's defaults (torch kernels)
  torch    kernels=torch: the reference ops, fused by inductor (cramming's way: whole-model compile, no
           custom kernels)
  triton   kernels=triton: the fused Triton kernels
  hf       Hugging Face BertForMaskedLM of the same width and depth (SDPA attention, bf16 autocast,
           compiled): the classic FFN, a prediction-head transform and logits for every token, as that
           library trains it; its MFU counts its own FLOPs.
  liger    fastcram with Liger-Kernel's kernels in place of its own where the interfaces allow: Liger's
           LayerNorm (after a torch add for add_layer_norm) and fused linear cross-entropy, fastcram's Triton
           FFN (Liger's GEGLU is GELU's tanh approximation, not the recipe's exact GELU); see liger_ops.py.
Peers: torch (kernels=torch), hf and liger. Each row of the headline variant (`fastcram`, else `triton`)
gets its step time as a ratio to the fastest peer of the same run (`vs_best_peer`, below 1 when fastcram is
faster).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

import torch

from ..config import DataConfig, ModelConfig, TrainConfig, preset
from ..errors import UserError
from ..files import atomic_write_bytes
from ..observe.env_info import environment
from ..observe.metrics import flops_per_token, mfu, peak_tflops
from ..train import switches as sw
from .case import Unavailable

HF = "hf"
FASTCRAM = "fastcram"
LIGER = "liger"
NAMED = (FASTCRAM, HF, LIGER)  # shorthands that are not switch settings
NAMES = {"torch": "fastcram torch", "triton": "fastcram triton", HF: "hf bert",
         LIGER: "fastcram+liger"}  # shorthands' row names
DEFAULT_VARIANTS = (FASTCRAM, "torch", HF, LIGER)
N_SPECIAL = 7  # ids 0..6 are the special tokens (<pad> <s> </s> <unk> <cls> <sep> <mask>)
DATA_NOTE = "synthetic data: uniform random token blocks masked by fastcram.data.loader.mask_batch"
SWITCH_COLUMNS = [k for k in sw.SWITCHES if k not in ("kernels", "compile")]  # each switch's value, one column

CSV_COLUMNS = (["variant", "status", "switches", "kernels", "compiled"] + SWITCH_COLUMNS +
               ["preset", "micro_batch", "seq_len", "steps", "repeats", "tokens_per_s_mean", "tokens_per_s_std",
                "tokens_per_s_min", "tokens_per_s_max", "step_ms_mean", "mfu_mean", "speedup_vs_torch", "role",
                "best_peer", "vs_best_peer", "note", "flops_per_token", "peak_tflops", "peak_mem_mib", "params_m",
                "final_loss", "data", "device", "torch", "triton", "cuda", "git_sha", "date"])


@dataclass
class StepSettings:
    preset: str
    device: str
    micro_batch: int
    steps: int  # timed steps per repeat
    warmup: int  # untimed steps first (torch.compile builds here)
    repeats: int
    compile: bool  # the default of the `compile` switch
    variants: tuple = DEFAULT_VARIANTS  # variant specs (strings) or parsed fastcram.train.switches.Variant
    peak_tflops: float | None = None  # override for GPUs missing from fastcram.observe.metrics' table


@dataclass
class StepRow:
    variant: str
    status: str
    switches: str = ""
    kernels: str = ""
    compiled: bool = False
    values: dict = field(default_factory=dict)  # the other switches' values, one CSV column each
    preset: str = ""
    micro_batch: int = 0
    seq_len: int = 0
    steps: int = 0
    repeats: int = 0
    tokens_per_s_mean: float | None = None
    tokens_per_s_std: float | None = None
    tokens_per_s_min: float | None = None
    tokens_per_s_max: float | None = None
    step_ms_mean: float | None = None
    mfu_mean: float | None = None
    speedup_vs_torch: float | None = None
    role: str = ""  # "fastcram" (the headline variant) | "peer" (torch, hf, liger) | "own" (other variants)
    best_peer: str = ""  # on the headline row: the fastest peer of this run
    vs_best_peer: float | None = None  # on the headline row: its step time / that peer's (< 1: fastcram faster)
    note: str = ""  # how the variant was resolved (e.g. the `fastcram` variant's tuning source)
    flops_per_token: float | None = None
    peak_tflops: float | None = None
    peak_mem_mib: float | None = None
    params_m: float | None = None
    final_loss: float | None = None
    data: str = DATA_NOTE
    env: dict = field(default_factory=dict)

    def csv_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("env", "values")}
        d.update({k: self.values.get(k, "") for k in SWITCH_COLUMNS})
        d.update({k: self.env.get(k, "") for k in ("device", "torch", "triton", "cuda", "git_sha", "date")})
        return {k: "" if d[k] is None else (f"{d[k]:.6g}" if isinstance(d[k], float) else str(d[k]))
                for k in CSV_COLUMNS}


@dataclass
class Variant:
    """A built training step: one call = one micro-batch step; params and FLOPs for the row."""
    step: Callable[[], torch.Tensor]
    params: int
    flops_per_token: float


def parse(specs) -> list[sw.Variant]:
    """Variant specs -> parsed variants; `fastcram`, `hf` and `liger` stay names (not switch settings)."""
    out = []
    for spec in specs:
        if isinstance(spec, sw.Variant):
            out.append(spec)
        elif spec.strip() in NAMED:
            out.append(sw.Variant(spec.strip(), {}))
        else:
            out += sw.parse_variants([spec])
    if not out:
        raise UserError("--variants: no variant given; name at least one, e.g. --variants fastcram kernels=torch")
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--variants: variant {dup[0]!r} is given twice; name them apart with NAME:...")
    return out


def configs(variant: sw.Variant, model_cfg: ModelConfig, s: StepSettings) -> tuple[ModelConfig, TrainConfig]:
    """The variant's switches over the benchmark's defaults."""
    base = TrainConfig(kernels="torch", compile=s.compile, device=s.device, micro_batch=s.micro_batch)
    return sw.apply(variant.settings, model_cfg, base)


# ---------------------------------------------------------------- synthetic data

def _special():
    from ..data.tokenizer import SpecialIds

    return SpecialIds(*range(N_SPECIAL))


def batch_source(model_cfg: ModelConfig, micro_batch: int, device: str, n_blocks: int = 4, seed: int = 0):
    """A function returning the next masked batch; token blocks rotate, masks are drawn fresh each time."""
    from ..train.step import synthetic_batches

    return synthetic_batches(model_cfg, micro_batch, device, _special(), DataConfig().mask_prob, n_blocks, seed)


# ---------------------------------------------------------------- the variants

def tuned_variant(model_cfg: ModelConfig, s: StepSettings) -> tuple[sw.Variant, str]:
    """The `fastcram` variant's switches, and a note saying where they come from."""
    if not s.device.startswith("cuda"):
        return sw.Variant(FASTCRAM, {"kernels": "torch"}), "a CPU run's defaults (nothing is tuned on a CPU)"
    from ..train.autotune import cached_choice

    request = TrainConfig(kernels=sw.AUTO, attention=sw.AUTO, compile_mode=sw.AUTO if s.compile else "default",
                          compile=s.compile, device=s.device, micro_batch=s.micro_batch)
    choice, path = cached_choice(model_cfg, request, s.device, DataConfig().mask_prob)
    if choice:
        return sw.Variant(FASTCRAM, dict(choice)), f"as tuned on this machine (tuning cache {path})"
    return (sw.Variant(FASTCRAM, {"kernels": "triton"}),
            "not tuned on this machine yet (no tuning cached for this model and micro-batch; `fastcram train` "
            "tunes once): kernels=triton, the other switches at their defaults")


def build_liger(model_cfg: ModelConfig, s: StepSettings) -> Variant:
    """fastcram on the Liger ops bundle (liger_ops.py), every switch at its default."""
    try:
        from . import liger_ops
    except ImportError as e:
        raise Unavailable(f"Liger-Kernel is not importable here ({e}); bash tools/fetch_wheels.sh (the GPU check "
                          f"installs it), or pip install liger-kernel") from None
    if not s.device.startswith("cuda"):
        raise Unavailable("Liger-Kernel's LayerNorm needs a CUDA GPU (it does not run in the Triton CPU "
                          "interpreter)")
    _, tcfg = configs(sw.Variant(LIGER, {"kernels": "triton"}), model_cfg, s)
    return build_fastcram(model_cfg, tcfg, s, ops=liger_ops.bundle())


def build_fastcram(model_cfg: ModelConfig, tcfg: TrainConfig, s: StepSettings, ops=None) -> Variant:
    from ..train.step import autocast_dtype, build_model, check_attention, make_optimizer, make_step, optimizer_step

    if tcfg.compile_mode != "default" and not tcfg.compile:  # as train refuses it: the mode would do nothing
        raise Unavailable(f"compile_mode={tcfg.compile_mode} needs a compiled step; run the benchmark with --compile")
    try:
        model = build_model(model_cfg, tcfg, s.device, ops=ops)
        check_attention(tcfg.attention, model_cfg, s.device, autocast_dtype(tcfg, s.device),
                        DataConfig(seq_len=model_cfg.seq_len).masked_per_seq)
        step_fn = make_step(model, tcfg, s.device)
    except UserError as e:  # e.g. triton kernels without a GPU, an SDPA backend missing: the reason goes in the row
        raise Unavailable(str(e)) from None
    optimizer = make_optimizer(model, tcfg, s.device)
    one = optimizer_step(model, optimizer, step_fn, tcfg)
    next_batch = batch_source(model_cfg, s.micro_batch, s.device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    return Variant(lambda: one(next_batch()), params, flops_per_token(model_cfg, DataConfig().mask_prob))


def hf_model_config(model_cfg: ModelConfig):
    """BertConfig of the same width, depth, heads, vocabulary and sequence length (classic GELU FFN)."""
    try:
        from transformers import BertConfig
    except ImportError:
        raise Unavailable("transformers is not installed (pip install transformers)") from None
    return BertConfig(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden,
                      num_hidden_layers=model_cfg.layers, num_attention_heads=model_cfg.heads,
                      intermediate_size=model_cfg.intermediate, hidden_act="gelu", hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, max_position_embeddings=model_cfg.seq_len,
                      type_vocab_size=1, layer_norm_eps=model_cfg.norm_eps)


def hf_flops_per_token(model_cfg: ModelConfig) -> float:
    """HF's own work: classic FFN, decoder on every token, plus the head's d x d transform."""
    dense = dataclasses.replace(model_cfg, ffn="gelu")
    return flops_per_token(dense, mask_prob=1.0) + 6 * model_cfg.hidden ** 2


def _hf_model(config):
    from transformers import BertForMaskedLM

    try:
        return BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    except (TypeError, ValueError, ImportError):  # older releases: set the attribute directly
        config._attn_implementation = "sdpa"
        return BertForMaskedLM(config)


def build_hf(model_cfg: ModelConfig, s: StepSettings) -> Variant:
    config = hf_model_config(model_cfg)
    model = _hf_model(config).to(s.device)
    model.train()
    cuda = s.device.startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-12, weight_decay=0.01,
                                  fused=cuda)
    forward = torch.compile(model) if s.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    next_batch = batch_source(model_cfg, s.micro_batch, s.device)

    def one_step() -> torch.Tensor:
        b = next_batch()
        B, L = b.input_ids.shape
        # HF wants labels per position: -100 (ignored) except at the predicted ones
        labels = torch.full((B * L,), -100, dtype=torch.long, device=b.input_ids.device)  # [B * L]
        labels = labels.scatter(0, b.positions, b.labels).view(B, L)  # [B, L]
        with autocast:
            loss = forward(input_ids=b.input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    params = sum(p.numel() for p in model.parameters())
    return Variant(one_step, params, hf_flops_per_token(model_cfg))


def build_variant(variant: sw.Variant, model_cfg: ModelConfig, s: StepSettings) -> Variant:
    if variant.name == HF and not variant.settings:
        return build_hf(model_cfg, s)
    if variant.name == LIGER and not variant.settings:
        return build_liger(model_cfg, s)
    return build_fastcram(*configs(variant, model_cfg, s), s)


# ---------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variant(v: Variant, s: StepSettings, tokens_per_step: int) -> tuple[list[float], float]:
    """tokens/s of each repeat, and the last loss (read once, after the timed region)."""
    loss = None
    for _ in range(s.warmup):
        loss = v.step()
    _sync(s.device)
    rates = []
    for _ in range(s.repeats):
        t0 = time.perf_counter()
        for _ in range(s.steps):
            loss = v.step()
        _sync(s.device)
        rates.append(tokens_per_step * s.steps / (time.perf_counter() - t0))
    return rates, float(loss)


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _row(variant: sw.Variant, model_cfg: ModelConfig, s: StepSettings, env: dict, peak: float | None) -> StepRow:
    row = StepRow(NAMES.get(variant.name, variant.name), "ok", preset=s.preset, micro_batch=s.micro_batch,
                  seq_len=model_cfg.seq_len, steps=s.steps, repeats=s.repeats, peak_tflops=peak,
                  role=role(variant), env=env)
    if variant.name == HF and not variant.settings:
        row.kernels, row.compiled = "-", s.compile
        return row
    if variant.name == LIGER and not variant.settings:
        from .peers import LIGER_STEP_OPS

        row.kernels, row.compiled = "+".join(f"{op}:{b}" for op, b in LIGER_STEP_OPS.items()), s.compile
        return row
    m_cfg, t_cfg = configs(variant, model_cfg, s)
    values = sw.current(m_cfg, t_cfg)
    row.switches = sw.label(variant.settings)
    row.kernels = values["kernels"] + "".join(f"+{k[len(sw.OP_PREFIX):]}:{v}" for k, v in values.items()
                                              if k.startswith(sw.OP_PREFIX))
    row.compiled = t_cfg.compile
    row.values = {k: values[k] for k in SWITCH_COLUMNS}
    return row


def role(variant: sw.Variant) -> str:
    """"peer" for what users would pick instead (torch, hf, liger); "own" for fastcram's variants (run() marks
    the headline one "fastcram")."""
    if (variant.name in (HF, LIGER) and not variant.settings) or variant.settings == {"kernels": "torch"}:
        return "peer"
    return "own"


def measure_variant(variant: sw.Variant, model_cfg: ModelConfig, s: StepSettings, env: dict, peak: float | None,
                    log: TextIO) -> StepRow:
    row = _row(variant, model_cfg, s, env, peak)
    cuda = s.device.startswith("cuda")
    v = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(s.device)
        v = build_variant(variant, model_cfg, s)
        row.params_m, row.flops_per_token = v.params / 1e6, v.flops_per_token
        print(f"{row.variant}: {v.params / 1e6:.1f}M params, {s.warmup} warm-up step(s)"
              f"{' (compiling)' if row.compiled else ''} ...", file=log, flush=True)
        rates, row.final_loss = time_variant(v, s, s.micro_batch * model_cfg.seq_len)
    except Unavailable as e:
        row.status = f"unavailable: {e}"
        return row
    except Exception as e:  # one broken variant must not hide the others
        row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return row
    finally:
        if cuda and row.status == "ok":
            row.peak_mem_mib = torch.cuda.max_memory_allocated(s.device) / 2**20
        del v
        try:
            _release(s.device)
        except Exception as e:  # never hides the variant's own failure, nor stops the next variant
            if row.status == "ok":
                row.status = f"error: releasing its compiled graphs: {type(e).__name__}: {e}"[:300]
    return _fill(row, rates, model_cfg, s, peak) if row.status == "ok" else row


def _fill(row: StepRow, rates: list[float], model_cfg: ModelConfig, s: StepSettings, peak: float | None) -> StepRow:
    row.tokens_per_s_mean, row.tokens_per_s_std = _stats(rates)
    row.tokens_per_s_min, row.tokens_per_s_max = min(rates), max(rates)
    row.step_ms_mean = 1e3 * s.micro_batch * model_cfg.seq_len / row.tokens_per_s_mean
    row.mfu_mean = mfu(row.tokens_per_s_mean, row.flops_per_token, peak)  # None on the CPU: "n/a"
    if not math.isfinite(row.final_loss):  # a fast step that computes garbage is not a result
        row.status = f"error: the loss is {row.final_loss} after {s.warmup + s.repeats * s.steps} steps"
    return row


def _release(device: str) -> None:
    from ..train.step import release_compiled

    release_compiled(device)  # the next variant compiles its own graph, within the recompile limits


def run(s: StepSettings, csv_path: str, log: TextIO = sys.stderr) -> list[StepRow]:
    """Every requested variant, one after another; the CSV is rewritten (atomically) as each one finishes, so
    a run stopped half-way leaves the variants it finished, with the ratios known so far."""
    model_cfg = preset(s.preset).model
    env = {**environment(s.device), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    peak = peak_tflops(env["device"] if s.device.startswith("cuda") else None, s.peak_tflops)
    variants, notes, headline = _resolve(parse(s.variants), model_cfg, s)
    print(f"step benchmark: {s.preset} on {env['device']}, micro-batch {s.micro_batch} x {model_cfg.seq_len} "
          f"tokens, {s.repeats} repeats of {s.steps} steps; {DATA_NOTE}", file=log, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    rows: list[StepRow] = []
    write_csv(csv_path, rows)
    for variant in variants:
        row = measure_variant(variant, model_cfg, s, env, peak, log)
        row.note = notes.get(variant.name, "")
        row.role = "fastcram" if variant.name == headline else row.role
        rows.append(row)
        _speedups(rows)  # a later peer can change the headline row's ratio: the whole file is rewritten
        write_csv(csv_path, rows)
        print(f"{row.variant}: {_summary(row)}", file=log, flush=True)
    return rows


def write_csv(path: str, rows: list[StepRow]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow(r.csv_dict())
    atomic_write_bytes(path, buf.getvalue().encode())


def _resolve(variants: list[sw.Variant], model_cfg: ModelConfig, s: StepSettings) -> tuple[list, dict, str]:
    """The `fastcram` variant's switches filled in; name -> note; the headline variant's name: `fastcram`, or
    else the first variant that is kernels=triton alone."""
    out, notes = [], {}
    for v in variants:
        if v.name == FASTCRAM and not v.settings:
            v, notes[FASTCRAM] = tuned_variant(model_cfg, s)
        out.append(v)
    headline = next((v.name for v in out if v.name == FASTCRAM),
                    next((v.name for v in out if v.settings == {"kernels": "triton"}), ""))
    return out, notes, headline


def _speedups(rows: list[StepRow]) -> None:
    """Against the plain torch step (kernels=torch, every other switch at its default); the headline row's
    step time as a ratio to the fastest peer's."""
    base = next((r.tokens_per_s_mean for r in rows if r.switches == "kernels=torch" and r.role != "fastcram"
                 and r.tokens_per_s_mean), None)
    for r in rows:
        if base and r.tokens_per_s_mean:
            r.speedup_vs_torch = r.tokens_per_s_mean / base
    best = max((r for r in rows if r.role == "peer" and r.status == "ok" and r.tokens_per_s_mean),
               key=lambda r: r.tokens_per_s_mean, default=None)
    for r in rows:
        if r.role == "fastcram" and best is not None:
            r.best_peer = best.variant
            if r.tokens_per_s_mean:
                r.vs_best_peer = best.tokens_per_s_mean / r.tokens_per_s_mean  # = fastcram's step time / the peer's


def _summary(r: StepRow) -> str:
    if r.tokens_per_s_mean is None:
        return r.status
    return f"{r.tokens_per_s_mean:,.0f} tok/s (std {r.tokens_per_s_std:,.0f}), MFU {_pct(r.mfu_mean)}"


def _pct(u: float | None) -> str:
    return "n/a" if u is None else f"{100 * u:.1f}%"


TABLE_HEADERS = ["variant", "switches", "compiled", "tokens/s mean", "std", "min-max", "step ms", "MFU", "vs torch",
                 "/ best peer", "peak MiB", "params M", "loss", "status"]


def table_cells(rows: list[StepRow]) -> list[list[str]]:
    cells = []
    for r in rows:
        ok = r.tokens_per_s_mean is not None
        cells.append([
            r.variant, r.switches or "-", "yes" if r.compiled else "no",
            f"{r.tokens_per_s_mean:,.0f}" if ok else "", f"{r.tokens_per_s_std:,.0f}" if ok else "",
            f"{r.tokens_per_s_min:,.0f}-{r.tokens_per_s_max:,.0f}" if ok else "",
            f"{r.step_ms_mean:.2f}" if ok else "", _pct(r.mfu_mean) if ok else "",
            f"{r.speedup_vs_torch:.2f}x" if r.speedup_vs_torch else "",
            f"{r.vs_best_peer:.2f} ({r.best_peer})" if r.vs_best_peer is not None else "",
            f"{r.peak_mem_mib:.0f}" if r.peak_mem_mib else "", f"{r.params_m:.1f}" if r.params_m else "",
            f"{r.final_loss:.3f}" if r.final_loss is not None else "", r.status])
    return cells
