"""`fastcram plot RUN_DIR`: one PNG of a run's log (and telemetry, when there is some)."""
from __future__ import annotations

import io
import os
import sys

from ..errors import UserError
from ..files import atomic_write_bytes, check_output_file, read_jsonl


def _read_jsonl(path: str) -> list[dict]:
    """The records of a run's JSONL file; a line that is not a record (cut by a full disk or a crash) is
    skipped and counted on stderr."""
    if not os.path.isfile(path):
        return []
    try:
        records, bad = read_jsonl(path)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    if bad:
        print(f"fastcram plot: skipped {bad} damaged line(s) of {path} (a record cut by a full disk or a crash)",
              file=sys.stderr)
    return records


def _number(v) -> float:
    """A plotted value: null (an interval whose steps were all skipped) is a gap."""
    return float(v) if isinstance(v, (int, float)) else float("nan")


def plot_run(run_dir: str, out: str | None = None) -> str:
    log = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log):
        raise UserError(f"{run_dir} has no log.jsonl: not a fastcram run folder")
    out = check_output_file(out or os.path.join(run_dir, "run.png"), "--out", example="run.png")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("fastcram plot needs matplotlib: pip install matplotlib (or the [plot] extra)") from None
    recs = [r for r in _read_jsonl(log) if "loss" in r and "progress" in r]
    if not recs:
        raise UserError(f"{log} has no training records yet; plot after the first log interval")
    telemetry = [s for s in _read_jsonl(os.path.join(run_dir, "telemetry.jsonl")) if "time" in s]
    x = [100 * r["progress"] for r in recs]
    panels = [(title, [_number(r.get(key)) for r in recs]) for title, key in
              (("MLM loss", "loss"), ("learning rate", "lr"), ("batch size (sequences)", "batch_size"),
               ("tokens / s", "tokens_per_s"))]
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
    png = io.BytesIO()  # rendered in memory, then written atomically: a full disk leaves no broken PNG
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    atomic_write_bytes(out, png.getbuffer())
    return out
