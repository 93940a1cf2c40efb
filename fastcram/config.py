"""Configuration dataclasses and presets. Config objects are built by the CLI and passed down.

Also the argparse value types every subcommand shares: bad values become one-line usage errors (exit 2).
Imports no other fastcram module.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    vocab_size: int = 32768  # set from the data's tokenizer when a run starts
    hidden: int = 768  # d_model
    layers: int = 16
    heads: int = 12  # head dim = hidden / heads
    ffn: str = "geglu"  # "geglu" (recipe) or "gelu" (classic ablation)
    intermediate: int = 3072  # width of the first FFN matmul's output (GLU: split into two halves)
    seq_len: int = 128
    norm_eps: float = 1e-12
    init_std: float = 0.02
    dropout: float = 0.0  # off in pretraining, 0.1 for fine-tuning
    # The last block computes queries, attention output, out-projection, FFN and final norm only at the
    # predicted rows (keys and values still cover every position): exact, and fewer FLOPs.
    sparse_last_layer: bool = True

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.ffn not in ("geglu", "gelu"):
            raise ValueError(f"ffn must be 'geglu' or 'gelu', not {self.ffn!r}")
        if self.ffn == "geglu" and self.intermediate % 2:
            raise ValueError(f"a GLU FFN needs an even intermediate size, not {self.intermediate}")

    @property
    def ffn_out_in(self) -> int:
        """Input width of the second FFN matmul."""
        return self.intermediate // 2 if self.ffn == "geglu" else self.intermediate


@dataclass
class DataConfig:
    seq_len: int = 128  # tokens per block
    mask_prob: float = 0.25  # fraction of each block predicted; round(p * seq_len) positions exactly
    mask_token_frac: float = 0.8  # of the predicted positions: replaced by <mask>
    random_token_frac: float = 0.1  # ... replaced by a random token (the rest stay unchanged)
    compression_threshold: float = 0.25  # drop a document when tokens / characters >= this
    vocab_size: int = 32768  # for a tokenizer trained by `data prepare`
    shard_blocks: int = 65536  # blocks per shard file (65536 x 128 x 2 bytes = 16 MiB)
    doc_chars: int = 4000  # plain text: consecutive paragraphs grouped into documents of about this size

    @property
    def masked_per_seq(self) -> int:
        return round(self.mask_prob * self.seq_len)


@dataclass
class TrainConfig:
    budget_s: float = 24 * 3600.0  # wall-clock budget; compile time counts
    micro_batch: int = 256  # sequences per forward/backward
    final_batch: int = 8192  # sequences per optimizer step at the end of the ramp
    batch_ramp_until: float = 0.6  # progress at which the batch reaches final_batch
    lr: float = 1e-3  # peak learning rate
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-12
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    kernels: str = "torch"  # ops backend: "torch" | "triton" | "auto" (chosen by timing whole steps)
    per_op: dict | None = None  # op -> backend, overriding `kernels` op by op (what --kernels auto chose)
    norm_kernels: str | None = None  # override for layer_norm/add_layer_norm: "torch" | "triton" | "cuda"
    compile: bool = True
    compile_mode: str = "default"  # torch.compile mode: "default" | "max-autotune-no-cudagraphs" |
    # "reduce-overhead" (CUDA graphs) | "auto" (chosen by timing whole steps)
    attention: str = "default"  # SDPA backend: "default" (PyTorch's own choice) | "flash" | "cudnn" |
    # "efficient" | "math" | "auto" (chosen by timing whole steps)
    residual_dtype: str = "fp32"  # dtype of the residual stream under autocast: "fp32" | "bf16"
    autocast: str = "auto"  # mixed precision: "auto" (bf16 on a GPU, off on a CPU) | "bf16" | "off"
    retune: bool = False  # ignore the tuning cache and measure again
    seed: int = 0
    log_interval_s: float = 10.0  # host syncs only at these intervals
    checkpoint_interval_s: float = 600.0
    keep_checkpoints: int = 2  # periodic checkpoints kept besides final.pt
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    micro_batch_auto: bool = False  # search the micro-batch at start-up (charged to the budget)
    profile_steps: str | None = None  # "A:B": torch.profiler over optimizer steps A..B-1
    telemetry_interval_s: float = 5.0  # NVML sampling period
    sync_debug: bool = False  # make any host sync inside the hot loop an error (CUDA only)
    deterministic: bool = False  # bit-identical reruns on CPU: schedules follow step / max_steps
    verify_data: bool = False  # verify every shard at start (default: each before its first use, on the loader thread)
    stop_on_checkpoint_error: bool = False  # default: report a failed checkpoint write and train on
    unsaved_limit: float = 0.1  # share of the budget a run may go without a checkpoint written; past it, it stops
    max_bad_steps: int = 20  # consecutive non-finite steps (seen at a log interval) that stop the run
    fault_nan_steps: tuple = ()  # fault injection for tests: make these steps' loss NaN
    max_steps: int | None = None  # stop after this many optimizer steps even if budget remains (tests, profiling)
    # Held-out MLM loss (the data's held-out split), off the budget clock, at log intervals:
    eval_every_s: float | None = None  # every this many budget seconds (None: 2% of the budget, >= 10 s; 0: off)
    eval_growth: float | None = None  # instead: each time the budget spent has grown by this fraction
    eval_blocks: int = 512  # held-out blocks evaluated (spread evenly over the split; all when fewer)
    eval_seed: int = 0  # seed of the held-out masks: the same positions every evaluation and every run
    target_loss: float | None = None  # stop (and finish normally) once the held-out loss is at most this


@dataclass
class Preset:
    model: ModelConfig
    train_overrides: dict = field(default_factory=dict)  # TrainConfig fields this preset changes
    finetune_lr: float = 4e-5  # `eval glue`'s default fine-tuning learning rate (the recipe's, for crammed-bert)


PRESETS: dict[str, Preset] = {
    "crammed-bert": Preset(ModelConfig()),
    "bert-classic-ffn": Preset(ModelConfig(ffn="gelu", intermediate=3072)),
    # Small enough that two CPU cores visibly lower the MLM loss in minutes.
    "tiny": Preset(
        ModelConfig(vocab_size=8192, hidden=128, layers=2, heads=2, intermediate=512),
        {"micro_batch": 32, "final_batch": 128, "log_interval_s": 5.0, "checkpoint_interval_s": 60.0},
        # a 2-minute CPU run fine-tuned on a held-out SST-2-style set: 4e-5 gave 57.0% (majority 56.1%),
        # 2e-4 62.9%, 1e-3 69.9% (issue 20's measurements)
        finetune_lr=1e-3,
    ),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], model=dataclasses.replace(PRESETS[name].model))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Rebuild a config dataclass from its dict, ignoring keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return cls(**kw)


@dataclass
class RunOptions:
    """Everything `fastcram train` was asked to do (the CLI builds this)."""
    train: TrainConfig
    preset: str = "tiny"
    data_dir: str | None = None  # None: the built-in corpus
    out_dir: str | None = None  # None: runs/<time>-<preset>
    resume: str | None = None  # a run folder to continue
    trust_checkpoint: bool = False  # also resume from a checkpoint without checksum (version 1), unpickling it fully
    budget_given: bool = True  # False on resume without a budget flag: keep the saved budget
    lr_given: bool = False  # on resume: a new peak lr (e.g. after non-finite steps)
    data: DataConfig = field(default_factory=DataConfig)
    progress: bool = True
    peak_tflops: float | None = None
    flags_given: tuple = ()  # names of the step switches set on the command line (for "how chosen")
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields set on the command line


# ---------------------------------------------------------------- flag values

def _flag_number(flag: str, cast, kind: str, ok, rule: str):
    """An argparse type: `cast` of the text (else "{flag} needs {kind}"), kept when ok(value) (else "{flag}
    {rule}"); both messages quote what was given."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs {kind}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{flag} {rule}, got {s}")
        return v
    return parse


def positive_int(flag: str):
    return _flag_number(flag, int, "a whole number", lambda v: v > 0, "must be positive")


def positive_float(flag: str):
    return _flag_number(flag, float, "a number", lambda v: v > 0 and math.isfinite(v),
                        "must be a finite positive number")


def non_negative_int(flag: str):
    return _flag_number(flag, int, "a whole number", lambda v: v >= 0, "must be 0 or more")


def eval_every(s: str) -> tuple[str, float]:
    """--eval-every: ("every", seconds >= 0; 0 is off) or, for "P%", ("growth", P / 100 > 0)."""
    percent = s.endswith("%")
    try:
        v = float(s[:-1] if percent else s)
    except ValueError:
        v = float("nan")
    if not (v > 0 if percent else v >= 0) or v == float("inf"):
        raise argparse.ArgumentTypeError(f"--eval-every needs seconds of budget (0: off) or a positive percent "
                                         f"such as 2%, got {s!r}")
    return ("growth", v / 100) if percent else ("every", v)
