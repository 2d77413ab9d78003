"""How much of HPSGD's all-reduce is hidden behind compute.

Two (or more) CPU processes on gloo train an MLP with plain torch and the HPSGD engine (``sync_every=1``). The
figure of merit is the host time a sync point spends waiting for the previous round's all-reduce, divided by the
time one blocking all-reduce of the same buffer takes on the same group: 0 means fully hidden, 1 means nothing was
hidden (as in a synchronous scheme).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_hpsgd.engine import HPSGDEngine


@dataclass
class OverlapResult:
    """Per-round medians in milliseconds, and the hidden fraction.

    ``sync_point_ms`` is the whole sync point (the engine's own passes over the flat buffers plus the wait).
    """

    world_size: int
    parameters: int
    step_ms: float
    allreduce_ms: float
    wait_ms: float
    sync_point_ms: float
    wait_over_allreduce: float


def _worker(rank: int, world_size: int, port: int, hidden: int, rounds: int, batch: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    group = dist.new_group()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = HPSGDEngine(list(model.parameters()), group=group)
    x = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(rank))

    def compute_step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):  # warm-up
        compute_step()
    dist.barrier()
    step_times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        compute_step()
        step_times.append(time.perf_counter() - t0)

    wire = torch.zeros(engine.layout.numel)
    allreduce_times = []
    for _ in range(rounds):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.all_reduce(wire, group=group)
        allreduce_times.append(time.perf_counter() - t0)

    dist.barrier()
    waits, sync_points = [], []
    for step in range(1, rounds + 1):
        compute_step()
        t0 = time.perf_counter()
        engine.on_optimizer_step(step)
        if step > 1:
            sync_points.append(time.perf_counter() - t0)
            waits.append(engine.stats.last_wait_seconds)
    engine.flush(rounds)
    if rank == 0:
        ms = lambda v: 1000 * statistics.median(v)  # noqa: E731
        queue.put(
            OverlapResult(
                world_size=world_size,
                parameters=engine.layout.numel,
                step_ms=ms(step_times),
                allreduce_ms=ms(allreduce_times),
                wait_ms=ms(waits),
                sync_point_ms=ms(sync_points),
                wait_over_allreduce=statistics.median(waits) / statistics.median(allreduce_times),
            )
        )
    dist.destroy_process_group()


def measure_overlap(world_size: int = 2, hidden: int = 512, rounds: int = 30, batch: int = 256) -> OverlapResult:
    """Run the overlap benchmark in ``world_size`` fresh processes and return rank 0's medians."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(world_size, port, hidden, rounds, batch, queue), nprocs=world_size, start_method="spawn"
    )
    return queue.get()


def report(result: OverlapResult) -> str:
    lines = [f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}" for k, v in asdict(result).items()]
    verdict = (
        "all-reduce shorter than a step" if result.allreduce_ms < result.step_ms else "all-reduce LONGER than a step"
    )
    lines.append(f"{'regime':>20}: {verdict}")
    return "\n".join(lines)
