"""The errors HPSGD raises on every rank at once, so that no rank waits for a peer that has already given up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "HPSGDCommunicationError",
    "HPSGDError",
    "HPSGDReentryError",
    "NonFiniteUpdateError",
    "RanksDivergedError",
    "RanksOutOfStepError",
    "SectionGuard",
]


class HPSGDError(RuntimeError):
    """Base class of the errors the HPSGD engine raises on every rank at once."""


class NonFiniteUpdateError(HPSGDError):
    """A worker's change Δ held NaN or inf."""


class RanksOutOfStepError(HPSGDError):
    """Ranks reached an HPSGD collective at different optimizer steps (their step counts diverged)."""


class RanksDivergedError(HPSGDError):
    """Right after a flush, a tensor the engine averages was not bit-identical on every rank."""


class HPSGDCommunicationError(HPSGDError):
    """An HPSGD collective failed: a peer died, hung past the timeout, or the network broke."""


class HPSGDReentryError(HPSGDError):
    """The engine was entered again while a sync point or flush was running (e.g. from a signal handler)."""


def communication_error(what: str, rank: int, err: BaseException) -> HPSGDCommunicationError:
    """The one message for a collective that failed on this rank."""
    return HPSGDCommunicationError(
        f"HPSGD: {what} failed on rank {rank}: {err}. A peer process probably died, hung past the process group"
        " timeout, or lost its network. Check the other ranks' logs; resume from the last checkpoint."
    )


class SectionGuard:
    """One sync point, flush or rebuild at a time on a rank, and none once the engine gave up (``aborted``).

    A section entered again while one runs (from a signal handler) cannot be agreed on by the ranks: it raises
    [`HPSGDReentryError`][lightning_hpsgd.errors.HPSGDReentryError] and aborts.
    """

    def __init__(self) -> None:
        self.aborted = False
        self._busy = False

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        """Run the section named ``what`` (a "sync point", "flush" or "rebuild")."""
        if self.aborted:
            raise HPSGDError("HPSGD: this engine was abandoned after an error; create a new one to train again.")
        if self._busy:
            self.aborted = True
            raise HPSGDReentryError(
                f"HPSGD: a {what} was requested while another sync point or flush was running on this rank, most"
                " likely from a signal handler (e.g. SLURM auto-requeue saving a checkpoint). Ranks cannot agree"
                " on such a point; save checkpoints from training hooks, or disable auto-requeue"
                " (SLURMEnvironment(auto_requeue=False))."
            )
        self._busy = True
        try:
            yield
        finally:
            self._busy = False
