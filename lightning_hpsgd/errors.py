"""The errors HPSGD raises on every rank at once, so that no rank waits for a peer that has already given up."""

from __future__ import annotations

__all__ = [
    "HPSGDCommunicationError",
    "HPSGDError",
    "HPSGDReentryError",
    "NonFiniteUpdateError",
    "RanksDivergedError",
    "RanksOutOfStepError",
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
