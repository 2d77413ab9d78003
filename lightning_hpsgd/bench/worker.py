"""One worker of a benchmark run: ``python -m lightning_hpsgd.bench.worker SPEC_JSON``.

The orchestrator ([`lightning_hpsgd.bench.compare`][]) starts ``workers / nodes`` of them in each network namespace,
as the devices of a Lightning node (``num_nodes``, ``devices``, with ``MASTER_ADDR``, ``NODE_RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` set), so gloo traffic between nodes crosses the throttled link and traffic inside a node does
not. ``compute-only`` workers train at the same time with no process group at all. Each writes its measurements
to ``SPEC["out"]`` as JSON.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

# What a plain run compares; the "_node" strategies (hierarchy="node") are for runs with several workers per node.
DEFAULT_STRATEGIES = ("ddp", "localsgd", "hpsgd", "hpsgd_h4", "hpsgd_auto", "hpsgd_stale", "compute-only")
# The settings for slow links: H = 16 with the outer optimizer and the merge delay chosen from the measured times,
# the whole model in one round (hpsgd_h16_delay), or in 4 or 8 fragments (hpsgd_h16_f4, hpsgd_h16_f8).
SLOW_LINK = {"sync_every": 16, "sync_delay": "auto", "outer_lr": 0.8, "outer_momentum": 0.6}
# DDP with a communication hook, Lightning's usual answer to a slow link: gradients in bf16, or PowerSGD.
COMM_HOOKS = ("ddp_bf16", "ddp_powersgd")
# The same model, data and steps in a plain Fabric loop: Fabric's DDP, and lightning_hpsgd.fabric.HPSGDStrategy.
FABRIC = {"fabric_ddp": None, "fabric_hpsgd": {}, "fabric_hpsgd_h4": {"sync_every": 4}}
STRATEGIES = (*DEFAULT_STRATEGIES, "hpsgd_node", "hpsgd_node_h4", "hpsgd_h16_delay", "hpsgd_h16_f4", "hpsgd_h16_f8",
              *COMM_HOOKS, *FABRIC)  # fmt: skip
# PowerSGD as PyTorch's PowerSGDState docs advise to start: rank 1, and plain all-reduce for the first 10 % of the
# steps (compressing from the first step can take training down a worse path for good).
POWERSGD_RANK = 1
POWERSGD_WARMUP_FRACTION = 0.1


def make_strategy(name: str, timeout_s: float, monitor: bool = False, max_steps: int = 600) -> Any:
    """The Lightning strategy a benchmark name stands for (``compute-only`` has none: it trains alone).

    ``max_steps`` sets PowerSGD's warm-up (``start_powerSGD_iter``, 10 % of it, at least 2).
    """
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_hpsgd import HPSGDStrategy
    from lightning_hpsgd.baselines import PostLocalSGDStrategy

    timeout = timedelta(seconds=timeout_s)
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo", timeout=timeout)
    if name == "localsgd":
        return PostLocalSGDStrategy(model_averaging_period=4, warmup_steps=8, process_group_backend="gloo",
                                    timeout=timeout)  # fmt: skip
    hpsgd = {"hpsgd": {}, "hpsgd_h4": {"sync_every": 4}, "hpsgd_auto": {"sync_every": "auto"},
             "hpsgd_stale": {"merge": "stale"}, "hpsgd_node": {"hierarchy": "node"},
             "hpsgd_node_h4": {"hierarchy": "node", "sync_every": 4}, "hpsgd_h16_delay": SLOW_LINK,
             "hpsgd_h16_f4": {**SLOW_LINK, "fragments": 4}, "hpsgd_h16_f8": {**SLOW_LINK, "fragments": 8}}  # fmt: skip
    if name in hpsgd:
        return HPSGDStrategy(process_group_backend="gloo", timeout=timeout, monitor=monitor, **hpsgd[name])
    if name in COMM_HOOKS:
        return make_comm_hook_strategy(name, timeout, max_steps)
    if name == "compute-only":
        return "auto"
    raise ValueError(f"Unknown benchmark strategy {name!r}; choose from {list(STRATEGIES)}.")


def make_comm_hook_strategy(name: str, timeout: timedelta, max_steps: int) -> Any:
    """``ddp_bf16`` or ``ddp_powersgd``: Lightning's DDP with the hook registered on CPU too (Lightning skips it
    there)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from lightning_hpsgd.baselines import CommHookDDPStrategy

    if name == "ddp_bf16":
        hook: dict[str, Any] = {"ddp_comm_hook": default_hooks.bf16_compress_hook}
    else:
        warmup = max(2, round(POWERSGD_WARMUP_FRACTION * max_steps))  # PyTorch's minimum with error feedback: 2
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=POWERSGD_RANK, start_powerSGD_iter=warmup
        )
        hook = {"ddp_comm_state": state, "ddp_comm_hook": powerSGD_hook.powerSGD_hook}
    return CommHookDDPStrategy(process_group_backend="gloo", timeout=timeout, **hook)


def record_comm_hook(clock: Any, strategy: Any) -> None:
    """The DDP communication hook that really ran (from DDP's own record: Lightning's ``DDPStrategy`` skips hooks on
    CPU), and PowerSGD's compression rate (gradient elements over the elements it sent, since its warm-up)."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(strategy, "model", None)
    if isinstance(model, DistributedDataParallel):
        clock.comm_hook = model._get_ddp_logging_data().get("comm_hook")
    state = getattr(strategy, "_ddp_comm_state", None)
    if hasattr(state, "compression_stats"):
        clock.compression_rate = float(state.compression_stats()[0])


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(spec: dict[str, Any]):
    from lightning_hpsgd.recipes import MNIST1DClassifier

    return MNIST1DClassifier(channels=spec["channels"], lr=spec.get("lr", 0.01))


def build_data(spec: dict[str, Any]):
    from lightning_hpsgd.recipes import MNIST1DDataModule

    return MNIST1DDataModule(data_dir=spec["data_dir"], batch_size=spec["batch_size"])


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit for ``max_steps`` (or until ``max_time_s``), validating every ``val_every`` steps; then validate."""
    if spec["strategy"] in FABRIC:
        return train_fabric(spec)
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    class StepClock(Callback):
        """Wall time between consecutive optimizer steps, validation excluded; validation accuracy on that clock."""

        def __init__(self, skip: int) -> None:
            self.skip = skip
            self.last: float | None = None
            self.intervals: list[float] = []
            self.train_seconds = 0.0
            self.curve: list[tuple[float, int, float]] = []
            self.state_bytes: int | None = None
            self.comm_hook: str | None = None
            self.compression_rate: float | None = None

        def on_train_end(self, trainer, pl_module) -> None:
            record_comm_hook(self, trainer.strategy)
            # The flat buffers HPSGD keeps beside the model (G, S, the wire), before teardown drops the engine.
            engine = getattr(trainer.strategy, "engine", None)
            if engine is not None:
                buffers = (engine.global_, engine.start)
                wires = sum(w.nbytes for w in engine.rounds.wires)
                self.state_bytes = sum(t.numel() * t.element_size() for t in buffers) + wires

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.last is None:
                self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.last is not None:
                self.train_seconds += now - self.last
                if trainer.global_step > self.skip:
                    self.intervals.append(now - self.last)
            self.last = now

        def on_validation_start(self, trainer, pl_module) -> None:
            self.last = None  # the next interval starts after validation

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.state.fn == "fit" and not trainer.sanity_checking:
                acc = float(trainer.callback_metrics["val/acc"])
                self.curve.append((self.train_seconds, trainer.global_step, acc))

    torch.set_num_threads(1)
    L.seed_everything(spec.get("seed", 0), verbose=False)
    distributed = spec["strategy"] != "compute-only"
    model, data = build_model(spec), build_data(spec)
    data.prepare_data()
    if not distributed:
        shard_training_set(data, rank=spec["rank"], world=spec["workers"])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    clock = StepClock(skip=spec.get("skip_steps", 5))
    val_every = spec.get("val_every")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=spec["workers"] // spec.get("nodes", spec["workers"]) if distributed else 1,
        num_nodes=spec.get("nodes", spec["workers"]) if distributed else 1,
        strategy=make_strategy(
            spec["strategy"], spec.get("timeout_s", 120), spec.get("monitor", False), spec["max_steps"]
        ),
        max_steps=spec["max_steps"],
        max_time={"seconds": spec["max_time_s"]} if spec.get("max_time_s") else None,
        val_check_interval=val_every if val_every else None,
        check_val_every_n_epoch=None if val_every else 10**6,
        num_sanity_val_steps=0,
        logger=CSVLogger(spec["csv_dir"]) if spec.get("csv_dir") else False,
        log_every_n_steps=spec.get("log_every_n_steps", 50),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    rss_before = rss_mb()
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    stats = getattr(trainer.strategy, "stats", None)
    (final,) = trainer.validate(model, datamodule=data, verbose=False)
    return {
        "strategy": spec["strategy"],
        "rank": trainer.global_rank if distributed else spec["rank"],
        "steps": trainer.global_step,
        "step_times_s": clock.intervals,
        "median_step_s": statistics.median(clock.intervals) if clock.intervals else float("nan"),
        "train_seconds": clock.train_seconds,
        "fit_seconds": fit_seconds,
        "curve": clock.curve,
        "val_acc": float(final["val/acc"]),
        "wait_seconds": stats.wait_seconds if stats is not None else None,
        "rounds": stats.rounds if stats is not None else None,
        "sync_every": stats.sync_every if stats is not None else None,
        "sync_delay": stats.sync_delay if stats is not None else None,
        "rss_before_fit_mb": rss_before,
        "peak_rss_mb": peak,
        "param_bytes": param_bytes,
        "hpsgd_state_bytes": clock.state_bytes,
        "comm_hook": clock.comm_hook,
        "compression_rate": clock.compression_rate,
    }


def train_fabric(spec: dict[str, Any]) -> dict[str, Any]:
    """The Trainer's run as a Fabric loop: the recipe's model, data, AdamW and one-cycle schedule, ``max_steps``
    steps timed as the Trainer's (from one step's end to the next), then the flushed model's test accuracy."""
    import lightning as L
    from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy

    from lightning_hpsgd.fabric import HPSGDStrategy as FabricHPSGDStrategy

    torch.set_num_threads(1)
    L.seed_everything(spec.get("seed", 0), verbose=False)
    timeout = timedelta(seconds=spec.get("timeout_s", 120))
    options = FABRIC[spec["strategy"]]
    if options is None:
        strategy: Any = FabricDDPStrategy(process_group_backend="gloo", timeout=timeout)
    else:
        strategy = FabricHPSGDStrategy(process_group_backend="gloo", timeout=timeout, **options)
    nodes = spec.get("nodes", spec["workers"])
    fabric = L.Fabric(accelerator="cpu", devices=spec["workers"] // nodes, num_nodes=nodes, strategy=strategy)
    fabric.launch()
    module, data = build_model(spec), build_data(spec)
    data.prepare_data()
    data.setup("fit")
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    config = module.optimizer_config(spec["max_steps"])
    scheduler = config["lr_scheduler"]["scheduler"]
    model, optimizer = fabric.setup(module, config["optimizer"])
    train_loader, val_loader = fabric.setup_dataloaders(data.train_dataloader(), data.val_dataloader())
    skip, intervals, steps, epoch = spec.get("skip_steps", 5), [], 0, 0
    rss_before, started, last = rss_mb(), time.perf_counter(), None
    while steps < spec["max_steps"]:
        train_loader.sampler.set_epoch(epoch)
        for x, y in train_loader:
            if last is None:
                last = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            scheduler.step()
            steps += 1
            now = time.perf_counter()
            if steps > skip:
                intervals.append(now - last)
            last = now
            if steps >= spec["max_steps"] or out_of_time(fabric, spec, steps, started):
                break
        else:
            epoch += 1
            continue
        break
    train_seconds = time.perf_counter() - started
    stats = getattr(fabric.strategy, "stats", None)
    if isinstance(fabric.strategy, FabricHPSGDStrategy):
        fabric.strategy.flush()
    correct = torch.zeros(2)
    with torch.no_grad():
        for x, y in val_loader:
            correct += torch.tensor([(model(x).argmax(-1) == y).sum().item(), len(y)])
    correct = fabric.all_reduce(correct, reduce_op="sum")
    return {
        "strategy": spec["strategy"], "rank": fabric.global_rank, "steps": steps, "step_times_s": intervals,
        "median_step_s": statistics.median(intervals) if intervals else float("nan"),
        "train_seconds": train_seconds, "fit_seconds": train_seconds, "curve": [],
        "val_acc": float(correct[0] / correct[1]),
        "wait_seconds": stats.wait_seconds if stats is not None else None,
        "rounds": stats.rounds if stats is not None else None,
        "sync_every": stats.sync_every if stats is not None else None,
        "sync_delay": stats.sync_delay if stats is not None else None,
        "rss_before_fit_mb": rss_before, "peak_rss_mb": peak_rss_mb(), "param_bytes": param_bytes,
        "hpsgd_state_bytes": None, "comm_hook": None, "compression_rate": None,
    }  # fmt: skip


def out_of_time(fabric: Any, spec: dict[str, Any], steps: int, started: float) -> bool:
    """Whether rank 0 has used up ``max_time_s``, asked every 10 steps (a broadcast, as the Trainer's ``Timer``
    under DDP), so that every rank stops after the same step."""
    if not spec.get("max_time_s") or steps % 10:
        return False
    return bool(fabric.broadcast(time.perf_counter() - started > spec["max_time_s"]))


def shard_training_set(data: Any, rank: int, world: int) -> None:
    """Give a worker with no process group the share of the training set that DistributedSampler would give it."""
    from torch.utils.data import DataLoader, Subset

    original = data.train_dataloader

    def train_dataloader() -> DataLoader:
        loader = original()
        n = len(loader.dataset)
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()[rank:n:world]
        return DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size, shuffle=True)

    data.train_dataloader = train_dataloader


def calibrate(spec: dict[str, Any]) -> dict[str, Any]:
    """Median compute time of one training step (no communication), then of one all-reduce of the model's size."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # The network namespace it ran in: workers of one simulated node share one.
    out: dict[str, Any] = {"rank": int(os.environ.get("RANK", 0)), "netns": os.readlink("/proc/self/ns/net")}
    model = build_model(spec)
    numel = sum(p.numel() for p in model.parameters())
    out["param_bytes"] = numel * 4
    if spec.get("measure_compute", True):
        data = build_data(spec)
        data.prepare_data()
        data.setup("fit")
        x, y = next(iter(data.train_dataloader()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for _ in range(spec.get("compute_steps", 30)):
            started = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        out["step_s"] = statistics.median(times[5:])
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec.get("timeout_s", 120)))
    buffer = torch.ones(numel)
    times = []
    for _ in range(spec.get("allreduce_repeats", 10)):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - started)
    out["allreduce_s"] = statistics.median(times[1:])
    dist.destroy_process_group()
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = calibrate(spec) if spec.get("mode") == "calibrate" else train(spec)
    Path(spec["out"]).write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    # The result is written. PyTorch's post-local SGD (DDP's comm hook and its subgroups) can abort the interpreter's
    # teardown now and then ("terminate called without an active exception"); nothing is left to clean up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
