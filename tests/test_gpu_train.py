"""GPU-only checks of the training hot loop."""
import pytest
import torch


@pytest.mark.gpu
@pytest.mark.parametrize("kernels,compile_mode", [("torch", "default"), ("triton", "default"),
                                                  ("triton", "reduce-overhead")])
def test_hot_loop_has_no_host_sync(small_data, tmp_path, kernels, compile_mode):
    """torch.cuda.set_sync_debug_mode('error') is on between log steps: any host sync raises. With
    reduce-overhead the custom ops are captured in CUDA graphs (their autotuning happens in the warm-up)."""
    from fastcram.config import TrainConfig
    from fastcram.config import RunOptions
    from fastcram.train.loop import train

    tcfg = TrainConfig(device="cuda", compile=True, kernels=kernels, micro_batch=16, final_batch=64,
                       max_steps=12, budget_s=1e6, log_interval_s=1e9, sync_debug=True, compile_mode=compile_mode,
                       attention="default")
    s = train(RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(tmp_path / "r"),
                         progress=False))
    assert s["steps"] == 12 and torch.isfinite(torch.tensor(s["final_loss"]))
