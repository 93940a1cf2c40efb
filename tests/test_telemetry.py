import os

from fastcram.observe.telemetry import TelemetrySampler, decode_reasons, summarize


def test_without_gpu_says_so_once_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "telemetry.jsonl"
    with TelemetrySampler(str(path), interval_s=0.01) as t:
        pass
    err = capsys.readouterr().err
    if t.reason is None:  # a machine with a GPU: it sampled instead
        return
    assert err.count("telemetry off") == 1 and ("NVML" in err or "nvidia-ml-py" in err)
    assert not os.path.exists(path)  # decision: no file at all without NVML
    assert t.summary(1000) == {"available": False, "reason": t.reason}


def test_summary_means_maxima_energy_and_throttling():
    samples = [
        {"gpu_util": 90, "power_w": 600.0, "energy_j": 100.0, "throttle": ["gpu_idle"], "temp_c": 60},
        {"gpu_util": 100, "power_w": 700.0, "energy_j": 300.0, "throttle": ["sw_power_cap"], "temp_c": 70},
    ]
    s = summarize(samples, tokens=1_000_000)
    assert s["gpu_util_mean"] == 95 and s["gpu_util_max"] == 100
    assert s["power_w_mean"] == 650 and s["temp_c_max"] == 70
    assert s["energy_j"] == 300.0 and s["energy_mj_per_token"] == 0.3
    assert s["throttling"] == ["sw_power_cap"]  # idle is not throttling


def test_throttle_bits():
    assert decode_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_reasons(0) == []
