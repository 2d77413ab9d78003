"""The wire: a round's ``Δ`` and side channel in one preallocated buffer, its all-reduce started without blocking,
finished at a named point later, and timed. Flat (every rank a worker) or node-sharded (``hierarchy="node"``: each
rank sends its ``1/L`` share across nodes and the node all-gathers the merged shares)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hpsgd import side_channel

__all__ = ["NodeGroups", "Round", "Wire"]


@dataclass(frozen=True)
class NodeGroups:
    """This rank's process groups for ``hierarchy="node"`` (made by [`lightning_hpsgd.process_groups.node_groups`][]).

    Attributes:
        node: the ranks of this rank's node (``local_size`` of them), or ``None`` when a node has one device.
        across: the ranks with this rank's local rank on every node (``num_nodes`` of them): the slow link.
        local_rank: this rank's index among its node's ranks.
        local_size: ``L``, devices (ranks) per node; the same on every node.
        num_nodes: ``N``.
    """

    node: dist.ProcessGroup | None
    across: dist.ProcessGroup
    local_rank: int
    local_size: int
    num_nodes: int

    def check(self, world_size: int) -> None:
        """Raise unless ``num_nodes`` nodes of ``local_size`` ranks make ``world_size`` ranks."""
        if self.local_size * self.num_nodes != world_size:
            raise ValueError(
                f"HPSGD: {self.num_nodes} nodes of {self.local_size} ranks do not make the group's {world_size} ranks."
            )


@dataclass
class Round:
    """An all-reduce launched at the end of the round that ended at step ``step``."""

    step: int
    is_flush: bool
    works: tuple[dist.Work, ...]
    launched_at: float
    steps: int  # optimizer steps in the round (the same on every rank): 0 for a flush right after a flush
    # NCCL: CUDA events around the all-reduce on the communication stream, the end one recorded after the stream
    # waited for NCCL's own stream, so that they time the all-reduce itself (the host never sees its completion).
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
    # Set by the backend's completion callback (gloo). A one-element list, so that the callback holds only this
    # list: one that held the round (and so the works) would make a reference cycle through C++ that Python never
    # frees, and gloo's threads would then destroy the work, and its tensors, during interpreter shutdown.
    completion: list[float] = field(default_factory=list)
    fragment: int = 0  # which fragment of the model the round carries
    merge_at: int = 0  # the step at which the round is merged (its launch step + sync_delay)


class Wire:
    """Buffers, groups and stream of one rank's rounds.

    Args:
        numel: elements of the flat ``Δ`` (the whole model's averaged tensors).
        dtype: ``G``'s dtype (fp32 or wider). A narrower ``comm_dtype`` compresses: the wire then carries ``Δ / W``
            (so the sum cannot overflow where the mean would not) and the side channel in a separate int64
            all-reduce; a full-precision wire carries ``Δ`` and the side channel in its tail (exact integers), so
            a round is a single all-reduce.
        device: where the buffers live.
        comm_dtype: the wire's dtype, or ``None`` for ``dtype``.
        group: every rank (``world_size`` slots in the side channel).
        nodes: ``hierarchy="node"``: the node's groups; ``None``: flat.
        timeout: gloo: the longest [`finish`][] waits before the backend raises (NCCL: its watchdog's).
    """

    def __init__(
        self,
        numel: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        comm_dtype: torch.dtype | None,
        group: dist.ProcessGroup | None,
        nodes: NodeGroups | None,
        timeout: timedelta | None,
    ) -> None:
        wire_dtype = comm_dtype or dtype
        self.compressed = torch.finfo(wire_dtype).bits < torch.finfo(dtype).bits
        self.dtype = wire_dtype if self.compressed else dtype
        self.accumulation_dtype = dtype
        world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_workers = nodes.num_nodes if nodes is not None else world_size
        self.merge_scale = 1.0 if self.compressed else 1.0 / self.num_workers  # ḡ = merge_scale * payload
        self._group = nodes.across if nodes is not None else group
        self._node_group = nodes.node if nodes is not None else None
        self._timeout = timeout
        self._nccl_like = device.type == "cuda" and dist.get_backend(group) != "gloo"
        self._comm_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.device = device
        local_size = nodes.local_size if nodes is not None else 1
        local_rank = nodes.local_rank if nodes is not None else 0
        share = -(-numel // local_size)
        self.share_range = (min(local_rank * share, numel), min((local_rank + 1) * share, numel))
        self._packed = not self.compressed
        tail = side_channel.size(world_size)
        self._wire = torch.zeros(share + (tail if self._packed else 0), dtype=self.dtype, device=device)
        self._share = self._wire[:share]
        self._wire_meta = self._wire[share:] if self._packed else torch.zeros(tail, dtype=torch.int64, device=device)
        if self._node_group is not None:
            self._gathered = torch.zeros(local_size, share, dtype=self.dtype, device=device)
            self.payload = self._gathered.view(-1)[:numel]
            self._gathered_meta = torch.zeros(local_size, tail, dtype=self._wire_meta.dtype, device=device)
            self.meta = torch.zeros(tail, dtype=self._wire_meta.dtype, device=device)
        else:
            self.payload = self._share
            self.meta = self._wire_meta
        pin = device.type == "cuda"
        self._meta_host = torch.zeros(tail, dtype=self.meta.dtype, pin_memory=pin)
        self._finite_host = torch.ones((), dtype=torch.bool, pin_memory=pin)
        self._snapshot_ready: torch.cuda.Event | None = None
        self.bytes_per_round = self._share.numel() * self._share.element_size()
        # NCCL rounds whose events have not completed: (comm events, wait events).
        self._timings: deque[tuple[tuple[torch.cuda.Event, ...], tuple[torch.cuda.Event, ...]]] = deque()
        self._wait_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's wire buffers (the node's gathered shares included)."""
        buffers = [self._wire] + ([self._gathered] if self._node_group is not None else [])
        return sum(b.numel() * b.element_size() for b in buffers)

    def launch(self, delta: Tensor, slot: dict, *, step: int, is_flush: bool, steps: int) -> Round:
        """Copy this rank's share of the flat ``delta`` and its side-channel ``slot`` (the keyword arguments of
        [`side_channel.encode`][lightning_hpsgd.side_channel.encode]) to the wire; start the all-reduce."""
        begin, end = self.share_range
        share = self._share[: end - begin]
        if self.compressed:
            torch.mul(delta[begin:end], 1.0 / self.num_workers, out=share)
        else:
            share.copy_(delta[begin:end])
        non_finite = torch.logical_not(torch.isfinite(share.sum(dtype=self.accumulation_dtype)))
        side_channel.encode(self._wire_meta, self.rank, step=step, is_flush=is_flush, non_finite=non_finite, **slot)
        events = None
        stream_ctx = nullcontext()
        if self._comm_stream is not None:
            # The wire was written on the compute stream: the side stream starts after that work, and the compute
            # stream goes on with the next steps while the all-reduce runs.
            self._comm_stream.wait_stream(torch.cuda.current_stream(self.device))
            stream_ctx = torch.cuda.stream(self._comm_stream)
            if self._nccl_like and not is_flush:
                events = (_timing_event(), _timing_event())
        with stream_ctx:
            if events is not None:
                events[0].record()
            works: tuple[dist.Work, ...] = (dist.all_reduce(self._wire, group=self._group, async_op=True),)
            if not self._packed:
                works += (dist.all_reduce(self._wire_meta, group=self._group, async_op=True),)
            if self._nccl_like:
                for work in works:
                    work.wait()  # NCCL: the side stream waits for NCCL's own stream; the host does not block
            if events is not None:
                events[1].record()
        rnd = Round(step, is_flush, works, time.perf_counter(), steps, events)
        if not is_flush and events is None:
            completion = rnd.completion
            works[0].get_future().add_done_callback(lambda _: completion.append(time.perf_counter()))
        return rnd

    def finish(self, rnd: Round) -> float:
        """Wait for ``rnd`` and gather the node's shares; then ``payload`` and ``meta`` hold the sums. Returns the
        host seconds waited for the all-reduce (the node's all-gather excluded). Raises the backend's
        ``RuntimeError`` if a peer failed or the timeout passed."""
        started = time.perf_counter()
        self._wait_events = None
        if not self._nccl_like:
            for work in rnd.works:
                # Gloo: blocks the host, and raises after the timeout.
                work.wait() if self._timeout is None else work.wait(self._timeout)
        if self._comm_stream is not None:
            current = torch.cuda.current_stream(self.device)
            if rnd.events is not None:
                self._wait_events = (_timing_event(), _timing_event())
                self._wait_events[0].record(current)
            current.wait_stream(self._comm_stream)
            if self._wait_events is not None:
                self._wait_events[1].record(current)
        # The wait for the link: the node's all-gather below is not part of it (a later merge cannot hide it, so
        # counting it would keep sync_delay="auto" from shrinking and make sync_every="auto" grow).
        waited = time.perf_counter() - started
        if self._node_group is not None:
            # Every rank of the node receives the node's merged shares and side channels (each side channel holds
            # the slots of the ranks with its local rank; their sum holds every rank's).
            dist.all_gather(list(self._gathered.unbind(0)), self._share, group=self._node_group)
            dist.all_gather(list(self._gathered_meta.unbind(0)), self._wire_meta, group=self._node_group)
            torch.sum(self._gathered_meta, dim=0, out=self.meta)
        return waited

    def sum_is_finite(self) -> bool:
        """Whether the merged payload is finite. A narrow wire can overflow in the sum although every rank's part
        was finite; a full-precision one (fp32 range or wider) cannot in practice, so it skips this pass."""
        return not self.compressed or bool(torch.isfinite(self.payload.sum(dtype=self.accumulation_dtype)))

    def snapshot(self) -> None:
        """Copy the merged side channel (and finiteness) to the host without blocking; read by [`read_snapshot`][]."""
        self._meta_host.copy_(self.meta, non_blocking=True)
        if self.compressed:
            self._finite_host.copy_(torch.isfinite(self.payload.sum(dtype=self.accumulation_dtype)), non_blocking=True)
        self._snapshot_ready = torch.cuda.Event() if self.device.type == "cuda" else None
        if self._snapshot_ready is not None:
            self._snapshot_ready.record()

    def read_snapshot(self) -> tuple[list[int], bool]:
        """The side channel and finiteness [`snapshot`][] copied (a round ago: long complete)."""
        if self._snapshot_ready is not None:
            self._snapshot_ready.synchronize()
        return [int(v) for v in self._meta_host.tolist()], bool(self._finite_host)

    def times(self, rnd: Round | None, wait_seconds: float, block: bool = False) -> Iterator[tuple[float, float]]:
        """``(wait, comm)`` seconds of merged rounds: ``rnd`` at once (gloo), or every NCCL round whose events
        completed (all of them with ``block``). ``rnd`` may be ``None`` to drain only."""
        if rnd is not None and rnd.events is not None and self._wait_events is not None:
            self._timings.append((rnd.events, self._wait_events))
        elif rnd is not None:
            completed = rnd.completion[0] if rnd.completion else time.perf_counter()
            yield wait_seconds, max(0.0, completed - rnd.launched_at)
        while self._timings:
            comm, wait = self._timings[0]
            if block:
                wait[1].synchronize()
            elif not (wait[1].query() and comm[1].query()):
                return
            self._timings.popleft()
            yield wait[0].elapsed_time(wait[1]) / 1000, comm[0].elapsed_time(comm[1]) / 1000


def _timing_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)
