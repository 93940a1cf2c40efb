"""`fastcram bench plot`: one PNG per op from kernel-benchmark CSVs (and one for step-benchmark CSVs).

Each op's figure has one panel per mode; bars are the providers' median times (p20-p80 as error bars) per
shape, labelled with their % of the measured ceiling. Rows that did not run (unavailable, skipped, error)
are listed under the figure instead of drawn.
"""
from __future__ import annotations

import csv
import os
import sys
from collections import OrderedDict

from ..errors import UserError


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("bench plot needs matplotlib, which is not installed: pip install matplotlib "
                        "(or pip install 'fastcram[plot]')") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_rows(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(kernel rows, step rows) from the CSV files, told apart by their columns."""
    kernel_rows, step_rows = [], []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such CSV file; pass files written by `fastcram bench kernels/step`")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or [])
            if {"op", "provider", "mode", "time_ms"} <= cols:
                kernel_rows.extend(reader)
            elif {"variant", "tokens_per_s_mean"} <= cols:
                step_rows.extend(reader)
            else:
                raise UserError(f"{path}: not a fastcram benchmark CSV (columns {', '.join(sorted(cols))})")
    return kernel_rows, step_rows


def slug(text: str) -> str:
    """A file-name-safe short form of a device name ("NVIDIA H200" -> "nvidia-h200")."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower().split(",")[0])
    return "-".join(p for p in out.split("-") if p)[:40] or "device"


def _group(rows: list[dict], key) -> OrderedDict:
    out: OrderedDict = OrderedDict()
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _num(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def plot_op(plt, op: str, rows: list[dict], path: str) -> None:
    ok = [r for r in rows if r["status"] == "ok" and _num(r["time_ms"])]
    not_run = {r["provider"]: r["status"].split(":")[0] for r in rows if r["status"] != "ok"
               and not any(o["provider"] == r["provider"] for o in ok)}
    missing = sorted(f"{p} ({why})" for p, why in not_run.items())
    modes = list(_group(ok, lambda r: r["mode"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(max(7, 5 * len(modes)), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        _bars(ax, [r for r in ok if r["mode"] == mode])
        ax.set_title(f"{op} {mode}")
    first = (ok or rows)[0]
    fig.suptitle(f"{op}: {first.get('device', '')}, {first.get('dtype', '')}, torch {first.get('torch', '')}, "
                 f"triton {first.get('triton', '')}, {first.get('date', '')}", fontsize=9)
    if missing:  # the CSV's status column says why
        fig.text(0.01, 0.01, "not run: " + ", ".join(missing), fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06 if missing else 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax, rows: list[dict]) -> None:
    shapes = list(_group(rows, lambda r: r["shape"]))
    providers = list(_group(rows, lambda r: r["provider"]))
    width = 0.8 / len(providers)
    for j, prov in enumerate(providers):
        xs, ys, lo, hi, labels = [], [], [], [], []
        for i, shape in enumerate(shapes):
            r = next((r for r in rows if r["shape"] == shape and r["provider"] == prov), None)
            if r is None:
                continue
            t = float(r["time_ms"])
            xs.append(i + (j - (len(providers) - 1) / 2) * width)
            ys.append(t)
            lo.append(t - (_num(r["p20_ms"]) or t))
            hi.append((_num(r["p80_ms"]) or t) - t)
            pct = _num(r.get("pct_of_ceiling", ""))
            labels.append(f"{pct:.0f}%" if pct is not None else "")
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], label=prov, capsize=2)
        ax.bar_label(bars, labels=labels, fontsize=6)
    ax.set_xticks(range(len(shapes)), shapes, fontsize=7)
    ax.set_ylabel("median time (ms), lower is better")
    ax.set_xlabel("shape (bar labels: % of the measured ceiling)", fontsize=8)
    ax.legend(fontsize=7)


def plot_step(plt, rows: list[dict], path: str) -> None:
    ok = [r for r in rows if r["status"] == "ok" and _num(r["tokens_per_s_mean"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    several = len({r.get("device", "") for r in ok}) > 1
    names = [f"{r['variant']}\n{r['preset']} mb{r['micro_batch']}" + (f"\n{slug(r.get('device', ''))}" if several else "")
             for r in ok]
    means = [float(r["tokens_per_s_mean"]) for r in ok]
    stds = [_num(r["tokens_per_s_std"]) or 0.0 for r in ok]
    bars = ax.bar(range(len(ok)), means, yerr=stds, capsize=3)
    ax.bar_label(bars, labels=[f"MFU {100 * float(r['mfu_mean']):.0f}%" if _num(r["mfu_mean"]) else ""
                               for r in ok], fontsize=7)
    ax.set_xticks(range(len(ok)), names, fontsize=7)
    ax.set_ylabel("tokens/s (mean, std over repeats)")
    first = (ok or rows)[0]
    ax.set_title(f"training step: {first.get('device', '')}, {first.get('date', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(paths: list[str], out_dir: str) -> list[str]:
    """Write the PNGs into out_dir; returns their paths."""
    kernel_rows, step_rows = read_rows(paths)
    if not kernel_rows and not step_rows:
        raise UserError(f"{', '.join(paths)}: no rows to plot")
    plt = _matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    measured = [r for r in kernel_rows if r["provider"] != "-"]  # "no cases yet" placeholders have no bars
    several = len({r.get("device", "") for r in measured}) > 1  # never mix devices in one figure
    for (op, device), rows in _group(measured, lambda r: (r["op"], r.get("device", ""))).items():
        if not any(r["status"] == "ok" for r in rows):
            print(f"{op} on {device}: nothing was timed, no figure", file=sys.stderr)
            continue
        name = f"{op}-{slug(device)}.png" if several else f"{op}.png"
        path = os.path.join(out_dir, name)
        plot_op(plt, op, rows, path)
        written.append(path)
    if step_rows:
        path = os.path.join(out_dir, "step.png")
        plot_step(plt, step_rows, path)
        written.append(path)
    return written
