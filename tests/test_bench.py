"""The benchmark harness end to end (``--quick``, a tiny model): its report is complete and consistent.

Nothing here asserts speed: timings belong to ``python -m lightning_hpsgd.bench`` itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest

from lightning_hpsgd.bench.worker import STRATEGIES
from tests.launch import ROOT, base_env

CAN_MAKE_NAMESPACES = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def namespaces_of(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"hpsgdb{pid}")]


@pytest.mark.timeout(600)  # 15 two-process launches: about 3 minutes beside the rest of the suite on 2 cores
def test_quick_run_reports_every_strategy_with_ratios_from_the_raw_timings(tmp_path):
    cmd = [sys.executable, "-m", "lightning_hpsgd.bench", "--quick", "--channels", "4", "--steps", "30",
           "--val-every", "15", "--out", str(tmp_path / "report"), "--data-dir", str(tmp_path / "mnist1d")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=560)
    assert proc.returncode == 0, out[-4000:]
    report = json.loads((tmp_path / "report" / "bench.json").read_text())

    assert set(report["strategies"]) == set(STRATEGIES)
    assert report["workers"] == 2 and report["comm_ratio"] == 1.0
    if CAN_MAKE_NAMESPACES:
        assert report["link"] == "netns" and report["link_mbit"] > 0 and report["warning"] is None
    else:
        assert report["link"] == "loopback" and "NO THROTTLED LINK" in report["warning"]
    assert report["allreduce_s"] > 0 and report["step_compute_s"] > 0
    for name, s in report["strategies"].items():
        per_repeat = s["step_time_per_repeat_s"]
        assert len(per_repeat) == 1, name
        assert s["step_time_s"]["median"] == pytest.approx(statistics.median(per_repeat))
        assert s["step_time_s"]["min"] <= s["step_time_s"]["median"] <= s["step_time_s"]["max"]
        assert 0 <= s["val_acc_equal_steps"] <= 1 and 0 <= s["val_acc_equal_time"] <= 1
        assert 0 <= s["blocked_fraction"] <= 1 and s["peak_mem_mb"] > 0
        assert 0 < s["steps_in_time_budget"] <= 30
        assert [point[1] for point in s["curve"]] == [15, 30]  # validated every 15 of the 30 steps
    medians = {name: s["step_time_s"]["median"] for name, s in report["strategies"].items()}
    assert report["ratios"]["hpsgd/ddp"] == pytest.approx(medians["hpsgd"] / medians["ddp"])
    assert report["ratios"]["hpsgd/compute-only"] == pytest.approx(medians["hpsgd"] / medians["compute-only"])
    # HPSGD's blocked share is its measured waits, the others' the excess over compute-only.
    assert report["strategies"]["hpsgd"]["blocked_method"].startswith("measured")
    assert report["strategies"]["ddp"]["blocked_method"] == "excess over compute-only"

    table = (tmp_path / "report" / "bench.md").read_text()
    assert all(f"| {name} |" in table for name in STRATEGIES) and "| hpsgd/ddp |" in table
    assert (tmp_path / "report" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if CAN_MAKE_NAMESPACES:
        assert namespaces_of(proc.pid) == []


@pytest.mark.skipif(not CAN_MAKE_NAMESPACES, reason="needs root and iproute2")
def test_namespaces_are_removed_when_the_run_is_stopped(tmp_path):
    cmd = [sys.executable, "-m", "lightning_hpsgd.bench", "--quick", "--channels", "4",
           "--out", str(tmp_path / "report"), "--data-dir", str(tmp_path / "mnist1d")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not namespaces_of(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "the benchmark made no namespace"
            time.sleep(0.2)
        time.sleep(3)  # into calibration, with workers running inside the namespaces
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert namespaces_of(proc.pid) == [], out[-2000:]
