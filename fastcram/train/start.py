"""A run's start-up before its model is built: the options and the cache folder checked, the device chosen,
the data opened (with the model configuration it fixes), and the step switches tuned, or kept on resume."""
from __future__ import annotations

import dataclasses
import os

import torch

from ..config import ModelConfig, RunOptions, TrainConfig, preset
from ..data.builtin import builtin_data, writable_cache_dir
from ..data.loader import BlockDataset
from ..errors import UserError
from . import autotune
from .distributed import DistContext, broadcast_object
from .evaluate import eval_schedule
from .step import resolve_device
from .switches import AUTO


def check_options(tcfg: TrainConfig) -> None:
    """Settings that cannot run together, refused before any work."""
    if not tcfg.budget_s > 0:
        raise UserError(f"the budget must be positive (got {tcfg.budget_s} s); pass e.g. --hours 24 or "
                        f"--minutes 5")
    if tcfg.deterministic and not tcfg.max_steps:
        raise UserError("--deterministic needs --max-steps: its schedules follow the step count, not the clock")
    if tcfg.target_loss is not None and eval_schedule(tcfg) is None:
        raise UserError("--target-loss needs the held-out evaluation that --eval-every 0 turns off")


def check_cache_folder(tcfg: TrainConfig, resuming: bool, main: bool) -> None:
    """The tuning cache lives in the cache folder: when this run tunes, the folder is checked before any work
    (one line naming FASTCRAM_CACHE when it cannot be written). The compile caches placed there were checked
    when they were placed (compile_cache.compile_caches)."""
    tuning = not resuming and (tcfg.micro_batch_auto or any(getattr(tcfg, k) == AUTO for k in autotune.TUNED))
    if main and tuning:
        writable_cache_dir()


def run_device(tcfg: TrainConfig, ctx: DistContext) -> str:
    """The device of this process (its own GPU under torchrun); --deterministic is switched on here."""
    device = resolve_device(tcfg.device)
    if device == "cuda" and ctx.enabled:
        device = f"cuda:{ctx.local_rank}"
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS workspaces
        torch.use_deterministic_algorithms(True)
    return device


def open_data(opts: RunOptions, resumed: dict | None, ctx: DistContext) -> tuple[ModelConfig, str, BlockDataset]:
    """(model config, data folder, data): tokenizer + data; preparing the built-in corpus is one-time set-up,
    outside the budget. The data fixes the model's vocabulary and sequence length."""
    saved = resumed["config"].get("model", {}) if resumed else {}
    overrides = {**opts.model_overrides, **{k: saved[k] for k in ("sparse_last_layer",) if k in saved}}
    model_cfg = dataclasses.replace(preset(opts.preset).model, **overrides)
    if opts.data_dir is None and not ctx.is_main:
        torch.distributed.barrier()  # rank 0 prepares the built-in corpus first
    data_dir = opts.data_dir or builtin_data(model_cfg.vocab_size, opts.data, progress=opts.progress and ctx.is_main)
    if opts.data_dir is None and ctx.is_main and ctx.enabled:
        torch.distributed.barrier()
    data = BlockDataset(data_dir)
    if opts.train.verify_data:  # otherwise the loader verifies each shard on its thread before first use
        data.verify()
    model_cfg.vocab_size, model_cfg.seq_len = data.vocab_size, data.seq_len
    opts.data.seq_len = data.seq_len
    if opts.train.target_loss is not None and data.holdout is None:
        raise UserError(f"--target-loss: {data.no_holdout_reason}")
    return model_cfg, data_dir, data


def tune_switches(model_cfg: ModelConfig, opts: RunOptions, device: str, data: BlockDataset, ctx: DistContext,
                  resumed: dict | None) -> tuple[dict | None, autotune.Tuning]:
    """(per-op kernel choice, tuning): the step-level switches from flags, the tuning cache or measured; a
    resumed run keeps its kernel choice and micro-batch."""
    if resumed is not None:
        return resumed["ops"], autotune.resumed()
    if opts.train.micro_batch_auto and ctx.enabled:
        raise UserError("--micro-batch auto runs on one process; tune with one GPU, then pass the chosen "
                        "--micro-batch to the multi-GPU run")
    return None, autotune.tune(model_cfg, opts.train, opts, device, data, share=lambda obj: broadcast_object(ctx, obj),
                               world_size=ctx.world, write_cache=ctx.is_main)
