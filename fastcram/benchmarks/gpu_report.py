"""The markdown report and closing summary of tools/gpu_check.sh (python -m fastcram.benchmarks.gpu_report).

Reads what the script left: <work>/stages.tsv (one line per stage: name, exit code, seconds, time limit,
command, one-line note), each stage's log <work>/<name>.log, <work>/env.txt, and in the output folder
kernels.csv, step.csv, compile.csv, train_log.jsonl, telemetry.jsonl, nvidia_smi.csv. Writes <out>/report.md and prints
the short summary table last. Only the standard library is needed, so a broken torch still gets a report.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

TAIL_LINES = 25


def read_stages(work: str) -> list[dict]:
    path = os.path.join(work, "stages.tsv")
    stages = []
    if not os.path.isfile(path):
        return stages
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 5:
                continue
            name, rc, secs, limit, cmd = parts[:5]
            stages.append({"name": name, "rc": rc, "seconds": secs, "limit": limit, "cmd": cmd,
                           "note": parts[5] if len(parts) > 5 else ""})
    return stages


def stage_result(rc: str) -> str:
    return {"0": "ok", "124": "TIMED OUT", "137": "KILLED (time or memory)", "-": "skipped"}.get(
        rc, f"FAILED (exit {rc})")


def tail(path: str, n: int = TAIL_LINES) -> str:
    if not os.path.isfile(path):
        return "(no log)"
    with open(path, errors="replace") as f:
        lines = f.readlines()
    return "".join(lines[-n:]).rstrip() or "(empty)"


def last_line_with(path: str, words: tuple[str, ...]) -> str:
    """The last log line that contains any of the words (e.g. pytest's closing counts)."""
    if not os.path.isfile(path):
        return ""
    found = ""
    with open(path, errors="replace") as f:
        for line in f:
            if any(w in line for w in words):
                found = line.strip()
    return found


def read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a timeout
    return out


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def _f(s: str, spec: str) -> str:
    try:
        return format(float(s), spec)
    except (TypeError, ValueError):
        return ""


# ---------------------------------------------------------------- sections

def kernels_section(rows: list[dict]) -> tuple[str, str]:
    """(markdown, one-line summary)."""
    if not rows:
        return "No kernel rows (the stage did not write kernels.csv).", "no rows"
    ceilings = sorted({r["ceiling"] for r in rows if r.get("ceiling")})
    body = [f"Ceilings measured on the device: {'; '.join(ceilings) or 'n/a'}.", ""]
    table = [[r["op"], r["mode"], r["shape"], r["dtype"], r["provider"], _f(r["time_ms"], ".4g"),
              f"{_f(r['p20_ms'], '.4g')}-{_f(r['p80_ms'], '.4g')}" if r["p20_ms"] else "",
              _f(r["gbps"], ".1f"), _f(r["tflops"], ".1f"), _f(r["pct_of_ceiling"], ".1f"),
              _f(r["speedup_vs_torch"], ".2f"), _f(r["peak_mem_mib"], ".1f"),
              r["status"] + (" (output check: agrees)" if r.get("check", "").startswith("agrees") else "")]
             for r in rows]
    body.append(md_table(["op", "mode", "shape", "dtype", "provider", "median ms", "p20-p80", "GB/s", "TFLOP/s",
                          "% ceiling", "x torch", "peak MiB", "status"], table))
    ok = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"].startswith("error")]
    tri = [float(r["speedup_vs_torch"]) for r in ok if r["provider"] == "triton" and r["speedup_vs_torch"]]
    summary = f"{len(ok)} timed, {len(errors)} errors, {len(rows) - len(ok) - len(errors)} not run"
    if tri:
        summary += f"; triton vs torch {min(tri):.2f}x-{max(tri):.2f}x"
    ratios = [float(r["vs_best_peer"]) for r in ok if r.get("vs_best_peer")]
    if ratios:
        summary += f"; fastcram / best peer {min(ratios):.2f}-{max(ratios):.2f}"
    return "\n".join(body), summary


# ---------------------------------------------------------------- fastcram against its peers

def _kernel_peer_rows(rows: list[dict]) -> list[list[str]]:
    """One line per kernel case that has a fastcram row: its time, the fastest peer's, the ratio."""
    out = []
    for r in rows:
        if r.get("role") != "fastcram":
            continue
        case = [x for x in rows if (x["op"], x["mode"], x["shape"], x["dtype"]) ==
                (r["op"], r["mode"], r["shape"], r["dtype"])]
        peer = next((x for x in case if x["provider"] == r.get("best_peer")), None)
        out.append([r["op"], r["mode"], r["shape"], _f(r["time_ms"], ".4g") or r["status"].split(":")[0],
                    r.get("best_peer") or "none timed", _f(peer["time_ms"], ".4g") if peer else "",
                    _f(r.get("vs_best_peer", ""), ".2f")])
    return out


def _peer_status(rows: list[dict], per_peer: int = 3) -> list[str]:
    """Each peer that was not timed somewhere: each distinct reason once, with the first case it was given for
    (disagreeing output checks always, the rest up to per_peer reasons a peer)."""
    seen: dict[str, dict[str, str]] = {}
    for r in rows:
        if r.get("role") != "peer" or r["status"] == "ok" or r["status"].startswith("skipped: left out"):
            continue
        reasons = seen.setdefault(r["provider"], {})
        if r["status"] not in reasons and (r["status"].startswith("disagrees") or len(reasons) < per_peer):
            reasons[r["status"]] = f"{r['op']} {r['mode']} {r['shape']}"
    return [f"- {peer}: {status} ({case})" for peer, reasons in seen.items() for status, case in reasons.items()]


def _checked(rows: list[dict]) -> list[str]:
    agreed = sorted({r["provider"] for r in rows if r.get("check", "").startswith("agrees")})
    return agreed


def peers_section(kernel_rows: list[dict], step_rows: list[dict]) -> str:
    """fastcram's time as a ratio to the fastest peer measured in the same run, per op case and for the step."""
    parts = ["Ratio = fastcram's time / the fastest peer's time in the same run (below 1: fastcram is faster). "
             "Peers: every provider or variant that is not fastcram's own (torch, torch.compile, PyTorch's "
             "linear_cross_entropy, apex, Liger-Kernel, QuACK; Hugging Face BERT and cramming's way for the "
             "step). A library peer is timed only after its outputs and gradients matched the reference on the "
             "case's inputs; the `(gelu=tanh)` peers compute GELU's tanh approximation and are checked against "
             "that form. QuACK is measured only where it was installed beforehand (its CUTLASS DSL wheel is too "
             "large for the check's wheel folder); apex has no wheel.", ""]
    lines = _kernel_peer_rows(kernel_rows)
    if lines:
        parts.append(md_table(["op", "mode", "shape", "fastcram ms", "best peer", "peer ms", "fastcram / peer"],
                              lines))
    else:
        parts.append("No kernel case had a fastcram row.")
    step = next((r for r in step_rows if r.get("role") == "fastcram"), None)
    if step:
        peer = next((r for r in step_rows if r["variant"] == step.get("best_peer")), None)
        parts += ["", md_table(["step", "fastcram variant", "fastcram step ms", "best peer", "peer step ms",
                                "fastcram / peer"],
                               [[f"{step['preset']}, micro-batch {step['micro_batch']}",
                                 f"{step['variant']} ({step['switches'] or '-'})",
                                 _f(step["step_ms_mean"], ".2f") or step["status"].split(":")[0],
                                 step.get("best_peer") or "none timed",
                                 _f(peer["step_ms_mean"], ".2f") if peer else "",
                                 _f(step.get("vs_best_peer", ""), ".2f")]])]
        if step.get("note"):
            parts.append(f"\nThe fastcram variant: {step['note']}.")
    agreed = _checked(kernel_rows)
    if agreed:
        parts.append(f"\nPeers whose output check passed: {', '.join(agreed)}.")
    missing = _peer_status(kernel_rows) + [f"- step {r['variant']}: {r['status']}" for r in step_rows
                                           if r.get("role") == "peer" and r["status"] != "ok"]
    if missing:
        parts += ["", "Peers not timed (each distinct reason once, with the first case it was given for; a failed "
                      "output check is always shown):", *missing]
    return "\n".join(parts)


def step_section(rows: list[dict]) -> tuple[str, str]:
    if not rows:
        return "No step rows (the stage did not write step.csv).", "no rows"
    table = [[r["variant"], r["preset"], r["micro_batch"], "yes" if r["compiled"] == "True" else "no", _f(r["tokens_per_s_mean"], ",.0f"),
              _f(r["tokens_per_s_std"], ",.0f"), _f(r["step_ms_mean"], ".2f"),
              (_f(str(100 * float(r["mfu_mean"])), ".1f") + "%") if r["mfu_mean"] else "n/a",
              _f(r["speedup_vs_torch"], ".2f"), _f(r["peak_mem_mib"], ".0f"), _f(r["final_loss"], ".3f"),
              r["status"]] for r in rows]
    body = md_table(["variant", "preset", "micro-batch", "compiled", "tokens/s", "std", "step ms", "MFU",
                     "x torch", "peak MiB", "loss", "status"], table)
    head = next((r for r in rows if r.get("role") == "fastcram" and r.get("vs_best_peer")), None)
    note = rows[0].get("data", "")
    parts = [f"{r['variant']} {_f(r['tokens_per_s_mean'], ',.0f')} tok/s"
             + (f" MFU {100 * float(r['mfu_mean']):.1f}%" if r["mfu_mean"] else "")
             if r["status"] == "ok" else f"{r['variant']} {r['status'].split(':')[0]}" for r in rows]
    if head:
        parts.append(f"fastcram / best peer ({head['best_peer']}) {float(head['vs_best_peer']):.2f}")
    return f"{body}\n\n({note}; mean and std over {rows[0]['repeats']} repeats)", "; ".join(parts)


def compile_section(rows: list[dict]) -> tuple[str, str]:
    """The compile report on the GPU machine: the CPU-side reading of every cubin against the driver's."""
    if not rows:
        return "No compile rows (the stage did not write compile.csv).", "no rows"
    from .compile_report import driver_mismatches  # standard library only, like this file

    checked = [r for r in rows if r.get("driver_regs")]
    bad = driver_mismatches(rows)
    spills = [r for r in rows if r.get("spill_stores") not in ("", "0", None)]
    table = [[r["op"], r["kernel"], r["config"], r["dtypes"], r["regs"], r["driver_regs"],
              str(int(r["local_bytes"] or 0) // 4), r["driver_spills"], r["ctas_per_sm"], r["wgmma"], r["tma"]]
             for r in (bad or checked[:12])]
    body = [f"{len(rows)} kernels compiled by `fastcram bench compile` on the GPU machine (Triton "
            f"{rows[0].get('triton', '?')}); {len(checked)} loaded into the CUDA driver; registers and spills "
            f"{'agree for every one' if checked and not bad else f'differ for {len(bad)}'}; {len(spills)} with "
            f"spill stores.", "", ("Disagreeing rows:" if bad else "First rows:"), "",
            md_table(["op", "kernel", "config", "dtypes", "regs (report)", "regs (driver)", "spills (report)",
                      "spills (driver)", "CTA/SM", "wgmma", "tma"], table)]
    summary = (f"{len(checked)} kernels checked against the driver, "
               + (f"{len(bad)} disagree" if bad else "all agree") + f"; {len(spills)} spill")
    return "\n".join(body), summary


def train_section(log: list[dict]) -> tuple[str, str]:
    recs = [r for r in log if "loss" in r and "step" in r]
    end = next((r for r in reversed(log) if r.get("event") == "end"), None)
    if not recs:
        return "No training log records (see the stage's log tail).", "no log records"
    first, last = recs[0], recs[-1]
    steady = recs[1:] or recs  # the first interval includes compilation
    tok = sum(r.get("tokens_per_s", 0) for r in steady) / len(steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    lines = [md_table(["step", "loss", "batch", "tokens/s", "MFU", "data wait s", "budget spent s"],
                      [[str(r["step"]), f"{r['loss']:.4f}", str(r.get("batch_size", "")),
                        f"{r.get('tokens_per_s', 0):,.0f}",
                        f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
                        str(r.get("data_wait_s", "")), str(r.get("budget_spent_s", ""))] for r in recs])]
    start = next((r for r in log if r.get("event") in ("start", "resume")), None)
    if start and isinstance(start.get("switches"), dict):
        lines.append("\nSwitches (value, how chosen): " + "; ".join(
            f"{k} {v.get('value')} ({v.get('how')})" for k, v in start["switches"].items()))
    startup = next((r for r in log if r.get("event") == "startup"), None)
    if startup:
        lines.append(f"Start-up {startup.get('startup_s')} s: tuning {startup.get('tuning_s')} s, model "
                     f"{startup.get('build_s')} s, first step (compile) {startup.get('first_step_s')} s.")
    if end:
        lines.append(f"\nEnd: {end.get('steps')} steps, {(end.get('tokens') or 0) / 1e6:.1f}M tokens, "
                     f"budget spent {end.get('budget_spent_s')} s, peak GPU memory {end.get('peak_mem_mib')} MiB.")
        if isinstance(end.get("telemetry"), dict):
            lines.append("Telemetry summary from the run: " + ", ".join(f"{k} {v}" for k, v in end["telemetry"].items()))
    mfu_txt = f", MFU {100 * sum(mfus) / len(mfus):.1f}%" if mfus else ""
    summary = (f"loss {first['loss']:.3f} -> {last['loss']:.3f} in {last['step']} steps; "
               f"{tok:,.0f} tok/s after the first interval{mfu_txt}")
    return "\n".join(lines), summary


def numeric_summary(records: list[dict], skip=("time", "timestamp", "t")) -> list[list[str]]:
    """mean / max of every numeric field over the records."""
    keys: dict[str, list[float]] = {}
    for r in records:
        for k, v in r.items():
            if k in skip or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                keys.setdefault(k, []).append(float(v))
    return [[k, f"{sum(v) / len(v):.4g}", f"{min(v):.4g}", f"{max(v):.4g}", str(len(v))] for k, v in keys.items()]


def smi_records(path: str) -> list[dict]:
    rows = read_csv(path)
    out = []
    for r in rows:
        rec = {}
        for k, v in r.items():
            if k is None:
                continue
            try:
                rec[k.strip()] = float(str(v).strip())
            except ValueError:
                pass
        out.append(rec)
    return out


def telemetry_section(out: str) -> str:
    parts = []
    tel = read_jsonl(os.path.join(out, "telemetry.jsonl"))
    if tel:
        parts += [f"fastcram telemetry during training ({len(tel)} records):", "",
                  md_table(["field", "mean", "min", "max", "n"], numeric_summary(tel))]
    else:
        parts.append("No fastcram telemetry.jsonl from the training run (the run folder had none).")
    smi = smi_records(os.path.join(out, "nvidia_smi.csv"))
    if smi:
        parts += ["", f"nvidia-smi sampled every second over the whole check ({len(smi)} samples):", "",
                  md_table(["field", "mean", "min", "max", "n"], numeric_summary(smi))]
    return "\n".join(parts)


# ---------------------------------------------------------------- the report

def build(out: str, work: str, dry_run: bool) -> tuple[str, list[list[str]]]:
    stages = read_stages(work)
    krows, srows = read_csv(os.path.join(out, "kernels.csv")), read_csv(os.path.join(out, "step.csv"))
    kmd, ksum = kernels_section(krows)
    smd, ssum = step_section(srows)
    cmd_, csum = compile_section(read_csv(os.path.join(out, "compile.csv")))
    tmd, tsum = train_section(read_jsonl(os.path.join(out, "train_log.jsonl")))
    results = {"bench-kernels": ksum, "bench-step": ssum, "compile-check": csum, "train": "" if dry_run else tsum}
    summary = []
    for s in stages:
        log = os.path.join(work, f"{s['name']}.log")
        if s["name"] == "gpu-tests":  # pytest's closing line
            result = last_line_with(log, (" passed", " failed", " error", " skipped", "no tests ran",
                                          "tests collected", "deselected")).strip("= ")
        else:
            result = results.get(s["name"], "")
        summary.append([s["name"], stage_result(s["rc"]), s["rc"], s["seconds"], s["limit"],
                        (result or s["note"])[:150]])

    env = open(os.path.join(work, "env.txt")).read().strip() if os.path.isfile(os.path.join(work, "env.txt")) \
        else "(not recorded)"
    title = "fastcram GPU check" + (" — DRY RUN (no GPU: commands validated, nothing measured)" if dry_run else "")
    md = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by tools/gpu_check.sh"
          f"{' --dry-run' if dry_run else ''}.", "", "## Environment", "", "```", env, "```", "",
          "## Stages", "", md_table(["stage", "result", "exit", "seconds", "limit s", "summary"], summary), "",
          "## fastcram against its peers", "", peers_section(krows, srows), "",
          "## Kernel microbenchmarks (`fastcram bench kernels --quick`)", "", kmd, "",
          "## Training step (`fastcram bench step`)", "", smd, "",
          "## Compiled kernels against the driver (`fastcram bench compile --check-driver`)", "", cmd_, "",
          "## Training run (`fastcram train --preset crammed-bert --kernels triton --minutes 2`)", "", tmd, "",
          "## Telemetry", "", telemetry_section(out), "", "## Stage commands and log tails", ""]
    for s in stages:
        md += [f"### {s['name']}: {stage_result(s['rc'])} ({s['seconds']} s of {s['limit']} s)", "",
               f"`{s['cmd']}`" + (f" — {s['note']}" if s["note"] else ""), "", "```",
               tail(os.path.join(work, f"{s['name']}.log")), "```", ""]
    return "\n".join(md), summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the check's output folder")
    p.add_argument("--work", required=True, help="the check's scratch folder (stages.tsv, logs)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    md, summary = build(args.out, args.work, args.dry_run)
    path = os.path.join(args.out, "report.md")
    with open(path, "w") as f:
        f.write(md + "\n")
    from .table import render_plain  # plain on purpose: the summary is read in logs and call replies

    rows = [[name, result, secs, text] for name, result, _rc, secs, _lim, text in summary]
    print(render_plain(["stage", "result", "s", "summary"], rows,
                       title=f"\ngpu_check summary{' (dry run)' if args.dry_run else ''}; report: {path}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
