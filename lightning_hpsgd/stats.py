"""What the engine measured, as plain counters a logger can read."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["EngineStats", "IntervalMetrics"]


@dataclass
class EngineStats:
    """What the engine measured; the figures grow over a run.

    Attributes:
        rounds: all-reduces merged (sync points and flushes).
        flushes: blocking all-reduces run by ``flush``.
        overlapped_rounds: rounds merged at a sync point, i.e. launched at one sync point and merged at the next.
        timed_rounds: overlapped rounds whose wait and communication times are in the sums below. On CUDA the
            times are read from events once they have completed, so this may trail ``overlapped_rounds`` by a
            round or two; on CPU it equals it.
        wait_seconds: seconds that training waited at sync points for the pending all-reduce (host time with
            gloo; on CUDA, the time the compute stream stalled on the communication stream).
        comm_seconds: seconds from each launch to the completion of the all-reduce (gloo: the backend's completion
            callback; NCCL: events on the communication stream around the all-reduce and the stream's wait for it).
        staleness_steps: optimizer steps between each launch and its merge.
        last_wait_seconds, last_comm_seconds: the same, for the latest timed round.
        last_staleness_steps: the same, for the latest overlapped round.
        last_drift: ``‖R − G‖ / ‖G‖`` just before the merge, at the latest sync point that measured it (see
            [`HPSGDEngine.request_drift`][lightning_hpsgd.engine.HPSGDEngine.request_drift]), or ``None``. A 0-d
            tensor on the engine's device, so reading it is the only host sync it costs.
        bytes_per_round: payload bytes one rank puts on the HPSGD all-reduce per round (with
            ``hierarchy="node"``: its ``1/L`` share of the model, on the group across nodes).
        bytes_sent: the payload bytes of every all-reduce this rank launched, summed (the side channel excluded).
        promoted: frozen tensors found changed at a flush, and averaged in every round since.
        sync_every: ``H`` of the current round (with ``sync_every="auto"``, the latest agreed value).
        sync_delay: ``τ``, steps from a round's launch to its merge, for a round launched now (with
            ``sync_delay="auto"``, the latest agreed value).
        fragments: ``F``, the parts of the model whose rounds are launched at different steps.
        fragment_wait_seconds, fragment_comm_seconds: the wait and communication seconds of each fragment's
            latest timed round (``None`` for a fragment not timed yet).
    """

    rounds: int = 0
    flushes: int = 0
    overlapped_rounds: int = 0
    timed_rounds: int = 0
    wait_seconds: float = 0.0
    comm_seconds: float = 0.0
    staleness_steps: int = 0
    last_wait_seconds: float = 0.0
    last_comm_seconds: float = 0.0
    last_staleness_steps: int = 0
    last_drift: Tensor | None = None
    bytes_per_round: int = 0
    bytes_sent: int = 0
    promoted: int = 0
    sync_every: int = 0
    sync_delay: int = 0
    fragments: int = 1
    fragment_wait_seconds: list[float | None] = field(default_factory=list)
    fragment_comm_seconds: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The counters as plain Python values (``last_drift`` as a float or ``None``)."""
        out = asdict(self)
        out["last_drift"] = None if self.last_drift is None else float(self.last_drift)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EngineStats:
        """The inverse of [`to_dict`][lightning_hpsgd.stats.EngineStats.to_dict]; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        stats = cls(**{k: v for k, v in values.items() if k in known})
        if stats.last_drift is not None:
            stats.last_drift = torch.tensor(float(stats.last_drift))
        return stats

    def add_staleness(self, steps: int) -> None:
        """Count one overlapped round, merged ``steps`` optimizer steps after its launch."""
        self.overlapped_rounds += 1
        self.last_staleness_steps = steps
        self.staleness_steps += steps

    def add_timing(self, wait_seconds: float, comm_seconds: float, fragment: int = 0) -> None:
        """Count one timed round (of ``fragment``)."""
        for per_fragment, value in ((self.fragment_wait_seconds, wait_seconds),
                                    (self.fragment_comm_seconds, comm_seconds)):  # fmt: skip
            per_fragment.extend([None] * (max(self.fragments, fragment + 1) - len(per_fragment)))
            per_fragment[fragment] = value
        self.timed_rounds += 1
        self.last_wait_seconds = wait_seconds
        self.last_comm_seconds = comm_seconds
        self.wait_seconds += wait_seconds
        self.comm_seconds += comm_seconds


class IntervalMetrics:
    """``hpsgd/*`` metrics of one rank between two reads of its [`EngineStats`][lightning_hpsgd.stats.EngineStats]
    (no collective): the figures a loop logs every few iterations."""

    def __init__(self) -> None:
        self._last: tuple[int, int, float, float, int, int, float] | None = None

    def read(self, stats: EngineStats | None, steps: int) -> dict[str, float]:
        """The metrics since the previous read (since the first one: the totals so far).

        Args:
            stats: the engine's counters (``None`` before setup: no metrics).
            steps: iterations ended so far, for ``hpsgd/step_ms``.
        """
        now = time.perf_counter()
        if stats is None:
            return {}
        last = self._last or (0, 0, 0.0, 0.0, 0, steps, now)
        rounds0, timed0, wait0, comm0, stale0, steps0, time0 = last
        self._last = (stats.overlapped_rounds, stats.timed_rounds, stats.wait_seconds, stats.comm_seconds,
                      stats.staleness_steps, steps, now)  # fmt: skip
        metrics = {
            "hpsgd/rounds": float(stats.rounds),
            "hpsgd/flushes": float(stats.flushes),
            "hpsgd/sync_every": float(stats.sync_every),
            "hpsgd/sync_delay": float(stats.sync_delay),
            "hpsgd/bytes": float(stats.bytes_per_round),
        }
        if steps > steps0:
            metrics["hpsgd/step_ms"] = 1000 * (now - time0) / (steps - steps0)
        if timed := stats.timed_rounds - timed0:
            comm_ms = 1000 * (stats.comm_seconds - comm0) / timed
            metrics["hpsgd/comm_ms"] = comm_ms
            metrics["hpsgd/wait_ms"] = wait_ms = 1000 * (stats.wait_seconds - wait0) / timed
            metrics["hpsgd/hidden"] = max(0.0, 1.0 - wait_ms / comm_ms) if comm_ms > 0 else 1.0
        if merged := stats.overlapped_rounds - rounds0:
            metrics["hpsgd/staleness"] = (stats.staleness_steps - stale0) / merged
        return metrics
