"""GPU telemetry: a background NVML sampler writing telemetry.jsonl in the run folder.

It never touches CUDA streams, so it cannot stall the training loop. Without a GPU or NVML it says so
once and writes no file; the run summary then records why telemetry is absent.
"""
from __future__ import annotations

import sys
import threading
import time

from ..files import JsonlAppender, WriteError

# NVML clock-event (throttle) reason bits, named as in nvml.h
THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
BENIGN_REASONS = {"gpu_idle", "applications_clocks_setting", "sync_boost", "display_clock_setting"}


def decode_reasons(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if mask & bit]


def _nvml():
    """The pynvml module with NVML initialised, or a reason string."""
    try:
        import pynvml  # from the nvidia-ml-py package
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML is unavailable ({e.__class__.__name__}: no NVIDIA driver/GPU)"
    return pynvml, None


class TelemetrySampler:
    """Samples every `interval_s` on a daemon thread. Use as a context manager; `summary()` at the end."""

    def __init__(self, path: str, interval_s: float = 5.0, device_index: int = 0, quiet: bool = False):
        self.path, self.interval_s, self.index, self.quiet = path, interval_s, device_index, quiet
        self.samples: list[dict] = []
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "TelemetrySampler":
        nvml, why = _nvml()
        if nvml is None:
            self.reason = why
            if not self.quiet:
                print(f"fastcram: telemetry off: {why}", file=sys.stderr)
            return self
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        self._energy0 = self._energy_mj()
        self._file = JsonlAppender(self.path, sync=False)  # WriteError when it cannot even be created
        self._failing = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="fastcram-telemetry")
        self._thread.start()
        return self

    def _energy_mj(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None

    def _read(self) -> dict:
        n, h = self._nvml, self._handle
        rec: dict = {"time": round(time.time(), 3)}

        def get(key, fn):  # one failing query must not lose the others
            try:
                rec[key] = fn()
            except Exception:
                rec[key] = None

        util = n.nvmlDeviceGetUtilizationRates(h)
        rec["gpu_util"], rec["mem_util"] = util.gpu, util.memory
        get("mem_used_gb", lambda: round(n.nvmlDeviceGetMemoryInfo(h).used / 2**30, 3))
        get("power_w", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0)
        get("energy_j", lambda: (self._energy_mj() - self._energy0) / 1000.0 if self._energy0 is not None else None)
        get("sm_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))
        get("mem_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM))
        get("temp_c", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
        reasons = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            n.nvmlDeviceGetCurrentClocksThrottleReasons  # renamed in newer NVML
        get("throttle", lambda: decode_reasons(reasons(h)))
        get("pcie_tx_mb_s", lambda: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES) / 1000.0)
        get("pcie_rx_mb_s", lambda: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES) / 1000.0)
        return rec

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                rec = self._read()
            except Exception as e:  # never let telemetry take the run down
                rec = {"time": round(time.time(), 3), "error": repr(e)}
            self.samples.append(rec)
            self._append(rec)

    def _append(self, rec: dict) -> None:
        """A sample that cannot be written (a full disk) is kept for the summary and reported once until a write
        succeeds again: telemetry never stops a run."""
        try:
            self._file.append(rec)
        except WriteError as e:
            if not self._failing:
                print(f"fastcram: telemetry: {e}; samples are kept in memory for the summary until it can be "
                      f"written again", file=sys.stderr, flush=True)
            self._failing = True
            return
        self._failing = False

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=self.interval_s + 5)
            self._file.close()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def summary(self, tokens: int | None = None) -> dict:
        """Means and maxima, energy per token and any non-benign throttling seen."""
        if self.reason:
            return {"available": False, "reason": self.reason}
        return summarize(self.samples, tokens)


def summarize(samples: list[dict], tokens: int | None = None) -> dict:
    out: dict = {"available": True, "samples": len(samples)}
    for key in ("gpu_util", "mem_util", "mem_used_gb", "power_w", "sm_clock_mhz", "temp_c"):
        vals = [s[key] for s in samples if s.get(key) is not None]
        if vals:
            out[f"{key}_mean"] = round(sum(vals) / len(vals), 3)
            out[f"{key}_max"] = max(vals)
    energies = [s["energy_j"] for s in samples if s.get("energy_j") is not None]
    if energies:
        out["energy_j"] = round(energies[-1], 1)
        if tokens:
            out["energy_mj_per_token"] = round(1000.0 * energies[-1] / tokens, 6)
    seen = sorted({r for s in samples for r in (s.get("throttle") or []) if r not in BENIGN_REASONS})
    out["throttling"] = seen
    return out
