"""The rounds in flight: each fragment's wire, the round it launched and has not merged yet (``P``), and the side
channels to check at a merge, the merged round's own or (``defer``) the one deferred at the previous merge."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hpsgd.wire import NodeGroups, Round, Wire

__all__ = ["Rounds", "SideChannelRead"]

# (fragment, side-channel values, whether the merged sum is finite, whether it was already merged into G)
SideChannelRead = tuple[int, list[int], bool, bool]


class Rounds:
    """One [`Wire`][lightning_hpsgd.wire.Wire] per fragment and the round each has in flight.

    Args:
        ranges: the fragments' ``[begin, end)`` ranges of the flat layout.
        dtype: ``G``'s dtype.
        device: where the wires live.
        comm_dtype, group, nodes, timeout: as [`Wire`][lightning_hpsgd.wire.Wire] takes them.
    """

    def __init__(
        self,
        ranges: Sequence[tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
        *,
        comm_dtype: torch.dtype | None,
        group: dist.ProcessGroup | None,
        nodes: NodeGroups | None,
        timeout: timedelta | None,
    ) -> None:
        self.wires = [Wire(end - begin, dtype, device, comm_dtype=comm_dtype, group=group, nodes=nodes,
                           timeout=timeout) for begin, end in ranges]  # fmt: skip
        self.in_flight: list[Round | None] = [None] * len(self.wires)
        self.steps = 0  # optimizer steps counted
        self._launched_after = [0] * len(self.wires)  # the count at each fragment's last launch
        self.deferred: Round | None = None  # merged; its side channel is read at the next merge
        self.abandoned: list[Round] = []  # kept alive: the backend may still write into their buffers

    def count_step(self) -> None:
        """One optimizer step was taken: it belongs to the next round of every fragment."""
        self.steps += 1

    def due(self, step: int) -> bool:
        """Whether a round in flight is to be merged at ``step``."""
        return any(rnd is not None and rnd.merge_at <= step for rnd in self.in_flight)

    def launch(self, f: int, delta: Tensor, slot: dict, *, step: int, is_flush: bool, merge_at: int) -> Round:
        """Start fragment ``f``'s all-reduce of ``delta`` with this rank's side-channel ``slot``."""
        steps = self.steps - self._launched_after[f]  # optimizer steps in the round
        rnd = self.wires[f].launch(delta, slot, step=step, is_flush=is_flush, steps=steps)
        rnd.fragment, rnd.merge_at = f, merge_at
        self._launched_after[f] = self.steps
        self.in_flight[f] = rnd
        return rnd

    def finish(self, f: int, defer: bool) -> tuple[Round | None, float, list[SideChannelRead]]:
        """Wait for fragment ``f``'s round in flight, if any. Returns it, the host seconds waited, and the side
        channels to check now: the round deferred at the previous merge, then this one's unless ``defer`` (then
        copied to the host without blocking, for the next merge). Raises the backend's ``RuntimeError`` if a peer
        failed or the timeout passed."""
        pending, self.in_flight[f] = self.in_flight[f], None
        if pending is None:
            return None, 0.0, self._take_deferred()
        wire = self.wires[f]
        waited = wire.finish(pending)
        reads = self._take_deferred()
        if defer:
            wire.snapshot()
            self.deferred = pending
        else:
            reads.append((f, [int(v) for v in wire.meta.tolist()], wire.sum_is_finite(), False))
        return pending, waited, reads

    def _take_deferred(self) -> list[SideChannelRead]:
        deferred, self.deferred = self.deferred, None
        if deferred is None:
            return []
        return [(deferred.fragment, *self.wires[deferred.fragment].read_snapshot(), True)]

    def abandon(self) -> None:
        """Drop every round in flight without waiting (their buffers stay alive)."""
        self.abandoned += [rnd for rnd in self.in_flight if rnd is not None]
        self.in_flight = [None] * len(self.in_flight)

    @property
    def pending(self) -> Round | None:
        """The earliest-launched round in flight, or ``None``."""
        rounds = [rnd for rnd in self.in_flight if rnd is not None]
        return min(rounds, key=lambda rnd: rnd.step) if rounds else None

    @property
    def bytes_per_round(self) -> int:
        """Payload bytes this rank sends in one round of every fragment."""
        return sum(wire.bytes_per_round for wire in self.wires)
