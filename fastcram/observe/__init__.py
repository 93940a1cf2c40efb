"""Watching a run: FLOPs and MFU (metrics), the run log (runlog), NVML telemetry, profiler windows, plots
and the environment record. Imports only config, errors and files: never train, glue, benchmarks,
export or cli.
"""
