import os
import subprocess
import sys

import pytest


def test_profile_tiny_on_cpu_prints_the_breakdown(small_data, tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastcram", "profile", "--preset", "tiny", "--steps", "5",
                          "--warmup", "1", "--micro-batch", "8", "--data", small_data, "--out", str(tmp_path / "p")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stderr
    for cat in ("matmuls", "attention", "norms", "activation", "loss", "optimizer", "data wait", "other"):
        assert f"\n{cat}" in out, cat
    assert "top kernels" in out and "aten::mm" in out and "MFU n/a" in out
    assert os.path.getsize(tmp_path / "p" / "profile" / "trace.json") > 1000


def test_plot_writes_a_valid_png_from_a_real_run(small_data, tmp_path):
    pytest.importorskip("matplotlib")
    from fastcram.config import TrainConfig
    from fastcram.observe.plot import plot_run
    from fastcram.config import RunOptions
    from fastcram.train.loop import train

    tcfg = TrainConfig(compile=False, device="cpu", micro_batch=8, final_batch=16, max_steps=6, budget_s=1e6,
                       log_interval_s=0.0)
    s = train(RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(tmp_path / "r"),
                         progress=False))
    path = plot_run(s["run_dir"])
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width > 300 and height > 300
