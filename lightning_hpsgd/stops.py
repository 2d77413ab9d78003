"""How an HPSGD run ends early: every rank at the same step, or, after an error, without another collective.

* SIGTERM (a scheduler preempting a rank): the request travels in the next round's side channel, and every rank
  stops before the same batch, flushes, and raises Lightning's ``SIGTERMException`` (so ``OnExceptionCheckpoint``
  writes a checkpoint at a flush point).
* A step-interval ``Timer`` (``Trainer(max_time=...)``): each rank checks its own clock and a rank past the limit
  asks the others the same way; every rank then finishes after the same step.
* Any other exception: the engine is abandoned, with no collective (the error may have hit one rank only), and
  Lightning's barriers no longer block.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_hpsgd import compat
from lightning_hpsgd.engine import HPSGDEngine
from lightning_hpsgd.side_channel import StopRequest

log = logging.getLogger(__name__)

__all__ = ["StopCoordinator"]


class StopCoordinator:
    """Agrees on stops through the engine's side channel, and abandons the engine after any other exception.

    Args:
        engine: the current fit's engine, or ``None`` (called each time: the engine changes from fit to fit).
        trainer: the Trainer.
        rank: this rank's global rank (for messages).
        world_size: the number of ranks.
        kill_children: passes a signal on to the launcher's child processes, as Lightning's own handler does.
        flush: flushes every rank (at an agreed stop).
        forget_groups: leaves the run's process groups to the OS (their work may never finish).
    """

    def __init__(
        self,
        engine: Callable[[], HPSGDEngine | None],
        trainer: Trainer,
        *,
        rank: int,
        world_size: int,
        kill_children: Callable[[Any], None],
        flush: Callable[[str], None],
        forget_groups: Callable[[], None],
    ) -> None:
        self._engine, self._trainer, self._rank, self._world_size = engine, trainer, rank, world_size
        self._kill_children, self._flush, self._forget_groups = kill_children, flush, forget_groups
        self.abandoned = False
        self._handled = False
        self._patches = compat.StopPatches(trainer, self._raise_if_stopping, self._on_sigterm, self._check_time)

    def remove(self) -> None:
        """Give Lightning its own stop logic back (at teardown)."""
        self._patches.remove()

    def stop_or_abandon(self, exception: BaseException) -> None:
        """An agreed stop flushes (every rank is at the same batch boundary); anything else abandons. Once."""
        if self._handled:
            return
        self._handled = True
        engine = self._engine()
        agreed = (
            isinstance(exception, SIGTERMException)
            and engine is not None
            and not engine.aborted
            and bool(engine.stop_requested & StopRequest.ABORT)
        )
        if agreed:
            self._flush("agreed stop")
        else:
            self._abandon(exception)

    def _abandon(self, exception: BaseException) -> None:
        self.abandoned = True
        self._forget_groups()
        engine = self._engine()
        if engine is None or engine.aborted:
            return
        engine.abandon()
        # Every rank speaks here: the exception may have hit any one of them.
        warnings.warn(
            f"HPSGD (rank {self._rank}): training stopped with {type(exception).__name__} after optimizer step"
            f" {self._trainer.global_step}. Replicas were not flushed (a collective after an error can hang), so"
            " local progress since the last flush point is not in the global model. Resume from the last checkpoint.",
            stacklevel=2,
        )

    def _raise_if_stopping(self) -> None:
        """Before each batch is fetched (where Lightning broadcast the SIGTERM flag): stop if the ranks agreed."""
        engine = self._engine()
        if engine is not None and engine.stop_requested & StopRequest.ABORT:
            log.warning(
                f"HPSGD (rank {self._rank}): a rank received SIGTERM; every rank stops after optimizer step"
                f" {self._trainer.global_step}."
            )
            compat.mark_sigterm(self._trainer)
            raise SIGTERMException()

    def _on_sigterm(self, signum: Any, frame: Any) -> None:
        log.info(f"HPSGD (rank {self._rank}): received SIGTERM")
        engine = self._engine()
        if engine is None or not engine.stop_sent & StopRequest.ABORT:
            self._kill_children(signum)
        if engine is None or engine.aborted or self._world_size == 1:
            # No round carries it (or nobody to agree with): Lightning's own stop after the current batch.
            compat.mark_sigterm(self._trainer)
        if engine is not None and not engine.aborted:
            engine.request_stop(StopRequest.ABORT)

    def _check_time(self, timer: Timer, trainer: Trainer) -> None:
        """``Trainer(max_time=...)``: the time limit agreed in the side channel, not by a broadcast every batch.

        Each rank checks its own clock, and a rank past the limit asks the others through the next round; every
        rank then stops after the same step, up to two rounds past the limit.
        """
        engine = self._engine()
        if engine is None or engine.aborted:
            compat.lightning_time_check(timer, trainer)
            return
        if compat.timer_limit_reached(timer):
            engine.request_stop(StopRequest.FINISH)
        if engine.stop_requested & StopRequest.FINISH and not trainer.should_stop:
            trainer.should_stop = True
            if compat.timer_is_verbose(timer):
                elapsed = timedelta(seconds=int(timer.time_elapsed()))
                rank_zero_info(f"Time limit reached. Elapsed time is {elapsed}. Signaling Trainer to stop.")
