"""HPSGD against DDP, post-local SGD and the compute-only limit, over a real throttled link.

``python -m lightning_hpsgd.bench [--comm-ratio X] [--workers N] [--quick] [--out DIR]``:

1. **Link.** One network namespace per worker (or per simulated node with ``--nodes``: its workers talk inside it
   at full speed), joined by rate-limited veth links ([`.netns`][]). Without root or
   iproute2 it falls back to loopback and says so, loudly, in the report.
2. **Calibration.** At full speed it measures one training step's compute time and one all-reduce of the model.
   It then sets the link speed so that one all-reduce takes ``comm_ratio`` times one step of compute (two
   corrections against the measured all-reduce), unless ``--link-mbit`` fixes the speed.
3. **Equal steps.** Every strategy trains the same model on the same data for the same number of optimizer steps,
   validating every ``val_every`` steps (on a clock that excludes validation), ``repeats`` times, with the order
   rotated between repeats.
4. **Equal time.** Again, each with the same wall-time budget (Lightning's ``max_time``): by default the median
   training time of ``compute-only`` at equal steps, the physical limit.
5. **Report.** ``bench.json``, ``bench.md`` and ``bench.png`` in ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_hpsgd.bench.netns import NetnsUnavailable, SlowLink
from lightning_hpsgd.bench.worker import DEFAULT_STRATEGIES, STRATEGIES
from lightning_hpsgd.extras import require

FULL_SPEED_MBIT = 10_000.0
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "NODE_RANK", "LOCAL_RANK", "GROUP_RANK",
                   "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "GLOO_SOCKET_IFNAME")  # fmt: skip

# Upper bounds on step-time ratios (issue 5); bench.md prints each beside the measured ratio.
TARGETS = {
    "hpsgd/compute-only": 1.15,
    "hpsgd/ddp": 0.60,
    "hpsgd_h4/compute-only": 1.15,
}


@dataclass
class BenchConfig:
    """What one benchmark run measures. Times are seconds, speeds Mbit/s."""

    workers: int = 2
    # Simulated nodes: workers / nodes workers share one namespace (a node), and only the links between nodes are
    # throttled. Default: one worker per node.
    nodes: int | None = None
    comm_ratio: float = 1.0
    link_mbit: float | None = None  # fixes the link speed instead of calibrating it
    # MNIST1DClassifier width. The recipe has 64 (41k parameters); 128 (155k) keeps one all-reduce over the
    # namespaces at full speed below one step of compute on a fast CPU, so that --comm-ratio 1 can be reached.
    channels: int = 128
    batch_size: int = 32  # per worker
    steps: int = 600
    val_every: int = 100
    repeats: int = 3
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    time_budget_s: float | None = None
    data_dir: str = "data/mnist1d"
    out: str = "bench_results"
    loopback: bool = False  # skip the namespaces (no throttling), for machines without root
    run_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.nodes is None:
            self.nodes = self.workers
        if self.nodes < 1 or self.workers % self.nodes:
            raise ValueError(f"--nodes must divide --workers ({self.workers}); received {self.nodes}.")

    @property
    def per_node(self) -> int:
        return self.workers // (self.nodes or self.workers)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A smoke run (under 3 minutes on 2 cores): a narrow model, few steps, one repeat."""
        values: dict[str, Any] = {"channels": 16, "steps": 60, "val_every": 30, "repeats": 1}
        values.update(overrides)
        return cls(**values)


@dataclass
class Link:
    """The link the workers trained over."""

    kind: str  # "netns" or "loopback"
    mbit: float | None
    step_compute_s: float = float("nan")
    allreduce_full_speed_s: float = float("nan")
    allreduce_s: float = float("nan")
    param_bytes: int = 0
    calibration: list[dict[str, float]] = field(default_factory=list)


class Runner:
    """Starts the workers of one run, inside the namespaces when there are some, and collects their results."""

    def __init__(self, config: BenchConfig, link: SlowLink | None, workdir: Path) -> None:
        self.config = config
        self.link = link
        self.workdir = workdir
        self._runs = 0

    def run(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        self._runs += 1
        tag = f"run{self._runs:03d}-{spec.get('strategy', spec.get('mode'))}"
        port = 29400 + self._runs
        distributed = spec.get("mode") == "calibrate" or spec["strategy"] != "compute-only"
        procs, outs, logs = [], [], []
        for i in range(self.config.workers):
            out = self.workdir / f"{tag}-w{i}.json"
            log = self.workdir / f"{tag}-w{i}.log"
            full = {**spec, "rank": i, "workers": self.config.workers, "out": str(out),
                    "data_dir": str(Path(self.config.data_dir).resolve()), "batch_size": self.config.batch_size,
                    "channels": self.config.channels, "nodes": self.config.nodes}  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("SLURM_")}
            env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            if distributed:
                env.update(
                    MASTER_ADDR=self.link.address(0) if self.link else "127.0.0.1",
                    MASTER_PORT=str(port),
                    WORLD_SIZE=str(self.config.workers),
                    RANK=str(i),
                    NODE_RANK=str(i // self.config.per_node),
                    LOCAL_RANK=str(i % self.config.per_node),
                    GLOO_SOCKET_IFNAME="eth0" if self.link else "lo",
                )
            prefix = self.link.exec_prefix(i // self.config.per_node) if self.link else []
            cmd = [*prefix, sys.executable, "-m", "lightning_hpsgd.bench.worker", json.dumps(full)]
            handle = open(log, "w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT))
            outs.append(out)
            logs.append((log, handle))
        try:
            self._wait(procs, logs, tag)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for _, handle in logs:
                handle.close()
        return [json.loads(out.read_text()) for out in outs]

    def _wait(self, procs: list[subprocess.Popen], logs: list[tuple[Path, Any]], tag: str) -> None:
        deadline = time.monotonic() + self.config.run_timeout_s
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                i = failed[0] if failed else 0
                tail = logs[i][0].read_text()[-3000:]
                why = f"worker {i} exited with {procs[i].returncode}" if failed else "the run timed out"
                raise RuntimeError(f"Benchmark run {tag}: {why}. Its log ({logs[i][0]}) ends with:\n{tail}")
            time.sleep(0.05)
        for i, p in enumerate(procs):
            if p.returncode != 0:
                tail = logs[i][0].read_text()[-3000:]
                raise RuntimeError(f"Benchmark run {tag}: worker {i} exited with {p.returncode}:\n{tail}")


def calibrate(config: BenchConfig, runner: Runner, link: SlowLink | None) -> Link:
    """Measure compute and all-reduce at full speed, then set the link so one all-reduce ≈ ratio x one step."""
    if link is None:
        results = runner.run({"mode": "calibrate"})
        step = max(r["step_s"] for r in results)
        allreduce = statistics.median(r["allreduce_s"] for r in results)
        return Link("loopback", None, step, allreduce, allreduce, results[0]["param_bytes"])
    link.set_rate(FULL_SPEED_MBIT)
    results = runner.run({"mode": "calibrate"})
    step = max(r["step_s"] for r in results)  # the slowest worker sets the pace
    base = statistics.median(r["allreduce_s"] for r in results)
    param_bytes = results[0]["param_bytes"]
    history = [{"mbit": FULL_SPEED_MBIT, "allreduce_s": base}]
    if config.link_mbit is not None:
        mbit = config.link_mbit
    elif base >= 0.9 * config.comm_ratio * step:
        # Even the full-speed link is as slow as asked: throttling cannot lower the ratio, so keep it as it is.
        return Link("netns", link.mbit, step, base, base, param_bytes, history)
    else:
        target = config.comm_ratio * step
        # A ring all-reduce sends 2 (N - 1) / N of the buffer over each link; the full-speed time is the fixed cost.
        bits = 2 * (config.workers - 1) / config.workers * param_bytes * 8
        mbit = bits / max(target - base, 1e-4) / 1e6
    for attempt in range(3):
        mbit = min(max(mbit, 0.1), FULL_SPEED_MBIT)
        if mbit == history[-1]["mbit"]:
            break  # clamped to the rate just measured (a model small enough to pass in the link's burst): no change
        link.set_rate(mbit)
        measured = statistics.median(
            r["allreduce_s"] for r in runner.run({"mode": "calibrate", "measure_compute": False})
        )
        history.append({"mbit": mbit, "allreduce_s": measured})
        if config.link_mbit is not None or attempt == 2:
            break
        target = config.comm_ratio * step
        if abs(measured / target - 1) < 0.1:
            break
        # t(r) = base + bits / r: solve for the bits the link really carries, then for the rate that hits the target.
        bits = max(measured - base, 1e-6) * mbit * 1e6
        mbit = bits / max(target - base, 1e-4) / 1e6
    return Link("netns", link.mbit, step, base, history[-1]["allreduce_s"], param_bytes, history)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so that the namespaces are removed on either."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ratio_out_of_reach(link: Link, config: BenchConfig) -> str | None:
    """The warning for a link already slower than asked at full speed (a small model on a fast CPU)."""
    if config.link_mbit is not None or link.kind != "netns":
        return None
    full_speed = link.allreduce_full_speed_s / link.step_compute_s
    if full_speed <= 1.1 * config.comm_ratio:
        return None
    return (
        f"COMM/COMPUTE RATIO {full_speed:.2f}, NOT {config.comm_ratio}: one all-reduce takes"
        f" {link.allreduce_full_speed_s * 1e3:.2f} ms even at full speed, against {link.step_compute_s * 1e3:.2f} ms"
        " of compute per step. Give a wider model (--channels) or a larger --comm-ratio."
    )


def run_benchmark(config: BenchConfig, log: Any = print) -> dict[str, Any]:
    """Run the whole benchmark and write the report; return the ``bench.json`` content."""
    unknown = set(config.strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"Unknown strategies {sorted(unknown)}; choose from {list(STRATEGIES)}.")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(config)
    warning = None
    with _terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="hpsgd-bench-") as tmp:
        link_cm: Any = None
        if not config.loopback:
            try:
                link_cm = SlowLink(config.nodes, FULL_SPEED_MBIT).__enter__()
            except NetnsUnavailable as err:
                warning = f"NO THROTTLED LINK: {err} The workers talked over loopback at full speed."
        else:
            warning = "NO THROTTLED LINK: --loopback was given. The workers talked over loopback at full speed."
        if warning:
            warnings.warn(warning, stacklevel=1)
            log(f"WARNING: {warning}")
        try:
            runner = Runner(config, link_cm, Path(tmp))
            started = time.perf_counter()
            link = calibrate(config, runner, link_cm)
            log(_describe_link(link, config))
            too_slow = _ratio_out_of_reach(link, config)
            if too_slow:
                warnings.warn(too_slow, stacklevel=1)
                log(f"WARNING: {too_slow}")
                warning = f"{warning} {too_slow}" if warning else too_slow
            equal_steps = _phase(config, runner, {"max_steps": config.steps, "val_every": config.val_every}, log)
            budget = config.time_budget_s or _default_budget(equal_steps)
            log(f"equal-time phase: budget {budget:.1f} s per run")
            equal_time = _phase(config, runner, {"max_steps": config.steps, "max_time_s": budget}, log)
            elapsed = time.perf_counter() - started
        finally:
            if link_cm is not None:
                link_cm.close()
    report = summarize(config, link, equal_steps, equal_time, budget, warning, elapsed)
    write_report(report, out)
    return report


def prepare_data(config: BenchConfig) -> None:
    """Generate (or load) the MNIST-1D cache once, before the workers start, so they never race to write it."""
    from lightning_hpsgd.recipes import MNIST1DDataModule

    MNIST1DDataModule(data_dir=config.data_dir).prepare_data()


def _phase(config: BenchConfig, runner: Runner, spec: dict[str, Any], log: Any) -> dict[str, list[list[dict]]]:
    """Every strategy ``repeats`` times, the order rotated by one each repeat."""
    results: dict[str, list[list[dict]]] = {name: [] for name in config.strategies}
    names = list(config.strategies)
    for repeat in range(config.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            ranks = runner.run({**spec, "strategy": name, "seed": repeat})
            results[name].append(ranks)
            r0 = ranks[0]
            log(f"  repeat {repeat + 1}/{config.repeats} {name:<13} step {1000 * r0['median_step_s']:7.2f} ms"
                f"  steps {r0['steps']:4d}  val_acc {r0['val_acc']:.4f}")  # fmt: skip
    return results


def _default_budget(equal_steps: dict[str, list[list[dict]]]) -> float:
    source = equal_steps.get("compute-only") or next(iter(equal_steps.values()))
    return statistics.median(max(r["train_seconds"] for r in ranks) for ranks in source)


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(config: BenchConfig, link: Link, equal_steps: dict, equal_time: dict, budget: float,
              warning: str | None, elapsed: float) -> dict[str, Any]:  # fmt: skip
    """Aggregate per-repeat, per-worker results into the report (every ratio from the raw step times)."""
    # One step time per repeat: the median over all workers' step intervals of that run.
    per_repeat = {
        name: [statistics.median([t for r in ranks for t in r["step_times_s"]]) for ranks in runs]
        for name, runs in equal_steps.items()
    }
    compute_only = statistics.median(per_repeat["compute-only"]) if "compute-only" in per_repeat else None
    strategies: dict[str, Any] = {}
    for name, runs in equal_steps.items():
        median = statistics.median(per_repeat[name])
        waits = [
            r["wait_seconds"] / r["train_seconds"] for ranks in runs for r in ranks if r["wait_seconds"] is not None
        ]
        excess = None if compute_only is None else max(0.0, 1 - compute_only / median)
        strategies[name] = {
            "step_time_s": _stats(per_repeat[name]),
            "step_time_per_repeat_s": per_repeat[name],
            # HPSGD measures its waits; for the others, the share of the step beyond compute-only's.
            "blocked_fraction": statistics.mean(waits) if waits else excess,
            "blocked_method": "measured wait at sync points" if waits else "excess over compute-only",
            "excess_over_compute_only": excess,
            "peak_mem_mb": statistics.median(max(r["peak_rss_mb"] for r in ranks) for ranks in runs),
            "fit_mem_growth_mb": statistics.median(
                max(r["peak_rss_mb"] - r["rss_before_fit_mb"] for r in ranks) for ranks in runs
            ),
            "extra_state_bytes": runs[0][0].get("hpsgd_state_bytes"),
            # the DDP communication hook DDP ran, and PowerSGD's compression rate after its warm-up
            "comm_hook": runs[0][0].get("comm_hook"),
            "compression_rate": runs[0][0].get("compression_rate"),
            # H at the end of each equal-steps run (what sync_every="auto" settled at)
            "final_sync_every": [ranks[0].get("sync_every") for ranks in runs],
            "final_sync_delay": [ranks[0].get("sync_delay") for ranks in runs],
            "val_acc_equal_steps": statistics.median(ranks[0]["val_acc"] for ranks in runs),
            "val_acc_equal_time": statistics.median(ranks[0]["val_acc"] for ranks in equal_time[name]),
            "steps_in_time_budget": statistics.median(ranks[0]["steps"] for ranks in equal_time[name]),
            "train_seconds_equal_steps": statistics.median(ranks[0]["train_seconds"] for ranks in runs),
            "curve": runs[0][0]["curve"],  # (train seconds, step, val_acc) of the first repeat
        }
    ratios = {}
    for num, den in (("hpsgd", "ddp"), ("hpsgd", "compute-only"), ("hpsgd_h4", "compute-only"),
                     ("hpsgd_auto", "compute-only"), ("hpsgd_auto", "hpsgd_h4"), ("hpsgd", "localsgd"),
                     ("hpsgd_stale", "hpsgd"), ("ddp", "compute-only"), ("hpsgd_node", "hpsgd"),
                     ("hpsgd_node_h4", "hpsgd_h4"), ("hpsgd_node", "ddp"),
                     ("hpsgd_node_h4", "compute-only"), ("hpsgd_h16_delay", "compute-only"),
                     ("hpsgd_h16_f4", "compute-only"), ("hpsgd_h16_f4", "ddp"), ("hpsgd_h16_f4", "hpsgd_h4"),
                     ("hpsgd_h16_f8", "compute-only"), ("hpsgd_h16_f8", "ddp"),
                     ("hpsgd_h16_f8", "hpsgd_h4"), ("ddp_bf16", "ddp"), ("ddp_powersgd", "ddp"),
                     ("ddp_bf16", "compute-only"), ("ddp_powersgd", "compute-only"), ("hpsgd_h4", "ddp"),
                     ("hpsgd_h4", "ddp_bf16"), ("hpsgd_h4", "ddp_powersgd"), ("hpsgd_h16_f8", "ddp_bf16"),
                     ("hpsgd_h16_f8", "ddp_powersgd"), ("fabric_hpsgd", "fabric_ddp"),
                     ("fabric_hpsgd_h4", "fabric_ddp"), ("fabric_ddp", "ddp"), ("fabric_hpsgd", "hpsgd"),
                     ("fabric_hpsgd_h4", "hpsgd_h4")):  # fmt: skip
        if num in strategies and den in strategies:
            ratios[f"{num}/{den}"] = strategies[num]["step_time_s"]["median"] / strategies[den]["step_time_s"]["median"]
    param_bytes = link.param_bytes
    return {
        "model": f"MNIST1DClassifier(channels={config.channels})",
        "param_count": param_bytes // 4,
        "param_bytes": param_bytes,
        "workers": config.workers,
        "nodes": config.nodes,
        "link": link.kind,
        "link_mbit": link.mbit if link.mbit is not None else float("nan"),
        "allreduce_s": link.allreduce_s,
        "allreduce_full_speed_s": link.allreduce_full_speed_s,
        "step_compute_s": link.step_compute_s,
        "comm_ratio": config.comm_ratio,
        "measured_comm_ratio": link.allreduce_s / link.step_compute_s,
        "calibration": link.calibration,
        "time_budget_s": budget,
        "warning": warning,
        "elapsed_s": elapsed,
        "config": asdict(config),
        "strategies": strategies,
        "ratios": ratios,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _machine() -> str:
    import platform

    import torch

    python = platform.python_version()
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {python}, torch {torch.__version__}"


def _describe_link(link: Link, config: BenchConfig) -> str:
    if link.kind == "loopback":
        return (f"link: loopback (not throttled); one step {1000 * link.step_compute_s:.2f} ms of compute, one"
                f" all-reduce {1000 * link.allreduce_s:.2f} ms")  # fmt: skip
    ratio = link.allreduce_s / link.step_compute_s
    per = "worker" if config.per_node == 1 else f"node ({config.per_node} workers inside, not throttled)"
    return (f"link: {link.mbit:.1f} Mbit/s per {per} (network namespaces + tbf); one step"
            f" {1000 * link.step_compute_s:.2f} ms of compute, one all-reduce {1000 * link.allreduce_s:.2f} ms"
            f" (ratio {ratio:.2f}, asked {config.comm_ratio})")  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _workers(report: dict[str, Any]) -> str:
    nodes = report.get("nodes") or report["workers"]
    if nodes == report["workers"]:
        return f"{report['workers']} workers"
    return f"{report['workers']} workers on {nodes} nodes of {report['workers'] // nodes}"


def markdown(report: dict[str, Any]) -> str:
    """``bench.md``: the table, the ratios, the targets and the link."""
    lines = [f"# HPSGD benchmark: {report['model']}, {_workers(report)}", ""]
    if report["warning"]:
        lines += [f"> **WARNING: {report['warning']}**", ""]
    nodes = report.get("nodes") or report["workers"]
    per = "worker" if nodes == report["workers"] else "node (not throttled inside a node)"
    link = (f"{report['link_mbit']:.1f} Mbit/s per {per} (network namespaces, tbf)" if report["link"] == "netns"
            else "loopback, not throttled")  # fmt: skip
    lines += [
        f"- Link: {link}. One all-reduce of the model ({report['param_bytes'] / 1e6:.2f} MB):"
        f" {1000 * report['allreduce_s']:.2f} ms on it,"
        f" {1000 * report['allreduce_full_speed_s']:.2f} ms at full speed.",
        f"- One training step of compute: {1000 * report['step_compute_s']:.2f} ms. Comm/compute ratio: asked"
        f" {report['comm_ratio']}, measured {report['measured_comm_ratio']:.2f}.",
        f"- {report['config']['steps']} optimizer steps per run (equal steps); equal-time budget"
        f" {report['time_budget_s']:.1f} s. {report['config']['repeats']} repeats, order rotated. {report['machine']},"
        f" {report['date']}; the whole run took {report['elapsed_s'] / 60:.1f} min.",
        "",
        "| strategy | step time ms (median [min, max]) | blocked | peak RSS MB (growth in fit) | val acc, equal steps |"
        " val acc, equal time (steps done) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in report["strategies"].items():
        st = s["step_time_s"]
        blocked = _fmt(s["blocked_fraction"], ".1%") + ("" if s["blocked_method"].startswith("measured") else "*")
        lines.append(
            f"| {name} | {1000 * st['median']:.2f} [{1000 * st['min']:.2f}, {1000 * st['max']:.2f}] | {blocked} |"
            f" {s['peak_mem_mb']:.0f} ({s['fit_mem_growth_mb']:.1f}) | {s['val_acc_equal_steps']:.4f} |"
            f" {s['val_acc_equal_time']:.4f} ({s['steps_in_time_budget']:.0f}) |"
        )
    lines += ["", "\\* share of the step time beyond compute-only's (HPSGD rows: measured waits at sync points).", ""]
    auto = report["strategies"].get("hpsgd_auto")
    if auto and any(h is not None for h in auto.get("final_sync_every", [])):
        settled = auto["final_sync_every"]
        lines += [f"hpsgd_auto ended its equal-steps runs at sync_every = {settled} (one value per repeat).", ""]
    for name in ("hpsgd_h16_delay", "hpsgd_h16_f4", "hpsgd_h16_f8"):
        delays = report["strategies"].get(name, {}).get("final_sync_delay", [])
        if any(d is not None for d in delays):
            lines += [f"{name} ended its equal-steps runs at sync_delay = {delays} (one value per repeat).", ""]
    for name, s in report["strategies"].items():
        if s.get("comm_hook"):
            rate = s.get("compression_rate")
            sent = f"; it sent 1/{rate:.0f} of the gradient's elements after its warm-up" if rate else ""
            lines += [f"{name}: DDP ran the communication hook `{s['comm_hook']}`{sent}.", ""]
    lines += ["| ratio (median step times) | value | target |", "| --- | --- | --- |"]
    for key, value in report["ratios"].items():
        bound = TARGETS.get(key)
        target = "–" if bound is None else f"≤ {bound}"
        if key == "hpsgd_h4/compute-only":
            target += " (at --comm-ratio 4)"
        lines.append(f"| {key} | {value:.3f} | {target} |")
    lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """``bench.png``: step-time bars (min–max whiskers) and validation accuracy against training wall time."""
    require("matplotlib", "The benchmark's chart").use("Agg")
    plt = require("matplotlib.pyplot", "The benchmark's chart")

    from lightning_hpsgd.plot import accuracy_axis, legend_outside

    names = list(report["strategies"])
    # One above the other, 770 px wide: the width the documentation shows it at, so labels stay readable.
    fig, (bars, curves) = plt.subplots(2, 1, figsize=(7, 8.4))
    medians = [1000 * report["strategies"][n]["step_time_s"]["median"] for n in names]
    lows = [m - 1000 * report["strategies"][n]["step_time_s"]["min"] for m, n in zip(medians, names)]
    highs = [1000 * report["strategies"][n]["step_time_s"]["max"] - m for m, n in zip(medians, names)]
    bars.bar(names, medians, yerr=[lows, highs], capsize=4, color="tab:blue")
    bars.set_ylabel("step time (ms, median over repeats)")
    bars.set_title(f"Step time, link {_fmt(report['link_mbit'], '.1f')} Mbit/s ({report['link']})")
    bars.tick_params(axis="x", rotation=30)
    for name in names:
        curve = report["strategies"][name]["curve"]
        if curve:
            curves.plot([c[0] for c in curve], [c[2] for c in curve], marker="o", label=name)
    curves.axvline(report["time_budget_s"], color="grey", linestyle="--", label="equal-time budget")
    curves.set_xlabel("training wall time (s, validation excluded)")
    curves.set_ylabel("validation accuracy")
    curves.set_title("Accuracy against wall time (equal-steps runs)")
    accuracy_axis(curves, always=True)
    fig.suptitle(f"{report['model']}, {_workers(report)}, comm/compute {report['measured_comm_ratio']:.2f}")
    legend_outside(fig, curves, ncol=3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report))
    plot(report, out / "bench.png")
