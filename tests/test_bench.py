"""The benchmark harness end to end (``--quick``, a tiny model): its report is complete and consistent.

Nothing here asserts speed: timings belong to ``python -m lightning_hpsgd.bench`` itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest

from lightning_hpsgd.bench.worker import STRATEGIES
from tests.launch import ROOT, base_env, run_command

CAN_MAKE_NAMESPACES = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def namespaces_of(pid: int) -> list[str]:
    """The namespaces of the benchmark process ``pid``: exactly ``hpsgdb<pid>h`` and ``hpsgdb<pid>w<i>`` (a prefix
    match would also take those of a process whose PID starts with the same digits, run by another test)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [name for name in names if re.fullmatch(rf"hpsgdb{pid}[hw]\d*", name)]


def rank_result(step_times, wait=None, val_acc=0.5, steps=30, train_seconds=1.0):
    return {"step_times_s": step_times, "wait_seconds": wait, "train_seconds": train_seconds, "peak_rss_mb": 100.0,
            "rss_before_fit_mb": 90.0, "val_acc": val_acc, "steps": steps,
            "curve": [(1.0, steps, val_acc)]}  # fmt: skip


def test_summary_aggregates_repeats_by_median_and_ratios_from_medians():
    """Three synthetic repeats of two workers each: a repeat's step time is the median over both workers' steps,
    the strategy's the median (and min, max) over repeats, and every ratio divides those medians."""
    from lightning_hpsgd.bench.compare import BenchConfig, Link, summarize

    hpsgd = [  # per-repeat medians 0.012, 0.010, 0.030 -> median 0.012
        [rank_result([0.010, 0.012, 0.014], wait=0.1), rank_result([0.012, 0.011, 0.013], wait=0.3)],
        [rank_result([0.010, 0.010, 0.010], wait=0.2), rank_result([0.009, 0.011, 0.010], wait=0.2)],
        [rank_result([0.030, 0.030, 0.031], wait=0.4), rank_result([0.029, 0.030, 0.050], wait=0.0)],
    ]
    ddp = [  # per-repeat medians 0.020, 0.024, 0.021 -> median 0.021
        [rank_result([0.020, 0.020]), rank_result([0.020, 0.021])],
        [rank_result([0.024, 0.024]), rank_result([0.024, 0.025])],
        [rank_result([0.021, 0.021]), rank_result([0.021, 0.022])],
    ]
    compute = [[rank_result([0.008])], [rank_result([0.010])], [rank_result([0.009])]]
    equal_steps = {"hpsgd": hpsgd, "ddp": ddp, "compute-only": compute}
    equal_time = {name: runs[:1] for name, runs in equal_steps.items()}
    report = summarize(BenchConfig(strategies=tuple(equal_steps)), Link("loopback", None, param_bytes=400),
                       equal_steps, equal_time, budget=1.0, warning=None, elapsed=1.0)  # fmt: skip
    h, d, c = (report["strategies"][n] for n in ("hpsgd", "ddp", "compute-only"))
    assert h["step_time_per_repeat_s"] == pytest.approx([0.012, 0.010, 0.030])
    assert h["step_time_s"] == pytest.approx({"median": 0.012, "min": 0.010, "max": 0.030})
    assert d["step_time_s"] == pytest.approx({"median": 0.021, "min": 0.020, "max": 0.024})
    assert c["step_time_s"]["median"] == pytest.approx(0.009)
    assert report["ratios"]["hpsgd/ddp"] == pytest.approx(0.012 / 0.021)
    assert report["ratios"]["hpsgd/compute-only"] == pytest.approx(0.012 / 0.009)
    assert report["ratios"]["ddp/compute-only"] == pytest.approx(0.021 / 0.009)
    # HPSGD's blocked share is the mean of its measured waits over training time; DDP's the excess over compute.
    assert h["blocked_fraction"] == pytest.approx(0.2) and h["blocked_method"].startswith("measured")
    assert d["blocked_fraction"] == pytest.approx(1 - 0.009 / 0.021)


# Limits on the benchmark's commands, about 10 times what each takes on an idle 2-core machine running the suite two
# tests at a time, so that a machine busy with other work makes a test slow, never a failure (nothing here asserts
# speed): about 210 s for the quick run (up to 10 runs of 2 fresh worker processes, calibration included), 30 s for
# `bench gpu` on CPU, 50 s for `bench convergence --quick` (a few seconds for its rerun, which only reads the
# finished runs). A hung worker ends sooner: the benchmark kills a run after its own run_timeout_s. Each test's own
# limit leaves time to stop the command cleanly.
QUICK_RUN_TIMEOUT_S = 2100
GPU_MODE_TIMEOUT_S = 300
CONVERGENCE_TIMEOUT_S = 500
RERUN_TIMEOUT_S = 240
COMM_HOOK_TIMEOUT_S = 600


def run_to_the_end(cmd: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    """Run the benchmark in a process group of its own. After ``timeout`` s: SIGTERM (the benchmark removes its
    namespaces), then SIGKILL to the whole group, workers included, so that nothing outlives the test."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            out = ""
        pytest.fail(f"the benchmark was still running after {timeout} s:\n{out[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in its group: nothing, after a clean run
        except ProcessLookupError:
            pass
        proc.wait()
    return proc, out


@pytest.mark.timeout(QUICK_RUN_TIMEOUT_S + 120)
def test_quick_run_reports_every_strategy_with_ratios_from_the_raw_timings(tmp_path):
    """One short end-to-end run of three strategies (calibration, throttled link, both phases, the report files)."""
    names = ["hpsgd", "ddp", "compute-only"]
    # A ratio of 10: reachable by throttling even when the other test worker loads the CPU (at 1, the tiny model's
    # all-reduce can exceed a step of compute at full speed, and the run then warns instead of throttling).
    cmd = [sys.executable, "-m", "lightning_hpsgd.bench", "--quick", "--channels", "4", "--steps", "30",
           "--val-every", "15", "--out", str(tmp_path / "report"), "--data-dir", str(tmp_path / "mnist1d"),
           "--comm-ratio", "10", "--strategies", *names]  # fmt: skip
    proc, out = run_to_the_end(cmd, QUICK_RUN_TIMEOUT_S)
    assert proc.returncode == 0, out[-4000:]
    report = json.loads((tmp_path / "report" / "bench.json").read_text())

    assert set(report["strategies"]) == set(names) and set(names) <= set(STRATEGIES)
    assert report["workers"] == 2 and report["nodes"] == 2 and report["comm_ratio"] == 10.0
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
    assert all(f"| {name} |" in table for name in names) and "| hpsgd/ddp |" in table
    assert (tmp_path / "report" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if CAN_MAKE_NAMESPACES:
        assert namespaces_of(proc.pid) == []


@pytest.mark.skipif(not CAN_MAKE_NAMESPACES, reason="needs root and iproute2")
@pytest.mark.timeout(240 + 3 + 120 + 60)
def test_namespaces_are_removed_when_the_run_is_stopped(tmp_path):
    cmd = [sys.executable, "-m", "lightning_hpsgd.bench", "--quick", "--channels", "4",
           "--out", str(tmp_path / "report"), "--data-dir", str(tmp_path / "mnist1d")]  # fmt: skip
    # Ctrl-C in a terminal: SIGINT at its default disposition. (A suite started as a background job of a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 240  # data generated, namespaces made: under 15 s on an idle machine
        while not namespaces_of(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "the benchmark made no namespace"
            time.sleep(0.2)
        time.sleep(3)  # into calibration, with workers running inside the namespaces (on a busy machine, perhaps not)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert namespaces_of(proc.pid) == [], out[-2000:]


@pytest.mark.skipif(not CAN_MAKE_NAMESPACES, reason="needs root and iproute2")
def test_workers_of_a_simulated_node_share_its_namespace_and_talk_across_nodes(tmp_path):
    """`--workers 4 --nodes 2`: workers 0-1 in one namespace, 2-3 in another; one all-reduce spans all four."""
    from lightning_hpsgd.bench.compare import BenchConfig, Runner
    from lightning_hpsgd.bench.netns import SlowLink

    config = BenchConfig(workers=4, nodes=2, channels=4, data_dir=str(tmp_path / "mnist1d"))
    with SlowLink(config.nodes, 1000.0) as link:
        results = Runner(config, link, tmp_path).run({"mode": "calibrate", "measure_compute": False})
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    spaces = [r["netns"] for r in results]
    assert spaces[0] == spaces[1] != spaces[2] == spaces[3] and os.readlink("/proc/self/ns/net") not in spaces
    assert all(r["allreduce_s"] > 0 for r in results)
    with pytest.raises(ValueError, match="--nodes must divide --workers"):
        BenchConfig(workers=4, nodes=3)


@pytest.mark.timeout(GPU_MODE_TIMEOUT_S + 60)
def test_gpu_mode_reports_every_mode_on_cpu(tmp_path):
    """`bench gpu` with --device cpu: the same processes, modes and statistics as on a GPU, on a tiny MLP."""
    cmd = [sys.executable, "-m", "lightning_hpsgd.bench", "gpu", "--device", "cpu", "--model", "mlp", "--batch", "8",
           "--steps", "8", "--warmup", "4", "--precision", "32-true", "--out", str(tmp_path / "gpu.json"),
           "--profile", str(tmp_path / "trace")]  # fmt: skip
    done = run_command(cmd, env=base_env(), timeout=GPU_MODE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["modes"]) == {"compute-only", "ddp", "hpsgd", "hpsgd_h4"} and report["backend"] == "gloo"
    for name, mode in report["modes"].items():
        assert mode["step_ms"] > 0 and len(mode["step_ms_per_rank"]) == 2
        assert (mode["comm_ms"] is not None) == name.startswith("hpsgd")
    # 8 timed steps after 4 warm-up steps: 8 rounds merged at H=1, 2 at H=4 (each merges a round launched 4 steps
    # earlier).
    assert report["modes"]["hpsgd"]["rounds_timed"] == 8 and report["modes"]["hpsgd_h4"]["rounds_timed"] == 2
    assert report["modes"]["hpsgd"]["comm_ms"] > 0
    ratio = report["modes"]["hpsgd_h4"]["step_ms"] / report["modes"]["compute-only"]["step_ms"]
    assert report["ratios"]["hpsgd_h4/compute-only"] == pytest.approx(ratio)
    assert "| hpsgd_h4 |" in done.stdout
    assert (tmp_path / "trace" / "trace_hpsgd_h4_rank0.json").stat().st_size > 1000


@pytest.mark.timeout(CONVERGENCE_TIMEOUT_S + RERUN_TIMEOUT_S + 60)
def test_convergence_quick_run_trains_every_method_to_one_model_per_run(tmp_path):
    """`bench convergence --quick`: real worker processes run every method on both tasks; each run ends with one
    model on every rank, and the report has a table per task and a plot per task. A rerun skips finished runs."""
    out = tmp_path / "conv"
    cmd = [sys.executable, "-m", "lightning_hpsgd.bench", "convergence", "--quick", "--out", str(out),
           "--data-dir", str(tmp_path / "mnist1d")]  # fmt: skip
    done = run_command(cmd, env=base_env(), timeout=CONVERGENCE_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    methods = {(r["family"], r["sync_every"], r["sync_delay"], r["fragments"]) for r in results}
    assert methods == {("ddp", None, None, 1), ("localsgd", 4, None, 1), ("hpsgd", 4, None, 1),
                       ("hpsgd_stale", 4, None, 1), ("hpsgd_outer", 4, None, 1), ("diloco", 4, 0, 1),
                       ("hpsgd_delay", 4, 1, 1), ("hpsgd_fragments", 4, 3, 2)}  # fmt: skip
    assert {r["task"] for r in results} == {"mnist1d", "reverse"} and len(results) == 16
    assert all(r["identical"] and 0 <= r["val_acc"] <= 1 and r["train_loss"] > 0 for r in results), results
    report = (out / "convergence.md").read_text()
    assert "## mnist1d: validation accuracy" in report and "## reverse: final training loss" in report
    assert "| hpsgd_outer H=4 |" in report and "| hpsgd_fragments H=4 τ=3 F=2 |" in report
    assert (out / "convergence_mnist1d.png").stat().st_size > 10_000 and (out / "convergence_reverse.png").exists()
    again = run_command(cmd, env=base_env(), timeout=RERUN_TIMEOUT_S)
    assert again.returncode == 0 and "runs on" not in again.stdout
    assert len((out / "results.jsonl").read_text().splitlines()) == 16


# About 10 times what the two runs (2 fresh workers each) take on an idle 2-core machine running the suite two tests
# at a time, data generation included.
@pytest.mark.timeout(COMM_HOOK_TIMEOUT_S)
def test_ddp_with_a_comm_hook_runs_the_hook_over_gloo(tmp_path):
    """`ddp_powersgd`: two benchmark workers train 12 steps over a real gloo group on loopback, and DDP's own record
    names the hook it ran (Lightning's DDPStrategy skips hooks on CPU). PowerSGD's warm-up is 10 % of the steps (2,
    its minimum), so it compressed the 10 steps after it. `ddp_bf16` is the same strategy class with the bf16 hook
    (launching it too would only repeat the launch)."""
    from datetime import timedelta

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lightning_hpsgd.baselines import CommHookDDPStrategy
    from lightning_hpsgd.bench.compare import BenchConfig, Runner, prepare_data
    from lightning_hpsgd.bench.worker import make_comm_hook_strategy

    bf16 = make_comm_hook_strategy("ddp_bf16", timedelta(seconds=60), 12)
    assert type(bf16) is CommHookDDPStrategy and bf16._ddp_comm_hook is default_hooks.bf16_compress_hook
    config = BenchConfig(channels=4, data_dir=str(tmp_path / "mnist1d"))
    prepare_data(config)
    runner = Runner(config, None, tmp_path)
    ranks = runner.run({"strategy": "ddp_powersgd", "max_steps": 12, "val_every": 6, "seed": 0})
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["steps"] == 12 and r["comm_hook"] == "powerSGD_hook" for r in ranks), ranks[0]["comm_hook"]
    assert all(0 <= r["val_acc"] <= 1 and len(r["curve"]) == 2 for r in ranks)
    rates = [r["compression_rate"] for r in ranks]
    assert all(rate > 2 for rate in rates), rates  # rank 1 sends (rows + columns) of each matrix, not rows x columns


def test_a_link_slower_than_asked_at_full_speed_is_reported_not_throttled():
    from lightning_hpsgd.bench.compare import BenchConfig, Link, _ratio_out_of_reach

    fast_cpu = Link("netns", 10000.0, step_compute_s=0.002, allreduce_full_speed_s=0.0029, allreduce_s=0.0029)
    warning = _ratio_out_of_reach(fast_cpu, BenchConfig(comm_ratio=1.0))
    assert warning is not None and warning.startswith("COMM/COMPUTE RATIO 1.45, NOT 1.0: one all-reduce takes 2.90 ms")
    assert "--channels" in warning
    assert _ratio_out_of_reach(fast_cpu, BenchConfig(comm_ratio=2.0)) is None  # reachable: throttle to it
    assert _ratio_out_of_reach(fast_cpu, BenchConfig(comm_ratio=1.0, link_mbit=100.0)) is None  # the user fixed it


def test_checksum_benchmark_reports_every_method_on_both_cases():
    """`bench checksum`, one repeat: the new and the old checksum and the plain sum, on ResNet-50 and 300 x 64."""
    cmd = [sys.executable, "-m", "lightning_hpsgd.bench", "checksum", "--repeats", "1", "--min-seconds", "0",
           "--threads", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("checksums against a plain sum on cpu (1 threads), median of 1 repeats")
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"resnet50", "300"}
    assert rows["resnet50"][1:3] == ["267", "25610152"] and rows["300"][3:5] == ["300", "19200"]
