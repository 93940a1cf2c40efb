"""The step-level switches: one table of every choice that changes how a training step runs (not what it
computes), shared by the `train` flags, the auto-tuner, `fastcram bench step --variants` and the run log.

A *variant* is a named set of switch values, written `[NAME:]KEY=VALUE+KEY=VALUE...`; several variants are
separated by commas: `kernels=torch,kernels=triton+residual=bf16`. `kernels.<op>=BACKEND` sets one op of
the ops bundle (e.g. `kernels=triton+kernels.mlm_loss=torch`). Later switches join SWITCHES below and the
grammar, the flags' validation and the run log header follow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..config import ModelConfig, TrainConfig
from ..errors import UserError
from ..ops import BACKENDS, OP_MODULES

ATTENTION = ("default", "flash", "cudnn", "efficient", "math")  # "default": PyTorch's own SDPA dispatch
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
AUTO = "auto"


@dataclass(frozen=True)
class Switch:
    key: str  # its name in variants and in the run log header
    flag: str  # the `fastcram train` flag
    values: tuple[str, ...]  # the fixed values
    tunable: bool  # also accepts "auto": chosen by timing whole steps
    get: Callable[[ModelConfig, TrainConfig], str]
    set: Callable[[ModelConfig, TrainConfig, str], None]
    help: str


def _on_off(v: bool) -> str:
    return "on" if v else "off"


def _set_tcfg(field: str, convert=lambda v: v):
    def set_(m: ModelConfig, t: TrainConfig, v: str) -> None:
        setattr(t, field, convert(v))
    return set_


def _set_sparse(m: ModelConfig, t: TrainConfig, v: str) -> None:
    m.sparse_last_layer = v == "on"


SWITCHES: dict[str, Switch] = {s.key: s for s in (
    Switch("kernels", "--kernels", ("torch", "triton"), True, lambda m, t: t.kernels, _set_tcfg("kernels"),
           "ops backend of every op in the bundle"),
    Switch("attention", "--attention", ATTENTION, True, lambda m, t: t.attention, _set_tcfg("attention"),
           "scaled-dot-product attention backend (torch.nn.attention.sdpa_kernel)"),
    Switch("compile", "--compile", ("on", "off"), False, lambda m, t: _on_off(t.compile),
           _set_tcfg("compile", lambda v: v == "on"), "torch.compile the model"),
    Switch("compile_mode", "--compile-mode", COMPILE_MODES, True, lambda m, t: t.compile_mode,
           _set_tcfg("compile_mode"), "torch.compile mode; reduce-overhead captures CUDA graphs"),
    Switch("residual", "--residual-dtype", ("fp32", "bf16"), False, lambda m, t: t.residual_dtype,
           _set_tcfg("residual_dtype"), "dtype of the residual stream under bf16 autocast"),
    Switch("sparse", "--sparse-last-layer", ("on", "off"), False,
           lambda m, t: _on_off(m.sparse_last_layer), _set_sparse,
           "last block only at the predicted rows (exact)"),
    Switch("autocast", "--autocast", ("auto", "bf16", "off"), False, lambda m, t: t.autocast,
           _set_tcfg("autocast"), "mixed precision: auto = bf16 on a GPU, off on a CPU"),
)}
OP_PREFIX = "kernels."  # kernels.<op>=BACKEND: one op of the bundle
SHORTHANDS = {"torch": {"kernels": "torch"}, "triton": {"kernels": "triton"}}


def allowed(key: str, tunable_ok: bool = True) -> tuple[str, ...]:
    if key.startswith(OP_PREFIX):
        return BACKENDS
    s = SWITCHES[key]
    return s.values + ((AUTO,) if s.tunable and tunable_ok else ())


def check_value(key: str, value: str, where: str, tunable_ok: bool = True) -> None:
    """A UserError naming `where` (a flag or a variant) unless key=value is a valid setting."""
    if key.startswith(OP_PREFIX):
        op = key[len(OP_PREFIX):]
        if op not in OP_MODULES:
            raise UserError(f"{where}: unknown op {op!r} in {key!r}; ops: {', '.join(OP_MODULES)}")
    elif key not in SWITCHES:
        raise UserError(f"{where}: unknown switch {key!r}; switches: {', '.join(SWITCHES)}, "
                        f"{OP_PREFIX}<op>")
    ok = allowed(key, tunable_ok)
    if value not in ok:
        raise UserError(f"{where}: {key}={value} is not a value of {key}; choose one of {', '.join(ok)}")


@dataclass(frozen=True)
class Variant:
    name: str
    settings: dict  # switch key -> value


def parse_variant(text: str, where: str = "--variants", tunable_ok: bool = False) -> Variant:
    """`[NAME:]KEY=VALUE+KEY=VALUE` (or a shorthand: torch, triton) -> a Variant."""
    spec = text.strip()
    name, _, body = spec.rpartition(":") if ":" in spec else ("", "", spec)
    if body in SHORTHANDS:
        return Variant(name or body, dict(SHORTHANDS[body]))
    settings: dict[str, str] = {}
    for part in body.split("+"):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise UserError(f"{where}: {part!r} in {spec!r} is not KEY=VALUE; e.g. kernels=triton+residual=bf16")
        if key in settings:
            raise UserError(f"{where}: {key} is set twice in {spec!r}")
        check_value(key, value, where, tunable_ok)
        settings[key] = value
    return Variant(name or body, settings)


def parse_variants(items: list[str], where: str = "--variants") -> list[Variant]:
    """Variants from `a,b c` style arguments; names must be unique (they key the CSV rows)."""
    out = [parse_variant(spec, where) for item in items for spec in item.split(",") if spec.strip()]
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{where}: variant {dup[0]!r} is given twice; name them apart with NAME:...")
    return out


def apply(settings: dict, model_cfg: ModelConfig, tcfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """Copies of the two configs with the settings applied (kernels first, then the per-op overrides)."""
    m, t = dataclasses.replace(model_cfg), dataclasses.replace(tcfg)
    for key in sorted(settings, key=lambda k: k.startswith(OP_PREFIX)):
        value = settings[key]
        if key.startswith(OP_PREFIX):
            t.per_op = {**(t.per_op or {}), key[len(OP_PREFIX):]: value}
        else:
            SWITCHES[key].set(m, t, value)
    return m, t


def current(model_cfg: ModelConfig, tcfg: TrainConfig) -> dict:
    """Every switch's value in these configs (per-op overrides as kernels.<op>)."""
    values = {key: s.get(model_cfg, tcfg) for key, s in SWITCHES.items()}
    values.update({OP_PREFIX + op: b for op, b in sorted((tcfg.per_op or {}).items())})
    return values


def label(settings: dict) -> str:
    """The settings in the variant grammar, e.g. kernels=triton+residual=bf16."""
    return "+".join(f"{k}={v}" for k, v in settings.items())
