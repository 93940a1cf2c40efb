"""`fastcram bench speedrun`: wall time to a held-out MLM loss, over several seeds.

Each run is a `fastcram train` whose budget is --max-minutes (so its schedules follow that budget), evaluated
on the data's held-out split each time the budget spent has grown by --eval-every (2% by default, at least
0.5% of the budget apart), and stopped at the first evaluation whose loss is at most the target. Time to
target is the budget clock at that evaluation: wall time from the start of the budget clock, model build and
compile included, evaluation excluded, like the budget itself. The evaluation before it bounds it from below:
the time is known to within their gap (reported per run). Runs differ by seed (model init, data order,
masks); the held-out masks are the same for all.

Each run is a fresh process (the default runner), so none reuses another's compiled graphs in memory;
inductor's on-disk cache in the cache folder is shared, as between any two runs on one machine.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from ..files import atomic_write_json, check_output_dir, inside, sha256_file

ENV_KEYS = ("git_sha", "torch", "triton", "cuda", "python", "device")
TABLE_HEADERS = ["seed", "reached", "time to target s", "known to s", "tokens", "steps", "tokens/s",
                 "held-out loss", "start-up s", "eval s"]


@dataclass
class SpeedrunSettings:
    target_loss: float
    preset: str
    max_minutes: float
    runs: int = 3
    data_dir: str | None = None  # None: the built-in corpus
    eval_every: str = "2%"  # the train flag's value: a growth percent (or seconds)
    first_seed: int = 0
    out_dir: str = "runs/speedrun"  # one run folder a seed inside it
    train_args: tuple = ()  # more `fastcram train` flags (step switches, --device, ...)

    def train_argv(self, seed: int, run_dir: str) -> list[str]:
        argv = ["train", "--preset", self.preset, "--minutes", repr(float(self.max_minutes)), "--seed", str(seed),
                "--target-loss", repr(float(self.target_loss)), "--eval-every", self.eval_every, "--out", run_dir]
        return argv + (["--data", self.data_dir] if self.data_dir else []) + list(self.train_args)


def command(settings: SpeedrunSettings) -> str:
    """The command that repeats this speedrun, every setting explicit (the run folders aside)."""
    argv = ["fastcram", "bench", "speedrun", "--target-loss", f"{settings.target_loss:.10g}", "--preset",
            settings.preset, "--runs", str(settings.runs), "--max-minutes", f"{settings.max_minutes:g}", "--eval-every",
            settings.eval_every] + (["--data", settings.data_dir] if settings.data_dir else []) + (
        ["--seed", str(settings.first_seed)] if settings.first_seed else [])
    return shlex.join(argv + (["--", *settings.train_args] if settings.train_args else []))


# train flags a speedrun sets itself: given after `--` they would silently change what the report says it ran
OWNED_TRAIN_FLAGS = ("--preset", "--minutes", "--hours", "--seed", "--target-loss", "--eval-every", "--out",
                     "--data", "--resume")


def check_settings(settings: SpeedrunSettings) -> None:
    """Before anything is created: the numbers, the flags passed on to train, the data's held-out split."""
    if settings.runs < 1:
        raise UserError(f"--runs must be at least 1, got {settings.runs}")
    if not settings.max_minutes > 0:
        raise UserError(f"--max-minutes must be positive, got {settings.max_minutes}")
    for arg in settings.train_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_TRAIN_FLAGS:
            raise UserError(f"{flag} after `--`: the speedrun sets it for every run; use the speedrun's own flag "
                            f"(--preset, --max-minutes, --seed, --target-loss, --eval-every, --out, --data)")
    if settings.data_dir:  # the target is a held-out loss: the data must have a held-out split
        from ..data.loader import BlockDataset

        data = BlockDataset(settings.data_dir)
        if data.holdout is None:
            raise UserError(f"--data: {data.no_holdout_reason}")


def check_outputs(out_dir: str, settings: SpeedrunSettings, json_dir: str, json_flag: str) -> None:
    """Before any run: the report's folder can be written and no run folder is there already (a failure
    after the runs would lose them)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; give a folder for the runs")
    check_output_dir(out_dir, "--out")  # read-only or full: said here, not by the first run's train
    taken = [f"seed-{settings.first_seed + i}" for i in range(settings.runs)
             if os.path.exists(os.path.join(out_dir, f"seed-{settings.first_seed + i}"))]
    if taken:
        raise UserError(f"--out {out_dir} already holds {taken[0]}; give a new folder for the runs")
    try:
        os.makedirs(json_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"{json_flag}: cannot create the folder {json_dir} ({e.strerror}); choose another "
                        f"path") from None
    if not os.access(json_dir, os.W_OK):
        raise UserError(f"{json_flag}: the folder {json_dir} is not writable; choose another path")


def subprocess_runner(argv: list[str]) -> int:
    """`fastcram ARGV` in a fresh Python process; its progress goes to this process's stderr."""
    return subprocess.call([sys.executable, "-m", "fastcram", *argv])


@dataclass
class RunResult:
    seed: int
    run_dir: str
    reached: bool
    time_s: float | None  # budget clock at the first evaluation at or under the target
    previous_eval_s: float | None  # the evaluation before it (the time is in (previous, time])
    tokens: int | None
    steps: int | None
    tokens_per_s: float | None  # tokens to target / time to target
    eval_loss: float | None  # at the target, else the last
    startup_s: float | None
    eval_s: float  # wall time of all evaluations (off the clock)
    evaluations: int
    budget_spent_s: float
    switches: dict = field(default_factory=dict)
    data_dir: str | None = None
    environment: dict = field(default_factory=dict)  # the run log's header: git sha, versions, device


def read_run(run_dir: str, seed: int) -> RunResult:
    """What one finished run measured, from its summary.json and log.jsonl."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            log = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"speedrun: the run in {run_dir} left no readable summary ({e}); see its output "
                        f"above") from None
    evals = [r for r in log if r.get("eval_loss") is not None]  # in the order they were made
    hit = summary.get("target")
    time_s = hit["budget_s"] if hit else None
    at = next((i for i, r in enumerate(evals) if hit and r["step"] == hit["step"]), len(evals))
    before = [r["eval_at_s"] for r in evals[:at]]
    return RunResult(
        seed=seed, run_dir=run_dir, reached=hit is not None, time_s=time_s,
        previous_eval_s=before[-1] if before else (0.0 if hit else None),
        tokens=hit["tokens"] if hit else None, steps=hit["step"] if hit else None,
        tokens_per_s=hit["tokens"] / hit["budget_s"] if hit and hit["budget_s"] > 0 else None,
        eval_loss=hit["eval_loss"] if hit else summary.get("final_eval_loss"),
        startup_s=(summary.get("startup") or {}).get("startup_s"),
        eval_s=summary["eval"]["eval_s"], evaluations=summary["eval"]["evaluations"],
        budget_spent_s=summary["budget_spent_s"], switches=summary.get("switches") or {},
        data_dir=config.get("data_dir"),
        environment={k: v for r in log[:1] for k, v in r.items() if k in ENV_KEYS})


def spread(values: list[float]) -> dict | None:
    """mean, sample standard deviation (0 for one value), min, max."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def data_identity(data_dir: str | None) -> dict:
    """The data folder's manifest hash (sha256 of the file) and its tokenizer's (fastcram's vocabulary hash and
    the file's sha256), and the held-out split the target is measured on."""
    if not data_dir:
        return {}
    manifest_path = os.path.join(data_dir, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    try:
        tok_path = inside(data_dir, manifest.get("tokenizer", "tokenizer.json"))
    except ValueError:  # a manifest naming a file outside its folder: nothing of it is read
        tok_path = ""
    ho = manifest.get("holdout") or {}
    return {"data_dir": os.path.abspath(data_dir), "manifest_sha256": sha256_file(manifest_path),
            "tokenizer_hash": manifest.get("tokenizer_hash"),
            "tokenizer_sha256": sha256_file(tok_path) if os.path.isfile(tok_path) else None,
            "training_tokens": manifest.get("total_blocks", 0) * manifest.get("seq_len", 0),
            "holdout": {k: ho.get(k) for k in ("docs", "blocks", "rate", "max_docs", "seed")}}


def run(settings: SpeedrunSettings, runner: Callable[[list[str]], int] | None = None,
        say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
        command: str | None = None) -> dict:
    """Every seed's run, one after the other (runner: default subprocess_runner); the report (not written).
    The settings were checked first (check_settings, before any output folder was made)."""
    runner = runner or subprocess_runner
    results: list[RunResult] = []
    for i in range(settings.runs):
        seed = settings.first_seed + i
        run_dir = os.path.join(settings.out_dir, f"seed-{seed}")
        argv = settings.train_argv(seed, run_dir)
        say(f"speedrun {i + 1}/{settings.runs}: fastcram {' '.join(argv)}")
        code = runner(argv)
        if code != 0:
            raise UserError(f"speedrun: run {i + 1} (seed {seed}) exited with code {code}; its folder is {run_dir}")
        r = read_run(run_dir, seed)
        results.append(r)
        say(f"speedrun {i + 1}/{settings.runs}: " + (
            f"target {settings.target_loss:g} reached at {r.time_s:.1f} s of budget (after the evaluation at "
            f"{r.previous_eval_s:.1f} s), step {r.steps}, {r.tokens:,} tokens" if r.reached else
            f"target {settings.target_loss:g} not reached in {settings.max_minutes:g} min (held-out loss "
            f"{r.eval_loss})"))
    return report(settings, results, command)


def report(settings: SpeedrunSettings, results: list[RunResult], command: str | None = None) -> dict:
    reached = [r for r in results if r.reached]
    return {
        "benchmark": "speedrun", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "target_loss": settings.target_loss, "preset": settings.preset, "max_minutes": settings.max_minutes,
        "eval_every": settings.eval_every, "runs": len(results), "reached": len(reached),
        "time_to_target_s": spread([r.time_s for r in reached]),
        "tokens_to_target": spread([r.tokens for r in reached]),
        "steps_to_target": spread([r.steps for r in reached]),
        "tokens_per_s": spread([r.tokens_per_s for r in reached]),
        "resolution": spread([(r.time_s - r.previous_eval_s) / r.time_s for r in reached if r.time_s]),
        "switches": results[0].switches if results else {},
        "data": data_identity(results[0].data_dir if results else settings.data_dir),
        "environment": {**(results[0].environment if results else {}), "git_dirty": _git_dirty()},
        "command": command,
        "per_run": [r.__dict__ for r in results],
    }


def _git_dirty() -> bool | None:
    """Whether fastcram's checkout had uncommitted changes (the sha alone would not name the code run)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def table_cells(rep: dict) -> list[list[str]]:
    rows = []
    for r in rep["per_run"]:
        rows.append([str(r["seed"]), "yes" if r["reached"] else "no", _num(r["time_s"], 1),
                     _num(None if r["time_s"] is None else r["time_s"] - r["previous_eval_s"], 1),
                     _num(r["tokens"], 0), _num(r["steps"], 0), _num(r["tokens_per_s"], 0), _num(r["eval_loss"], 4),
                     _num(r["startup_s"], 1), _num(r["eval_s"], 1)])
    t, tok, st, rate = (rep[k] for k in ("time_to_target_s", "tokens_to_target", "steps_to_target", "tokens_per_s"))
    if t:
        rows.append(["mean", f"{rep['reached']}/{rep['runs']}", _num(t["mean"], 1), "", _num(tok["mean"], 0),
                     _num(st["mean"], 0), _num(rate["mean"], 0), "", "", ""])
        rows.append(["std", "", _num(t["std"], 1), "", _num(tok["std"], 0), _num(st["std"], 0),
                     _num(rate["std"], 0), "", "", ""])
        rows.append(["min-max", "", f"{t['min']:.1f}-{t['max']:.1f}", "", "", "", "", "", "", ""])
    return rows


def _num(v, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def title(rep: dict) -> str:
    env, data = rep["environment"], rep["data"]
    return (f"fastcram bench speedrun: {rep['preset']} to held-out loss {rep['target_loss']:g} within "
            f"{rep['max_minutes']:g} min, {rep['reached']}/{rep['runs']} runs reached it; {env.get('device')}, "
            f"git {env.get('git_sha')}, data manifest {str(data.get('manifest_sha256'))[:12]}, tokenizer "
            f"{str(data.get('tokenizer_hash'))[:12]}")


def write(rep: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, rep)
