"""The step-level switches: each flag reaches the training step and the run log header says its value and
how it was chosen; auto switches are measured on real steps and cached; the residual stream in bf16 trains
like fp32 under bf16 autocast on the CPU; the compile caches live in the cache folder."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastcram.cli import main as cli_main
from fastcram.config import RunOptions, TrainConfig, preset
from fastcram.train import step as step_module
from fastcram.train.compile_cache import compile_caches
from fastcram.train.loop import train

from .helpers import FakeClock


def _records(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _cli_train(small_data, out, *flags):
    return cli_main(["train", "--preset", "tiny", "--data", small_data, "--out", str(out), "--device", "cpu",
                     "--minutes", "60", "--max-steps", "2", "--micro-batch", "4", "--final-batch", "4",
                     "--log-interval", "0.001", "--quiet", *flags])


def test_every_switch_reaches_the_step_and_the_log_header(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCRAM_CACHE", str(tmp_path / "cache"))
    compiled = []

    def spy_compile(model, **kwargs):  # records what the step asked torch.compile for; runs eagerly
        compiled.append(kwargs)
        return model

    sdpa_flags = []
    real_sdpa = F.scaled_dot_product_attention

    def spy_sdpa(q, k, v, **kwargs):  # which SDPA backends are enabled where the model calls attention
        sdpa_flags.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                           q.dtype, q.shape[2]))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(step_module.torch, "compile", spy_compile)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    rc = _cli_train(small_data, tmp_path / "run", "--compile", "--compile-mode", "reduce-overhead",
                    "--attention", "math", "--residual-dtype", "bf16", "--autocast", "bf16", "--kernels", "torch",
                    "--sparse-last-layer", "off")
    assert rc == 0
    head = _records(tmp_path / "run")[0]
    switches = head["switches"]
    assert {k: v["value"] for k, v in switches.items() if k != "kernels"} == {
        "attention": "math", "compile": "on", "compile_mode": "reduce-overhead", "residual": "bf16",
        "sparse": "off", "autocast": "bf16", "micro_batch": 4}
    assert all(v["how"] == "flag" for v in switches.values())
    assert set(switches["kernels"]["value"].values()) == {"torch"}
    # what the built step runs with, read from the step and the model themselves
    assert head["step"] == {"compile": True, "compile_mode": "reduce-overhead", "attention": "math",
                            "sdpa_backends": ["MATH"], "autocast": "torch.bfloat16",
                            "residual_dtype": "torch.bfloat16", "sparse_last_layer": False,
                            "ops": switches["kernels"]["value"]}
    assert compiled == [{"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}]
    # inside the step: only the math backend, bf16 autocast, and every layer asks all 128 queries
    assert sdpa_flags and set(sdpa_flags) == {(True, False, torch.bfloat16, 128)}
    assert head["config"]["model"]["sparse_last_layer"] is False and head["config"]["train"]["attention"] == "math"
    assert head["compile_caches"]["inductor"]["path"] == str(tmp_path / "cache" / "inductor")


def test_defaults_are_recorded_as_defaults(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCRAM_CACHE", str(tmp_path / "cache"))
    assert _cli_train(small_data, tmp_path / "run") == 0
    recs = _records(tmp_path / "run")
    switches = recs[0]["switches"]
    assert {k: v["how"] for k, v in switches.items()} == {
        "kernels": "default", "attention": "default", "compile": "default", "compile_mode": "default",
        "residual": "default", "sparse": "default", "autocast": "default", "micro_batch": "flag"}
    assert switches["sparse"]["value"] == "on" and recs[0]["step"]["sparse_last_layer"] is True
    assert recs[0]["step"]["autocast"] is None and recs[0]["step"]["compile_mode"] is None  # CPU: fp32, eager
    # start-up as its own figure, and the peak memory (none on a CPU) in the records and the summary
    startup = next(r for r in recs if r.get("event") == "startup")
    assert set(startup) >= {"tuning_s", "build_s", "first_step_s", "startup_s"}
    assert all(startup[k] >= 0 for k in ("tuning_s", "build_s", "first_step_s", "startup_s"))
    assert all(r["peak_mem_mib"] is None for r in recs if "loss" in r)
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["startup"] == {k: v for k, v in startup.items() if k not in ("event", "time")}
    assert summary["peak_mem_mib"] is None
    assert summary["flops_per_token"] < 6 * 1e9  # the sparse count, from observe.metrics


@pytest.mark.parametrize("flags,needle", [
    (["--attention", "efficient"], "--attention efficient: not available for"),
    (["--residual-dtype", "bf16"], "--residual-dtype bf16 needs bf16 autocast"),
    (["--compile-mode", "reduce-overhead", "--no-compile"], "--compile-mode reduce-overhead needs --compile"),
])
def test_switch_errors_are_one_line(small_data, tmp_path, monkeypatch, capsys, flags, needle):
    monkeypatch.setenv("FASTCRAM_CACHE", str(tmp_path / "cache"))
    assert _cli_train(small_data, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _auto_opts(small_data, out, **kw) -> RunOptions:
    tcfg = TrainConfig(**{**preset("tiny").train_overrides, "compile": False, "device": "cpu", "micro_batch": 4,
                          "final_batch": 4, "log_interval_s": 0.0, "budget_s": 1e6, "max_steps": 2,
                          "attention": "auto", **kw})
    return RunOptions(train=tcfg, preset="tiny", data_dir=small_data, out_dir=str(out), progress=False)


def test_auto_attention_is_measured_on_real_steps_then_cached(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCRAM_CACHE", str(tmp_path / "cache"))
    first = train(_auto_opts(small_data, tmp_path / "a"), now=FakeClock(0.0))
    head = _records(first["run_dir"])[0]
    tuned = head["autotune"]["step"]
    assert head["switches"]["attention"]["how"] == "measured"
    assert [r["what"] for r in tuned["candidates"]] == ["baseline", "attention=flash", "attention=math"]
    assert all(r["tokens_per_s"] > 0 and len(r["repeats"]) == 3 for r in tuned["candidates"])
    chosen = head["switches"]["attention"]["value"]
    assert chosen in ("default", "flash", "math") and head["step"]["attention"] == chosen
    assert tuned["cache"] == "miss" and os.path.isfile(tuned["cache_file"])
    assert json.load(open(os.path.join(first["run_dir"], "config.json")))["train"]["attention"] == chosen

    second = train(_auto_opts(small_data, tmp_path / "b"), now=FakeClock(0.0))
    head = _records(second["run_dir"])[0]
    assert head["switches"]["attention"] == {"value": chosen, "how": "cache"}
    replayed = head["autotune"]["step"]
    assert replayed["cache"] == "hit" and replayed["seconds"] == 0.0  # replayed, nothing timed again
    assert [r["repeats"] for r in replayed["candidates"]] == [r["repeats"] for r in tuned["candidates"]]


def test_residual_bf16_trains_like_fp32_under_cpu_autocast(small_data, tmp_path, monkeypatch):
    """The tiny preset, 24 steps, bf16 autocast on the CPU: the residual stream in bf16 and in fp32 reach the
    same loss. Tolerance: the means of the last 5 losses agree within 0.02 nats, a twentieth of the 0.4 nats
    or more that both runs fall from the same start (same data, same initial weights: they differ only by
    the rounding of the stream). bench/RESULTS.md has longer curves."""
    monkeypatch.setenv("FASTCRAM_CACHE", str(tmp_path / "cache"))
    curves = {}
    for residual in ("fp32", "bf16"):
        opts = _auto_opts(small_data, tmp_path / residual, attention="default", autocast="bf16",
                          residual_dtype=residual, max_steps=24, lr=3e-3, deterministic=True)
        s = train(opts, now=FakeClock(0.0))
        curves[residual] = [r["loss"] for r in _records(s["run_dir"]) if "loss" in r]
        want = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[residual]
        assert _records(s["run_dir"])[0]["step"]["residual_dtype"] == want
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 24
    assert fp32 != bf16  # the stream's dtype did change the arithmetic
    end32, end16 = sum(fp32[-5:]) / 5, sum(bf16[-5:]) / 5
    assert fp32[0] - end32 > 0.4 and bf16[0] - end16 > 0.4, (fp32, bf16)
    assert abs(end32 - end16) < 0.02, (end32, end16)


def test_compile_caches_in_the_cache_folder_unless_the_user_set_them(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    with compile_caches(str(tmp_path / "cache")) as info:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
        assert info["inductor"]["set_by"].startswith("fastcram")
        assert info["triton"] == {"path": str(tmp_path / "mine"), "set_by": "the environment, TRITON_CACHE_DIR"}
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # put back as it was
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["flash", "cudnn", "efficient", "math"])
def test_gpu_attention_backends_give_the_default_loss(attention):
    """Each SDPA backend, where this GPU has it, computes the sparse model's loss and gradients as PyTorch's
    default dispatch does (bf16 autocast: within bf16 rounding)."""
    from fastcram.config import DataConfig, ModelConfig, TrainConfig
    from fastcram.data.loader import mask_batch
    from fastcram.data.tokenizer import SpecialIds
    from fastcram.errors import UserError
    from fastcram.train.step import build_model, check_attention, make_step

    cfg = ModelConfig(vocab_size=1031, hidden=128, layers=2, heads=2, intermediate=512)
    try:
        check_attention(attention, cfg, "cuda", torch.bfloat16, DataConfig().masked_per_seq)
    except UserError as e:
        pytest.skip(str(e))
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.randint(7, 1031, (6, 128), device="cuda", generator=g)
    b = mask_batch(ids, DataConfig(), SpecialIds(*range(7)), 1031, g)
    out = {}
    for name in ("default", attention):
        torch.manual_seed(0)
        tcfg = TrainConfig(device="cuda", compile=False, attention=name)
        model = build_model(cfg, tcfg, "cuda")
        loss = make_step(model, tcfg, "cuda")(b.input_ids, b.positions, b.labels, 1)
        out[name] = (loss, [p.grad.float() for p in model.parameters()])
    torch.testing.assert_close(out[attention][0], out["default"][0], atol=2e-2, rtol=2e-2)
    for a, d in zip(out[attention][1], out["default"][1]):  # bf16 rounding: a few % of each gradient's norm
        assert (a - d).norm() <= 0.05 * d.norm() + 1e-6


@pytest.mark.gpu
def test_gpu_cuda_graphs_accumulate_gradients_like_the_default_compile():
    """reduce-overhead with gradient accumulation (3 micro-steps an optimizer step): the same accumulated
    gradients as the default compile mode, at both optimizer steps. Accumulating into a gradient that is a
    CUDA-graph output would silently keep only part of the sum (AdamW's first steps would hide a uniform
    scale, so the gradients are compared, not the parameters)."""
    from fastcram.config import DataConfig, ModelConfig, TrainConfig
    from fastcram.data.loader import mask_batch
    from fastcram.data.tokenizer import SpecialIds
    from fastcram.train.step import build_model, make_optimizer, make_step, release_compiled

    cfg = ModelConfig(vocab_size=1031, hidden=128, layers=2, heads=2, intermediate=512)
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    batches = [mask_batch(torch.randint(7, 1031, (8, 128), device="cuda", generator=g), DataConfig(),
                          SpecialIds(*range(7)), 1031, g) for _ in range(6)]
    grads = {}
    for mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        tcfg = TrainConfig(device="cuda", compile=True, compile_mode=mode, attention="default")
        model = build_model(cfg, tcfg, "cuda")
        opt = make_optimizer(model, tcfg, "cuda")
        step = make_step(model, tcfg, "cuda")
        grads[mode] = []
        for k in range(2):
            for b in batches[3 * k:3 * k + 3]:
                step(b.input_ids, b.positions, b.labels, 3)
            grads[mode] += [p.grad.detach().clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad(set_to_none=True)
        del model, opt, step
        release_compiled("cuda")
    assert len(grads["default"]) == len(grads["reduce-overhead"]) > 0
    for a, d in zip(grads["reduce-overhead"], grads["default"]):
        assert (a - d).norm() <= 1e-3 * d.norm() + 1e-7


@pytest.mark.parametrize("compiled", [True, False])
def test_on_a_gpu_the_tunable_switches_default_to_auto(compiled):
    """`fastcram train` with no switch flags: auto on a GPU (the fastest measured), unchanged on a CPU; a flag
    always wins; compile mode is tuned only for a compiled model; the residual stays fp32 until a GPU run
    shows bf16 learns alike."""
    from fastcram.cli import _step_switches, build_parser

    parse = build_parser().parse_args
    gpu_cfg, cpu_cfg = TrainConfig(compile=compiled), TrainConfig(compile=compiled)
    _step_switches(parse(["train"]), gpu_cfg, gpu=True)
    assert (gpu_cfg.kernels, gpu_cfg.attention) == ("auto", "auto")
    assert gpu_cfg.compile_mode == ("auto" if compiled else "default")
    assert gpu_cfg.residual_dtype == "fp32"
    _, given = _step_switches(parse(["train"]), cpu_cfg, gpu=False)
    assert cpu_cfg == TrainConfig(compile=compiled) and given == ()
    flagged = TrainConfig(compile=compiled)
    _, given = _step_switches(parse(["train", "--attention", "math", "--kernels", "torch"]), flagged, gpu=True)
    assert (flagged.attention, flagged.kernels) == ("math", "torch") and set(given) == {"attention", "kernels"}
