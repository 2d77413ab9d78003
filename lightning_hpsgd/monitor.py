"""``HPSGDMonitor``: HPSGD's per-round statistics in every logger the Trainer has, under ``hpsgd/…``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_hpsgd.compat import logging_step
from lightning_hpsgd.engine import EngineStats
from lightning_hpsgd.recommend import recommendation
from lightning_hpsgd.wandb import define_wall_time_axis, stage_wall_time


class HPSGDMonitor(Callback):
    """Logs what HPSGD does, every ``every_n_steps`` optimizer steps, to all of ``trainer.loggers``.

    The figures are means over the rounds merged since the previous log:

    * ``hpsgd/comm_ms``: from the launch of a round's all-reduce to its completion by the backend;
    * ``hpsgd/wait_ms``: how long training blocked at the sync point (max over ranks);
    * ``hpsgd/hidden``: the fraction of communication hidden behind compute, ``1 - wait / comm``, each rank's own
      wait over its own communication time, on the rank that hid the least (min over ranks), and 0 where a rank
      waited longer than its all-reduce took;
    * ``hpsgd/staleness``: optimizer steps between a round's launch and its merge;
    * ``hpsgd/drift``: ``‖R − G‖ / ‖G‖`` just before the merge, at the latest sync point (max over ranks; measured on
      one round per interval, two extra passes over the model);
    * ``hpsgd/bytes``: payload bytes per round and rank; ``hpsgd/rounds``: rounds merged so far;
    * ``hpsgd/sync_every``: ``H`` of the current round (the value ``sync_every="auto"`` chose);
    * ``hpsgd/sync_delay``: ``τ``, steps from a round's launch to its merge (the value ``sync_delay="auto"`` chose);
    * with ``fragments`` > 1, ``hpsgd/comm_ms/f{i}`` and ``hpsgd/wait_ms/f{i}``: the latest timed round of each
      fragment (this rank's; rank 0 writes);
    * ``hpsgd/step_ms``: wall time per optimizer step; ``hpsgd/samples_per_s``: samples per second over all ranks;
    * ``time/wall_s``: seconds since the start of fit, an x-axis for accuracy at a fixed wall time.

    At the end of fit, rank 0 prints what the ranks measured (a step of compute, one all-reduce, their ratio, and
    how long it waited) and the ``sync_every`` that hides that link, by the rule ``sync_every="auto"`` follows
    ([`lightning_hpsgd.recommend.recommendation`][]); nothing when no round was timed.

    With another strategy (DDP, say) it logs only ``time/wall_s``, ``hpsgd/step_ms`` and ``hpsgd/samples_per_s``, so
    baselines can be compared on the same wall-time axis. ``time/wall_s`` is also logged at the end of every
    validation, at the step of the validation metrics and just before them.

    At the start of fit it adds the strategy to every logger's run config (``strategy.name``, ``strategy.sync_every``,
    ..., see [`describe_strategy`][]). In W&B it makes ``time/wall_s`` the x-axis of the ``hpsgd/*`` metrics only
    ([`lightning_hpsgd.wandb.define_wall_time_axis`][]); the user's metrics keep Lightning's step axis, and their
    rows get a ``time/wall_s`` column, so that a panel can chart them against wall time.

    Rank 0 writes; the cross-rank maxima cost one small all-reduce per log. Metrics go out the way Lightning's own
    ``LearningRateMonitor`` sends its values, at the step of Lightning's other training metrics.
    ``HPSGDStrategy`` adds a monitor by itself unless the Trainer has one or ``monitor=False``.

    Args:
        every_n_steps: optimizer steps between logs (default: the Trainer's ``log_every_n_steps``).
        drift: whether to measure ``hpsgd/drift`` (default ``True``).
    """

    def __init__(self, every_n_steps: int | None = None, drift: bool = True) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be None or an integer >= 1; received {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.drift = drift
        self._fit_started = 0.0
        self._last: tuple[int, float, float, int, int, float, int] | None = None
        self._samples = 0
        self._last_logged_step = -1
        self._wait_at_start = 0.0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        config = {"strategy": describe_strategy(trainer)}
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                define_wall_time_axis(run)
                if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
                    run_dir = Path(run.dir).parent
                    rank_zero_info(f"W&B is offline: the run is in {run_dir}; upload it with `wandb sync {run_dir}`.")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._samples = 0
        self._last = None
        self._last_logged_step = trainer.global_step
        stats = _stats(trainer)
        self._last = self._snapshot(stats, trainer.global_step)
        self._wait_at_start = stats.wait_seconds if stats is not None else 0.0
        if stats is not None and self.drift:
            _engine(trainer).request_drift()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += _batch_size(batch)
        self._log_interval(trainer)
        if _lightning_logs_now(trainer):  # after the monitor's own row: Lightning's training metrics come next
            self._stage_wall_time(trainer, other_loggers=False)  # their rows hold time/wall_s at the monitor's steps

    def _log_interval(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        interval = self.every_n_steps or trainer.log_every_n_steps
        if self._last is None or step == self._last_logged_step or step % interval:
            return
        if not trainer.loggers:  # nothing to write to: no collective either (the same on every rank)
            return
        self._last_logged_step = step
        stats = _stats(trainer)
        metrics = self._metrics(trainer, stats, step)
        if stats is not None and self.drift:
            _engine(trainer).request_drift()
        self._write(trainer, metrics)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Just before Lightning logs the epoch's validation metrics, so they are placed at the time they were measured.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stage_wall_time(trainer, other_loggers=True)

    def _stage_wall_time(self, trainer: L.Trainer, other_loggers: bool) -> None:
        """The wall time, for the metrics Lightning logs next: staged into their W&B row; with ``other_loggers``,
        also logged to the other loggers (CSV, TensorBoard), whose rows are joined by step."""
        if not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self._fit_started
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                stage_wall_time(logger.experiment, seconds)
            elif other_loggers:
                logger.log_metrics({"time/wall_s": seconds}, step=logging_step(trainer))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the strategy's flush at the end of fit (its hooks run first): the final round's figures are in.
        engine = _engine(trainer)
        if engine is None or engine.schedule.measured is None or not trainer.is_global_zero:
            return
        ratio, slowest = engine.schedule.measured
        elapsed = time.perf_counter() - self._fit_started
        text = recommendation(
            slowest.step_seconds, ratio * slowest.step_seconds, fragments=engine.stats.fragments,
            wait_fraction=(engine.stats.wait_seconds - self._wait_at_start) / elapsed if elapsed > 0 else None,
            max_sync_every=engine.schedule.max_sync_every,
            compressed=engine.comm_dtype in (torch.float16, torch.bfloat16),
        )  # fmt: skip
        rank_zero_info(text)

    @staticmethod
    def _write(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=logging_step(trainer))

    def _metrics(self, trainer: L.Trainer, stats: EngineStats | None, step: int) -> dict[str, float]:
        assert self._last is not None
        now = time.perf_counter()
        rounds0, timed0, wait0, comm0, stale0, step0, time0, samples0 = self._last
        elapsed = max(now - time0, 1e-9)
        metrics = {
            "hpsgd/step_ms": 1000 * elapsed / max(1, step - step0),
            "hpsgd/samples_per_s": (self._samples - samples0) * trainer.world_size / elapsed,
            "time/wall_s": now - self._fit_started,
        }
        self._last = self._snapshot(stats, step, now)
        if stats is None:
            return metrics
        new_rounds = stats.overlapped_rounds - rounds0
        # On CUDA the times of a round are read from its events a round or two after its merge: divide the times
        # by the rounds they cover, not by the rounds merged.
        new_timed = stats.timed_rounds - timed0
        wait_ms = 1000 * (stats.wait_seconds - wait0) / max(1, new_timed)
        comm_ms = 1000 * (stats.comm_seconds - comm0) / max(1, new_timed)
        drift = float("nan") if stats.last_drift is None else float(stats.last_drift)
        # Each rank's wait is part of its own communication time, so the share it waited is taken per rank.
        waited_share = wait_ms / comm_ms if comm_ms > 0 else 0.0
        # One all-reduce for the values that differ across ranks: the worst rank's wait, drift and waited share.
        local = torch.tensor([wait_ms, drift, waited_share], dtype=torch.float64, device=trainer.strategy.root_device)
        worst = trainer.strategy.reduce(local, reduce_op="max")
        wait_ms, drift, waited_share = (float(v) for v in worst.cpu())
        metrics["hpsgd/bytes"] = float(stats.bytes_per_round)
        metrics["hpsgd/rounds"] = float(stats.rounds)
        metrics["hpsgd/sync_every"] = float(_engine(trainer).sync_every)
        metrics["hpsgd/sync_delay"] = float(_engine(trainer).sync_delay)
        if stats.fragments > 1:
            for f, (wait_s, comm_s) in enumerate(zip(stats.fragment_wait_seconds, stats.fragment_comm_seconds)):
                if comm_s is not None and wait_s is not None:  # timed at least once
                    metrics[f"hpsgd/comm_ms/f{f}"] = 1000 * comm_s
                    metrics[f"hpsgd/wait_ms/f{f}"] = 1000 * wait_s
        if new_timed:  # no round was timed yet in this interval: nothing to say about comm and wait
            metrics["hpsgd/comm_ms"] = comm_ms
            metrics["hpsgd/wait_ms"] = wait_ms
            # A wait longer than the all-reduce (the thread that waits was not scheduled at once, on a loaded
            # machine) hid nothing: 0, not a negative share.
            metrics["hpsgd/hidden"] = max(0.0, 1.0 - waited_share)
        if new_rounds:
            metrics["hpsgd/staleness"] = (stats.staleness_steps - stale0) / new_rounds
        if self.drift and stats.last_drift is not None:
            metrics["hpsgd/drift"] = drift
        return metrics

    def _snapshot(
        self, stats: EngineStats | None, step: int, now: float | None = None
    ) -> tuple[int, int, float, float, int, int, float, int]:
        now = time.perf_counter() if now is None else now
        if stats is None:
            return (0, 0, 0.0, 0.0, 0, step, now, self._samples)
        return (stats.overlapped_rounds, stats.timed_rounds, stats.wait_seconds, stats.comm_seconds,
                stats.staleness_steps, step, now, self._samples)  # fmt: skip


def describe_strategy(trainer: L.Trainer) -> dict[str, Any]:
    """The strategy's name and options, and the world it runs on, as a run config: ``{"name": "hpsgd", ...}``.

    ``HPSGDStrategy`` gives its own options; Lightning's DDP is named ``ddp``, or ``localsgd`` with post-local SGD
    model averaging (and its period).
    """
    strategy = trainer.strategy
    out: dict[str, Any] = {"name": type(strategy).__name__}
    hyperparameters = getattr(strategy, "hyperparameters", None)
    if isinstance(hyperparameters, dict):
        out.update(hyperparameters)
    elif isinstance(strategy, DDPStrategy):
        period = getattr(strategy, "_model_averaging_period", None)
        out["name"] = "ddp" if period is None else "localsgd"
        if period is not None:
            out["model_averaging_period"] = period
        out["process_group_backend"] = strategy.process_group_backend
    elif isinstance(strategy, SingleDeviceStrategy):
        out["name"] = "single_device"
    out.update(world_size=trainer.world_size, num_nodes=trainer.num_nodes, devices_per_node=trainer.num_devices)
    return out


def _lightning_logs_now(trainer: L.Trainer) -> bool:
    """Whether Lightning logs its training metrics after this batch (its own rule, ``log_every_n_steps``)."""
    every = trainer.log_every_n_steps
    return bool(every) and ((logging_step(trainer) + 1) % every == 0 or trainer.should_stop)


def _engine(trainer: L.Trainer):
    return getattr(trainer.strategy, "engine", None)


def _stats(trainer: L.Trainer) -> EngineStats | None:
    engine = _engine(trainer)
    return engine.stats if engine is not None else None


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (0 if it has none)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0]) if batch else 0
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values()))) if batch else 0
    return 0
