"""``python -m lightning_hpsgd.bench monitor``: the step time of HPSGD with ``HPSGDMonitor`` on against off.

Both variants train the MNIST-1D recipe's model with HPSGD (``sync_every=1``) and a CSV logger, logging every 10
steps as the recipe does; only ``monitor`` differs. They alternate, ``repeats`` times each, on loopback.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from lightning_hpsgd.bench.compare import BenchConfig, Runner, prepare_data


def measure_monitor_overhead(repeats: int = 3, steps: int = 400, channels: int = 64) -> dict[str, Any]:
    """Median step time (s) with the monitor on and off, per repeat, and the ratio of the medians."""
    config = BenchConfig(channels=channels, steps=steps, repeats=repeats, loopback=True)
    prepare_data(config)
    times: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="hpsgd-monitor-") as tmp:
        runner = Runner(config, None, Path(tmp))
        for repeat in range(repeats):
            for variant in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                spec = {"strategy": "hpsgd", "max_steps": steps, "monitor": variant == "on", "seed": repeat,
                        "csv_dir": str(Path(tmp) / f"csv-{variant}-{repeat}"), "log_every_n_steps": 10}  # fmt: skip
                ranks = runner.run(spec)
                times[variant].append(statistics.median(t for r in ranks for t in r["step_times_s"]))
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"on_s": on, "off_s": off, "ratio": on / off, "per_repeat": times, "steps": steps, "channels": channels}


def report(result: dict[str, Any]) -> str:
    return (
        f"HPSGDMonitor overhead, MNIST1DClassifier(channels={result['channels']}), 2 workers on loopback,"
        f" {result['steps']} steps x {len(result['per_repeat']['on'])} repeats each, logging every 10 steps:\n"
        f"  median step time with the monitor: {1000 * result['on_s']:.3f} ms\n"
        f"  median step time without it:      {1000 * result['off_s']:.3f} ms\n"
        f"  on / off: {result['ratio']:.4f}"
    )
