import pytest
import torch

from fastcram.train.autotune import search_micro_batch


def test_stops_at_out_of_memory_and_keeps_the_best():
    seen = []

    def measure(size):
        seen.append(size)
        if size >= 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {32: 100.0, 64: 180.0, 128: 250.0}[size]

    best, trials = search_micro_batch(measure, [32, 64, 128, 256, 512])
    assert best == 128 and seen == [32, 64, 128, 256]
    assert trials[-1]["result"] == "out of memory"


def test_stops_when_throughput_stops_improving():
    tps = {8: 100.0, 16: 150.0, 32: 151.0, 64: 400.0}
    best, trials = search_micro_batch(lambda s: tps[s], [8, 16, 32, 64])
    assert best == 32 and len(trials) == 3  # 32 is < 3% better than 16: stop, never try 64


def test_other_errors_propagate():
    def measure(size):
        raise ValueError("a real bug")
    with pytest.raises(ValueError):
        search_micro_batch(measure, [8])


def test_auto_micro_batch_picks_a_size_on_cpu(small_data, tmp_path):
    import json
    import os

    from fastcram.config import TrainConfig
    from fastcram.config import RunOptions
    from fastcram.train.loop import train

    from .helpers import FakeClock
    tcfg = TrainConfig(compile=False, device="cpu", micro_batch_auto=True, final_batch=64, max_steps=1,
                       budget_s=1e6, log_interval_s=0.0)
    s = train(RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(tmp_path / "r"),
                         progress=False), now=FakeClock(0.0))
    start = json.loads(open(os.path.join(s["run_dir"], "log.jsonl")).readline())
    chosen = start["autotune"]["micro_batch"]["chosen"]
    assert chosen in (8, 16, 32, 64) and start["config"]["train"]["micro_batch"] == chosen
    assert all(t["tokens_per_s"] > 0 for t in start["autotune"]["micro_batch"]["trials"])
