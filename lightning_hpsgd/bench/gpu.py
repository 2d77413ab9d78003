"""``python -m lightning_hpsgd.bench gpu``: compute-only, DDP and HPSGD (H=1, H=4) side by side on the GPUs here.

The same ratios as the CPU benchmark, for the hardware users train on, with plain training loops around the engine
(no Lightning), so that what is measured is the communication and its overlap:

* **compute-only**: every rank trains alone (the limit);
* **ddp**: PyTorch's ``DistributedDataParallel`` (gradient all-reduce overlapped with backward);
* **hpsgd** / **hpsgd_h4**: the HPSGD engine with ``sync_every`` 1 and 4; wait and communication per round come
  from the engine's statistics (CUDA events on the communication stream, so the all-reduce's real duration).

With at least as many GPUs as ranks, each rank has its own GPU and NCCL. With fewer (one GPU, say), the ranks share
them through gloo on CUDA tensors: a real peer, with loopback TCP as the link. ``--device cpu`` runs the same
measurement on CPU (a smoke test). ``--profile DIR`` writes a ``torch.profiler`` trace of rank 0 in the HPSGD H=4
run (open it in Perfetto or ``chrome://tracing``).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_hpsgd.extras import require

MODES = ("compute-only", "ddp", "hpsgd", "hpsgd_h4")
SYNC_EVERY = {"hpsgd": 1, "hpsgd_h4": 4}


@dataclass
class GpuBenchConfig:
    """What to run. ``model``: ``resnet18`` (torchvision, 32×32 inputs) or ``mlp`` (a small MLP, for CPU)."""

    world_size: int = 2
    device: str = "cuda"
    model: str = "resnet18"
    batch: int = 256
    steps: int = 40
    warmup: int = 5
    precision: str = "bf16-mixed"
    modes: tuple[str, ...] = MODES
    profile: str | None = None


@dataclass
class ModeResult:
    """Rank 0's medians for one mode, in milliseconds (``wait_ms``, ``comm_ms``: per round; HPSGD only)."""

    mode: str
    step_ms: float
    step_ms_per_rank: list[float] = field(default_factory=list)
    wait_ms: float | None = None
    comm_ms: float | None = None
    rounds_timed: int | None = None


def _model(name: str) -> nn.Module:
    if name == "resnet18":
        return require("torchvision.models", "The ResNet-18 GPU benchmark").resnet18(num_classes=10)
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 256), nn.ReLU(), nn.Linear(256, 10))
    raise ValueError(f"Unknown model {name!r}; choose 'resnet18' or 'mlp'.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_mode(mode: str, config: GpuBenchConfig, rank: int, device: torch.device, backend: str) -> dict[str, Any]:
    from lightning_hpsgd.engine import HPSGDEngine

    torch.manual_seed(0)
    model = _model(config.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(config.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (config.batch,), generator=gen).to(device)
    group = dist.new_group(backend=backend)
    engine = None
    trained: nn.Module = model
    if mode == "ddp":
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group
        )
    elif mode in SYNC_EVERY:
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        engine = HPSGDEngine(tensors, group=group, sync_every=SYNC_EVERY[mode])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16-mixed" else nullcontext()

    def step(number: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = nn.functional.cross_entropy(trained(x), y)
        loss.backward()
        optimizer.step()
        if engine is not None:
            engine.on_optimizer_step(number)

    for number in range(1, config.warmup + 1):
        step(number)
    _sync(device)
    dist.barrier(group=group)
    if engine is not None:
        engine.stats.wait_seconds = engine.stats.comm_seconds = 0.0
        engine.stats.timed_rounds = 0
    profiling = config.profile is not None and mode == "hpsgd_h4" and rank == 0
    profiler = _profiler(device) if profiling else nullcontext()
    times = []
    with profiler as prof:
        for number in range(config.warmup + 1, config.warmup + config.steps + 1):
            t0 = time.perf_counter()
            step(number)
            _sync(device)  # the step's own time, on every mode alike
            times.append(time.perf_counter() - t0)
    if profiling:
        Path(config.profile).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(config.profile) / "trace_hpsgd_h4_rank0.json"))
    out: dict[str, Any] = {"step_s": statistics.median(times)}
    if engine is not None:
        engine.flush(config.warmup + config.steps)
        stats = engine.stats
        out.update(
            wait_s=stats.wait_seconds / max(1, stats.timed_rounds),
            comm_s=stats.comm_seconds / max(1, stats.timed_rounds),
            rounds_timed=stats.timed_rounds,
        )
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    return out


def _profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def _worker(rank: int, config: GpuBenchConfig, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // config.world_size))
    if config.device == "cuda":
        gpus = torch.cuda.device_count()
        device = torch.device("cuda", rank % gpus)
        torch.cuda.set_device(device)
        backend = "nccl" if gpus >= config.world_size else "gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=config.world_size, timeout=timedelta(seconds=300))
    results = {}
    for mode in config.modes:
        if mode == "compute-only":
            # Each rank alone, at the same time as the others (sharing the device as in the other modes).
            dist.barrier()
            results[mode] = _run_mode_without_group(config, rank, device)
        else:
            results[mode] = _run_mode(mode, config, rank, device, backend)
    gathered: list[Any] = [None] * config.world_size
    dist.all_gather_object(gathered, results)
    if rank == 0:
        queue.put({"backend": backend, "device": str(device), "per_rank": gathered})
    dist.destroy_process_group()


def _run_mode_without_group(config: GpuBenchConfig, rank: int, device: torch.device) -> dict[str, Any]:
    """The compute-only mode: the same loop with no communication at all."""
    torch.manual_seed(0)
    model = _model(config.model).to(device)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(config.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (config.batch,), generator=gen).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16-mixed" else nullcontext()
    times = []
    for number in range(config.warmup + config.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        _sync(device)
        if number >= config.warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times)}


def run_gpu_benchmark(config: GpuBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every mode in ``config.world_size`` fresh processes; return the report (also the ratios)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench gpu: no CUDA device here. Run it on a GPU machine, or pass --device cpu (a smoke run).")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    started = time.perf_counter()
    mp.start_processes(_worker, args=(config, port, queue), nprocs=config.world_size, start_method="spawn")
    raw = queue.get()
    modes = {}
    for mode in config.modes:
        per_rank = [r[mode] for r in raw["per_rank"]]
        result = ModeResult(
            mode=mode,
            step_ms=1000 * statistics.median(r["step_s"] for r in per_rank),
            step_ms_per_rank=[1000 * r["step_s"] for r in per_rank],
        )
        if "wait_s" in per_rank[0]:
            result.wait_ms = 1000 * max(r["wait_s"] for r in per_rank)  # the worst rank's, as the monitor logs
            result.comm_ms = 1000 * statistics.median(r["comm_s"] for r in per_rank)
            result.rounds_timed = min(r["rounds_timed"] for r in per_rank)
        modes[mode] = result
    report = {
        "config": asdict(config),
        "backend": raw["backend"],
        "shared_device": config.device == "cuda" and raw["backend"] == "gloo",
        "device_name": torch.cuda.get_device_name(0) if config.device == "cuda" else "cpu",
        "modes": {m: asdict(r) for m, r in modes.items()},
        "ratios": ratios(modes),
        "elapsed_s": time.perf_counter() - started,
    }
    log(markdown(report))
    return report


def ratios(modes: dict[str, ModeResult]) -> dict[str, float]:
    """Step-time ratios, and for HPSGD the share of a round's communication that training waited for."""
    out = {}
    for num, den in (("ddp", "compute-only"), ("hpsgd", "compute-only"), ("hpsgd_h4", "compute-only"),
                     ("hpsgd", "ddp"), ("hpsgd_h4", "ddp")):  # fmt: skip
        if num in modes and den in modes:
            out[f"{num}/{den}"] = modes[num].step_ms / modes[den].step_ms
    for name in SYNC_EVERY:
        result = modes.get(name)
        if result is not None and result.comm_ms:
            out[f"{name} wait/comm"] = (result.wait_ms or 0.0) / result.comm_ms
    return out


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"HPSGD GPU benchmark: {config['model']}, batch {config['batch']}, {config['precision']},"
        f" {config['world_size']} ranks on {report['device_name']} ({report['backend']}"
        f"{', ranks share the device' if report['shared_device'] else ''})",
        "",
        "| mode | step ms (median) | wait ms / round | comm ms / round |",
        "| --- | --- | --- | --- |",
    ]
    for name, m in report["modes"].items():
        wait = "" if m["wait_ms"] is None else f"{m['wait_ms']:.2f}"
        comm = "" if m["comm_ms"] is None else f"{m['comm_ms']:.2f}"
        lines.append(f"| {name} | {m['step_ms']:.2f} | {wait} | {comm} |")
    lines += ["", "| ratio | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def main(args: list[str]) -> None:
    import argparse

    defaults = GpuBenchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hpsgd.bench gpu",
        description="Compute-only, DDP and HPSGD (sync_every 1 and 4) on the GPUs of this machine: step time, wait"
        " and communication per round, and their ratios. With fewer GPUs than ranks, ranks share a GPU over gloo.",
    )
    parser.add_argument("--world-size", type=int, default=defaults.world_size)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=defaults.device)
    parser.add_argument("--model", choices=("resnet18", "mlp"), default=defaults.model)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--precision", choices=("bf16-mixed", "32-true"), default=defaults.precision)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--profile", help="write a torch.profiler trace of rank 0's HPSGD H=4 run to this folder")
    parser.add_argument("--out", help="also write the report as JSON to this file")
    options = parser.parse_args(args)
    config = GpuBenchConfig(
        world_size=options.world_size, device=options.device, model=options.model, batch=options.batch,
        steps=options.steps, warmup=options.warmup, precision=options.precision, modes=tuple(options.modes),
        profile=options.profile,
    )  # fmt: skip
    report = run_gpu_benchmark(config)
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2))
