"""Two gloo processes on the CPU: same result as one process over the same global batches."""
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from fastcram.train import checkpoint as ckpt
from fastcram.config import DataConfig, TrainConfig
from fastcram.data.loader import mask_batch
from fastcram.train.distributed import DistContext, rank_slice
from fastcram.data.tokenizer import SpecialIds
from fastcram.config import RunOptions
from fastcram.train.loop import train

from .helpers import FakeClock

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _opts(data, out, resume=None, **kw):
    tcfg = TrainConfig(**{"compile": False, "device": "cpu", "micro_batch": 4, "final_batch": 16,
                          "budget_s": 1e6, "log_interval_s": 0.0, **kw})
    return RunOptions(train=tcfg, preset="tiny", data_dir=data, out_dir=out, resume=resume, progress=False)

def _worker(rank, world, port, data, out, resume, kw, ticks, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    s = train(_opts(data, out, resume, **kw), now=FakeClock(ticks[rank]))
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": s.get("steps", s.get("step")), "world": s.get("world_size"),
                   "switches": s.get("switches")}, f)

def _run2(tmp_path, data, out, resume=None, ticks=(0.0, 0.0), **kw):
    res = tmp_path / f"res-{os.path.basename(out)}-{resume is not None}"
    res.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), data, out, resume, kw, ticks, str(res)), nprocs=2, join=True)
    return [json.load(open(res / f"rank{r}.json")) for r in range(2)]

def test_two_ranks_equal_one_process_over_the_same_global_batches(small_data, tmp_path):
    torch.set_num_threads(1)
    single = train(_opts(small_data, str(tmp_path / "one"), micro_batch=8, deterministic=True, max_steps=4),
                   now=FakeClock(0.0))
    ranks = _run2(tmp_path, small_data, str(tmp_path / "two"), deterministic=True, max_steps=4)
    assert [r["steps"] for r in ranks] == [4, 4] and ranks[0]["world"] == 2
    a = ckpt.load_checkpoint(single["final_checkpoint"])
    b = ckpt.load_checkpoint(str(tmp_path / "two" / "checkpoints" / "final.pt"))
    assert a["sequences"] == b["sequences"] and a["position"] == b["position"]
    assert a["sequences"] > 4 * 8  # the batch ramp accumulated over both ranks' sequences
    # Gradients agree to fp32 rounding (the all-reduce sums in another order). AdamW divides each gradient by
    # its own RMS, so an element whose gradient is itself at rounding level can move by a fraction of one
    # update (lr ~ 2.5e-4 here): allow 20% of a step anywhere, and require nearly every element to 1e-6.
    close, total = 0, 0
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=5e-5)
        close += (b["model"][k] - a["model"][k]).abs().le(1e-6).sum().item()
        total += a["model"][k].numel()
    assert close / total > 0.999

def test_rank_slices_are_disjoint_and_rebased():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(7, 500, (8, 128), generator=g)
    b = mask_batch(ids, DataConfig(), SpecialIds(0, 1, 2, 3, 4, 5, 6), 500, g)
    parts = [rank_slice(b, DistContext(rank=r, world=2), 4, 128, 32) for r in range(2)]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), b.input_ids)
    for r, p in enumerate(parts):
        assert p.positions.min() >= 0 and p.positions.max() < 4 * 128
        assert torch.equal(p.labels, ids[4 * r:4 * r + 4].reshape(-1)[p.positions])

def test_all_ranks_stop_on_the_same_step_rank0_owns_the_clock(small_data, tmp_path):
    # rank 1's clock runs 10x slower: it alone would train far longer; rank 0 decides
    ranks = _run2(tmp_path, small_data, str(tmp_path / "clock"), ticks=(1.0, 0.1), budget_s=30.0)
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0

def test_two_process_run_resumes(small_data, tmp_path):
    out = str(tmp_path / "res")
    first = _run2(tmp_path, small_data, out, deterministic=True, max_steps=2)
    assert [r["steps"] for r in first] == [2, 2]
    second = _run2(tmp_path, small_data, out, resume=out, deterministic=True, max_steps=4)
    assert [r["steps"] for r in second] == [4, 4]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["world_size"] for r in log if r.get("event") == "resume"] == [2]


def test_auto_switches_are_tuned_alike_on_every_rank(small_data, tmp_path, monkeypatch):
    """Each rank times the candidates on its own device and all take rank 0's measurements: one choice."""
    monkeypatch.setenv("FASTCRAM_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "tuned")
    ranks = _run2(tmp_path, small_data, out, max_steps=1, attention="auto")
    assert [r["steps"] for r in ranks] == [1, 1]
    assert ranks[0]["switches"] == ranks[1]["switches"] and ranks[0]["switches"]["attention"] != "auto"
    head = json.loads(open(os.path.join(out, "log.jsonl")).readline())
    assert head["switches"]["attention"]["how"] == "measured"
    assert [r["what"] for r in head["autotune"]["step"]["candidates"]] == ["baseline", "attention=flash",
                                                                           "attention=math"]
    assert head["autotune"]["step"]["cache_file"].startswith(str(tmp_path / "cache"))
