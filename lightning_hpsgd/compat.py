"""Everything HPSGD takes from Lightning's internals, in one place.

Lightning has no public hook for three things HPSGD must change during ``fit``, so [`StopPatches`][] patches
them on the Trainer's own objects (instance attributes, removed together at teardown):

* ``fit_loop.epoch_loop._broadcast_sigterm_tensor``: Lightning broadcasts rank 0's SIGTERM flag before **every**
  batch, a blocking collective that makes each rank wait for the others and queues behind HPSGD's in-flight
  all-reduce on a slow link. The replacement broadcasts nothing; it raises ``SIGTERMException`` once the ranks have
  agreed on a stop through HPSGD's side channel. It is also the only place before the next batch is fetched, so the
  preemption checkpoint resumes at the right batch (a public ``on_train_batch_start`` hook runs after the fetch).
* ``trainer._signal_connector._sigterm_notifier_fn``: Lightning's SIGTERM handler broadcasts too (from a signal
  handler, so it can pair with any other collective). The replacement records the request for the next round.
* ``Timer._check_time_remaining`` of a ``Timer`` with ``interval="step"`` (``Trainer(max_time=...)``): it
  broadcasts rank 0's verdict after every batch. The replacement asks through the side channel. A ``Timer`` with
  ``interval="epoch"`` keeps Lightning's own check: one broadcast per epoch costs nothing, and it stops at the epoch
  Lightning would.

It also holds the private helpers HPSGD imports, and the spawn launcher that carries the engine's counters back to
the launching process. [`missing`][] lists what a Lightning release no longer has; the test suite fails on it by
name, and at run time [`StopPatches`][] warns and leaves Lightning's behaviour in place.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.strategies.launchers.multiprocessing import (
    _MultiProcessingLauncher as _FabricMultiProcessingLauncher,
)
from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

log = logging.getLogger(__name__)

__all__ = [
    "BackwardSyncControl",
    "FlushingMultiProcessingLauncher",
    "FlushingScriptLauncher",
    "PathLike",
    "StatsCarryingLauncher",
    "StopPatches",
    "default_pg_timeout",
    "lightning_time_check",
    "logging_step",
    "mark_sigterm",
    "missing",
    "optimizers_to_device",
    "StrategyRegistry",
    "sync_module_states",
    "timer_is_verbose",
    "timer_limit_reached",
]

StrategyRegistry = _StrategyRegistry
BackwardSyncControl = _BackwardSyncControl  # Fabric's base for ``no_backward_sync``
PathLike = _PATH
optimizers_to_device = _optimizers_to_device
sync_module_states = _sync_module_states

# (owner, attribute, what HPSGD does with it): methods, looked up on the class, and attributes that Lightning's
# objects set on themselves, looked up on an instance.
_METHODS: tuple[tuple[type, str, str], ...] = (
    (_TrainingEpochLoop, "_broadcast_sigterm_tensor", "replaced: no SIGTERM broadcast before every batch"),
    (_SignalConnector, "_sigterm_notifier_fn", "replaced: the SIGTERM handler records a request, no broadcast"),
    (Timer, "_check_time_remaining", "replaced: the time limit travels in HPSGD's side channel"),
    (_MultiProcessingLauncher, "get_extra_results", "extended: the engine's counters go back to the parent"),
    (_MultiProcessingLauncher, "update_main_process_results", "extended: the parent receives them"),
)
_ATTRIBUTES: tuple[tuple[type, str, str], ...] = (
    (_TrainingEpochLoop, "_batches_that_stepped", "read: the step HPSGDMonitor logs at"),
    (_SignalConnector, "received_sigterm", "set: Lightning's own single-process SIGTERM stop"),
    (Timer, "_interval", "read: only step-interval timers are replaced"),
    (Timer, "_duration", "read: the time limit"),
    (Timer, "_verbose", "read: whether to print that the limit was reached"),
)


def missing(trainer: Trainer | None = None, timer: Timer | None = None) -> list[str]:
    """What HPSGD relies on that this Lightning release lacks, one line each (empty when all is there).

    Args:
        trainer: a Trainer whose loop and signal connector are checked for the attributes Lightning sets on them.
        timer: a ``Timer`` checked the same way.
    """
    absent = [_name(owner, name, use) for owner, name, use in _METHODS if not callable(getattr(owner, name, None))]
    instances: dict[type, object] = {}
    if trainer is not None:
        instances[_TrainingEpochLoop] = trainer.fit_loop.epoch_loop
        instances[_SignalConnector] = trainer._signal_connector
    if timer is not None:
        instances[Timer] = timer
    for owner, name, use in _ATTRIBUTES:
        if owner in instances and not hasattr(instances[owner], name):
            absent.append(_name(owner, name, use))
    return absent


def _name(owner: type, name: str, use: str) -> str:
    return f"{owner.__module__}.{owner.__qualname__}.{name} ({use})"


def mark_sigterm(trainer: Trainer) -> None:
    """Set the flag Lightning's training loop reads to stop after the current batch (its single-process path)."""
    trainer._signal_connector.received_sigterm = True


def logging_step(trainer: Trainer) -> int:
    """The step Lightning's own training metrics are logged at (``_batches_that_stepped``)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def lightning_time_check(timer: Timer, trainer: Trainer) -> None:
    """Lightning's own per-batch check of a ``Timer`` (a broadcast of rank 0's verdict)."""
    Timer._check_time_remaining(timer, trainer)


def timer_is_verbose(timer: Timer) -> bool:
    """Whether the ``Timer`` prints that its limit was reached."""
    return bool(timer._verbose)


def timer_limit_reached(timer: Timer) -> bool:
    """Whether a ``Timer``'s duration has elapsed (on this rank's clock)."""
    return timer._duration is not None and timer.time_elapsed() >= timer._duration


class StopPatches:
    """The three per-batch collectives of Lightning's stop logic, replaced by HPSGD's side channel during ``fit``.

    Args:
        trainer: the Trainer whose objects are patched (instance attributes only; classes are untouched).
        raise_if_stopping: called where Lightning broadcast the SIGTERM flag, before each batch is fetched.
        on_sigterm: the SIGTERM handler.
        check_time: ``(timer, trainer)``, called where a step-interval ``Timer`` checked its limit.
    """

    def __init__(
        self,
        trainer: Trainer,
        raise_if_stopping: Callable[[], None],
        on_sigterm: Callable[[Any, Any], None],
        check_time: Callable[[Timer, Trainer], None],
    ) -> None:
        self._patched: list[tuple[object, str]] = []
        timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
        absent = missing(trainer, *timers[:1])
        if absent:
            rank_zero_warn(
                "HPSGD: this Lightning release lacks what HPSGD patches to keep Lightning's per-batch collectives off"
                f" the training path: {'; '.join(absent)}. Training is correct, but every batch waits for a broadcast."
                " Install the Lightning version lightning-hpsgd supports (see its pyproject.toml)."
            )
            return
        self._set(trainer.fit_loop.epoch_loop, "_broadcast_sigterm_tensor", raise_if_stopping)
        # Registered after the strategy's setup, so Lightning's handler list takes this instance attribute.
        self._set(trainer._signal_connector, "_sigterm_notifier_fn", on_sigterm)
        for callback in trainer.callbacks:
            if isinstance(callback, Timer) and callback._interval == "step":
                self._set(callback, "_check_time_remaining", functools.partial(check_time, callback))

    def _set(self, owner: object, name: str, value: Any) -> None:
        setattr(owner, name, value)
        self._patched.append((owner, name))
        log.debug("HPSGD: patched %s.%s", type(owner).__name__, name)

    def remove(self) -> None:
        """Give Lightning its own methods back."""
        for owner, name in self._patched:
            owner.__dict__.pop(name, None)
        self._patched = []


class StatsCarryingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher, which also carries the strategy's engine counters back to the parent, so
    ``trainer.strategy.stats`` is set in the launching process after ``fit`` as with the ``popen`` launcher."""

    def get_extra_results(self, trainer: Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        stats = getattr(trainer.strategy, "stats", None)
        extra["hpsgd_stats"] = stats.to_dict() if stats is not None else None
        return extra

    def update_main_process_results(self, trainer: Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        receive = getattr(trainer.strategy, "receive_stats", None)
        if receive is not None and extra.get("hpsgd_stats") is not None:
            receive(extra["hpsgd_stats"])


class _ThenFlush:
    """The function ``fabric.launch(function)`` runs, followed by a flush of the Fabric strategy that set it up: the
    end of the launched function is Fabric's teardown point, and what it returns (the model, for a spawn or fork
    launch) is the global model. An exception skips the flush, as a collective after an error could wait forever."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self.function(*args, **kwargs)
        fabric = args[0] if args else None  # Fabric passes itself first to the function it launches
        flush = getattr(getattr(fabric, "strategy", None), "flush", None)
        if flush is not None:
            flush("end of fabric.launch")
        return output


class FlushingScriptLauncher(_SubprocessScriptLauncher):
    """Fabric's ``popen`` launcher (also the one under torchrun and SLURM), whose launched function ends in a
    flush."""

    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return super().launch(_ThenFlush(function), *args, **kwargs)


class FlushingMultiProcessingLauncher(_FabricMultiProcessingLauncher):
    """Fabric's spawn/fork launcher, whose launched function ends in a flush in every process."""

    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return super().launch(_ThenFlush(function), *args, **kwargs)
