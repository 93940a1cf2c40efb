"""`fastcram plot RUN_DIR`: one PNG of a run's log (and telemetry, when there is some)."""
from __future__ import annotations

import json
import os

from ..errors import UserError


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, out: str | None = None) -> str:
    log = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log):
        raise UserError(f"{run_dir} has no log.jsonl: not a fastcram run folder")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("fastcram plot needs matplotlib: pip install matplotlib (or the [plot] extra)") from None
    recs = [r for r in _read_jsonl(log) if "loss" in r]
    if not recs:
        raise UserError(f"{log} has no training records yet; plot after the first log interval")
    telemetry = _read_jsonl(os.path.join(run_dir, "telemetry.jsonl"))
    x = [100 * r["progress"] for r in recs]
    panels = [("MLM loss", [r["loss"] for r in recs]), ("learning rate", [r["lr"] for r in recs]),
              ("batch size (sequences)", [r["batch_size"] for r in recs]),
              ("tokens / s", [r["tokens_per_s"] for r in recs])]
    if any(r.get("mfu") is not None for r in recs):
        panels.append(("MFU (%)", [100 * (r["mfu"] or 0) for r in recs]))
    rows = len(panels) + (1 if telemetry else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.2 * rows), sharex=False, squeeze=False)
    for ax, (title, ys) in zip(axes[:, 0], panels):
        ax.plot(x, ys, lw=1.2)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
    if telemetry:
        ax = axes[-1, 0]
        t0 = telemetry[0]["time"]
        ts = [s["time"] - t0 for s in telemetry]
        ax.plot(ts, [s.get("gpu_util") or 0 for s in telemetry], label="GPU util (%)")
        ax.plot(ts, [s.get("power_w") or 0 for s in telemetry], label="power (W)")
        ax.set_xlabel("seconds since telemetry start", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[len(panels) - 1, 0].set_xlabel("budget used (%)", fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=10)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "run.png")
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
