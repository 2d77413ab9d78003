"""The HPSGD rule (``docs/algorithm.md``) on named tensors and a process group.

This module imports only torch and torch.distributed (through the engine's parts), so it can be used and tested
without a training framework. The parts, each with its own state:

* [`lightning_hpsgd.tracked`][]: which tensors are averaged, trained, promoted or frozen, and the flat layout;
* [`lightning_hpsgd.rounds`][]: each fragment's wire and round in flight, and the side channels to check;
* [`lightning_hpsgd.wire`][]: the all-reduce of ``Δ`` and the side channel, flat or node-sharded, and its timing;
* [`lightning_hpsgd.side_channel`][]: each rank's slot (step, stop, non-finite flag, times) and its checks;
* [`lightning_hpsgd.schedule`][]: where rounds end and when they merge, fixed or ``"auto"``;
* [`lightning_hpsgd.outer`][]: how a merged mean enters ``G`` (plain, or the outer optimizer with ``M``);
* [`lightning_hpsgd.buffers`][]: ``G`` and ``S``, flat, with a view per tensor;
* [`lightning_hpsgd.integrity`][]: the check after every flush.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hpsgd import side_channel
from lightning_hpsgd.buffers import RuleBuffers, fragment_ranges
from lightning_hpsgd.errors import (
    HPSGDCommunicationError,
    HPSGDError,
    HPSGDReentryError,
    NonFiniteUpdateError,
    RanksDivergedError,
    RanksOutOfStepError,
    SectionGuard,
    communication_error,
)
from lightning_hpsgd.integrity import average_if_different, check_identical
from lightning_hpsgd.options import (
    MergeMode,
    SyncDelay,
    SyncEvery,
    resolve_comm_dtype,
    validate_options,
)
from lightning_hpsgd.outer import OuterStep
from lightning_hpsgd.rounds import Rounds
from lightning_hpsgd.schedule import Schedule
from lightning_hpsgd.side_channel import StopRequest
from lightning_hpsgd.stats import EngineStats
from lightning_hpsgd.tensor_utils import FlatLayout, broadcast_tensors
from lightning_hpsgd.tracked import TrackedTensors
from lightning_hpsgd.wire import NodeGroups, Round

log = logging.getLogger(__name__)

__all__ = [
    "EngineStats",
    "HPSGDCommunicationError",
    "HPSGDEngine",
    "HPSGDError",
    "HPSGDReentryError",
    "NodeGroups",
    "NonFiniteUpdateError",
    "RanksDivergedError",
    "RanksOutOfStepError",
    "StopRequest",
]


class HPSGDEngine:
    """Hierarchical Parallel SGD on a model's named tensors and a process group.

    State on every rank, named as in the rule (``docs/algorithm.md``):

    * ``R`` (``replica``): the tensors averaged in every round, updated in place (see
      [`TrackedTensors`][lightning_hpsgd.tracked.TrackedTensors]).
    * ``G`` (``global_``): the sum of every average merged so far; equal on every rank.
    * ``S`` (``start``): the value of ``R`` right after the last sync point.
    * ``P`` (``pending``): an all-reduce that was launched and not yet merged, or ``None``.

    At a sync point (after every ``sync_every``-th step):

    ```text
    Δ = R − S
    G ← G + U(mean of P over the W ranks)   if P is pending (wait for it)
    R ← G + Δ                               merge="replica"
    R ← G                                   merge="stale"
    S ← R
    P ← all_reduce_async(Δ)
    ```

    With a merge delay ``τ < H`` (``sync_delay``) the sync point only launches (``S ← R``), and ``τ`` steps later the
    merge keeps the progress made since the launch: ``d = R − S``, ``G ← G + U(mean Δ)``, ``R ← G + d``, ``S ← G``.
    With ``F`` fragments, each contiguous ``1/F`` of the flat layout has its own rounds, launched at the steps
    ``≡ ⌊f·H/F⌋ (mod H)``.

    ``U`` is the identity (plain HPSGD) or the outer optimizer on the trained tensors (see
    [`OuterStep`][lightning_hpsgd.outer.OuterStep]). A flush merges ``P``, runs a blocking all-reduce of the last
    ``Δ``, sets ``R = S = G`` and checks that every floating-point tensor is identical on every rank (see
    [`check_identical`][lightning_hpsgd.integrity.check_identical]).

    Args:
        tensors: every tensor of the model's state by name (parameters and buffers, any dtype, on one device), or a
            sequence of tensors (named ``tensor{i}``). All are broadcast from rank 0 at construction.
        averaged: the names averaged in every round; floating-point only (default: every floating-point tensor).
            Other floating-point tensors are *frozen*: checked at every flush, and averaged from then on if they
            changed. Non-floating tensors (``num_batches_tracked``) are only broadcast at construction.
        trained: the names among ``averaged`` that optimizers train (default: all of ``averaged``). The outer
            optimizer applies to these only; the others take the plain mean.
        group: the process group for the HPSGD collectives. Give it a group of its own so that other collectives
            never queue behind a pending round (default: the world).
        object_group: the group for the pickled structure check (a CPU/gloo group when ``group`` is NCCL; default:
            ``group``).
        sync_every: ``H``, steps per round (>= 1; default 1), or ``"auto"``: start at 1, and at every merge set
            ``H`` from the times every rank measured and sent in the side channel (see
            [`agreed_sync_every`][lightning_hpsgd.schedule.agreed_sync_every]), up to ``max_sync_every``. ``H``
            changes only at a round boundary, and applies from the round that the merge starts.
        max_sync_every: the largest ``H`` that ``"auto"`` may choose (default 32).
        merge: ``"replica"`` (HPSGD: ``R ← G + Δ``) or ``"stale"`` (``R ← G``, the stale-gradient baseline).
        comm_dtype: dtype on the wire (``None``: full precision; bf16/fp16 compress, ``G`` stays fp32 or wider).
        outer_lr, outer_momentum, outer_nesterov: the outer optimizer (``η``, ``μ``, Nesterov). The defaults
            (``η = 1``, ``μ = 0``) give plain HPSGD, bit for bit, with no extra buffer.
        timeout: with gloo, the longest a merge waits for the pending all-reduce before raising
            [`HPSGDCommunicationError`][lightning_hpsgd.errors.HPSGDCommunicationError] (default: the process
            group's own timeout). With NCCL the process group's timeout and watchdog apply instead.
        broadcast: whether to broadcast rank 0's values at construction (default ``True``). With ``False`` the
            caller promises that the tensors are already identical on every rank; the first flush checks it.
        nodes: ``hierarchy="node"``: the node's groups ([`NodeGroups`][lightning_hpsgd.wire.NodeGroups]). The
            caller keeps node-mates identical (a synchronous gradient all-reduce inside each node); each rank then
            all-reduces only its share of ``Δ`` across nodes, and the merge all-gathers the node's shares.
            ``group`` still spans every rank. Default ``None``: flat HPSGD, every rank a worker.
        defer_checks: read each round's side channel one merge later, from a non-blocking copy, so that a sync
            point never blocks the host (default: on CUDA). Errors are still raised on every rank at the same
            merge, one round later; a non-finite round has then already reached ``G``, which is abandoned.
        sync_delay: ``τ``, steps from a round's launch to its merge, from 0 to ``H`` (``None``, the default: ``H``,
            the merge at the next sync point; ``0``: a blocking average), or ``"auto"``: start at ``H`` and at every
            merge take the smallest ``τ`` that hides the all-reduce (see
            [`agreed_sync_delay`][lightning_hpsgd.schedule.agreed_sync_delay]). Below ``H`` needs
            ``merge="replica"``.
        fragments: ``F``, contiguous parts of the flat layout with rounds of their own (1 to ``H``; default 1;
            needs an integer ``sync_every``).
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor] | Sequence[Tensor],
        averaged: Collection[str] | None = None,
        *,
        trained: Collection[str] | None = None,
        group: dist.ProcessGroup | None = None,
        object_group: dist.ProcessGroup | None = None,
        sync_every: SyncEvery = 1,
        max_sync_every: int = 32,
        merge: MergeMode = "replica",
        comm_dtype: str | torch.dtype | None = None,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        outer_nesterov: bool = True,
        timeout: timedelta | None = None,
        broadcast: bool = True,
        nodes: NodeGroups | None = None,
        defer_checks: bool | None = None,
        sync_delay: SyncDelay = None,
        fragments: int = 1,
    ) -> None:
        validate_options(sync_every, merge, max_sync_every=max_sync_every, outer_lr=outer_lr,
                         outer_momentum=outer_momentum, outer_nesterov=outer_nesterov, sync_delay=sync_delay,
                         fragments=fragments)  # fmt: skip
        self.group, self.merge, self.timeout, self.nodes = group, merge, timeout, nodes
        self.object_group = object_group if object_group is not None else group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if nodes is not None:
            nodes.check(self.world_size)
        self._outer_options = (float(outer_lr), float(outer_momentum), outer_nesterov)
        self._comm_dtype_option = resolve_comm_dtype(comm_dtype)
        self.tracked = TrackedTensors(tensors, averaged, trained)
        self.device = self.tracked.device
        self.defer_checks = self.device.type == "cuda" if defer_checks is None else defer_checks
        self.tracked.check_same_structure(group, self.object_group)
        if broadcast:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            broadcast_tensors(list(self.tracked.tensors.values()), src=src, group=group)
        self.schedule = Schedule(sync_every, max_sync_every, sync_delay=sync_delay, fragments=fragments)
        self._fragments = fragments
        self._steps_since_flush = 0
        self._drift_requested = False
        self.guard = SectionGuard()  # one section at a time; none once aborted
        # Set at the merge that carried any rank's stop request: every rank learns it at the same merge.
        self.stop_requested = StopRequest(0)
        self._stop_to_send = StopRequest(0)
        self.stats = EngineStats(sync_every=self.sync_every, sync_delay=self.schedule.delay, fragments=fragments)
        self._build({}, {})

    # ------------------------------------------------------------------ the rule

    def on_optimizer_step(self, step: int) -> bool:
        """Record that step number ``step`` (1-based) was taken; run a sync point if the round ends there.

        A step is what the caller counts: Lightning's adapter counts batches that stepped an optimizer. Numbers may
        jump; a round ends at the first step at or past each boundary. Returns whether a sync point ran.
        """
        self._steps_since_flush += 1
        self.rounds.count_step()
        launches = self.schedule.count(step)
        if not launches and not self.rounds.due(step):
            return False
        self.sync_point(step, launches)
        return True

    @torch.no_grad()
    def sync_point(self, step: int, launches: Sequence[int] = (0,)) -> None:
        """Merge every pending average that is due (``sync_delay`` steps after its launch), and end the round of
        the fragments in ``launches``: merge what they still have pending, rebase ``R`` and launch their
        all-reduces."""
        with self.guard("sync point"):
            self.schedule.end_round()
            if self._drift_requested:
                self._drift_requested = False
                self.stats.last_drift = self.buffers.drift()
            for f, rnd in enumerate(self.rounds.in_flight):
                if f in launches or (rnd is not None and rnd.merge_at <= step):
                    self._fragment_sync(f, step, launch=f in launches)
            self.schedule.start_round(step, launched=bool(launches))

    def _fragment_sync(self, f: int, step: int, launch: bool) -> None:
        """Fragment ``f``'s sync point (``launch``): ``Δ = R − S``; merge ``P`` if pending; launch ``Δ``;
        ``R ← S ← G + Δ`` (``"stale"``: ``G``); with ``τ = 0``, the merge follows at once. Or its merge before its
        next sync point: ``d = R − S`` (the progress since the launch); ``G ← G + U(mean Δ)``; ``R ← G + d``;
        ``S ← G``, so that the next ``Δ`` carries ``d``."""
        start, global_ = self.buffers.start_of(f), self.buffers.global_of(f)
        self.buffers.delta_into_start(f)  # S ← R − S: Δ, or d
        self._merge(f, self.defer_checks, step)  # G ← G + U(mean P)
        rnd = self._launch(f, step, is_flush=False) if launch else None  # the wire takes Δ from S
        if self.merge == "replica":
            start.add_(global_)  # S ← G + Δ (= R where nothing was pending: S = G after an early merge), or G + d
        else:
            start.copy_(global_)  # S ← G
        self.buffers.write_replica(f)  # R ← S
        if rnd is None:
            start.copy_(global_)  # S ← G
        elif rnd.merge_at <= step:  # sync_delay = 0: a blocking average
            self._fragment_sync(f, step, launch=False)

    @torch.no_grad()
    def flush(self, step: int) -> None:
        """Leave every rank with ``R = S = G``, nothing in flight, and every floating-point tensor identical.

        A collective: every rank must call it at the same point. It always communicates, even when this rank took
        no step since the last flush, so that ranks whose step counts diverged get
        [`RanksOutOfStepError`][lightning_hpsgd.errors.RanksOutOfStepError] instead of waiting for each other, and
        changes made outside optimizer steps (BatchNorm statistics, an EMA teacher) are averaged too.

        Raises:
            RanksDivergedError: a tensor of ``R`` differs across ranks after the merge; names the first one.
        """
        with self.guard("flush"):
            self.buffers.delta_into_start()  # of every fragment: the progress not yet launched
            for f in range(self._fragments):  # every P, then the blocking round of every fragment
                self._merge(f, defer=False)
            for f in range(self._fragments):
                self._launch(f, step, is_flush=True)
            for f in range(self._fragments):
                self._merge(f, defer=False)
            self.start.copy_(self.global_)
            self.buffers.write_replica()
            for f in range(self._fragments):
                self._record_times(f, self.rounds.wires[f].times(None, 0.0, block=True))
            self._reconcile(step)
        self._steps_since_flush = 0
        self.schedule.start_round(None)
        self.stats.flushes += 1

    def _launch(self, f: int, step: int, is_flush: bool) -> Round:
        slot = {"stop": self._stop_to_send, **self.schedule.times()}
        merge_at = step + (0 if is_flush else self.schedule.delay)
        rnd = self.rounds.launch(f, self.buffers.start_of(f), slot, step=step, is_flush=is_flush, merge_at=merge_at)
        self.stats.bytes_sent += self.rounds.wires[f].bytes_per_round
        return rnd

    def _merge(self, f: int, defer: bool, step: int | None = None) -> None:
        """Wait for fragment ``f``'s ``P``, check its side channel, and set ``G ← G + U(mean P)``; at a sync point
        (``step``), count its staleness and times.

        With ``defer``, this round's side channel is copied to the host without blocking and checked at the next
        merge, and the previous round's is checked now.
        """
        pending = self.rounds.in_flight[f]
        try:
            _, waited, reads = self.rounds.finish(f, defer)
        except RuntimeError as err:
            self.aborted = True
            what = f"the all-reduce of the round that ended at optimizer step {pending.step if pending else '?'}"
            raise communication_error(what, self.rank, err) from err
        for read in reads:
            self._check(*read)
        if pending is None:
            return
        wire = self.rounds.wires[f]
        begin = self.buffers.ranges[f][0]
        self.outer.apply(self.buffers.global_of(f), wire.payload, wire.merge_scale, pending.steps > 0, begin)
        self.stats.rounds += 1
        if step is not None:
            self.stats.add_staleness(step - pending.step)
            self._record_times(f, wire.times(pending, waited))

    def _check(self, f: int, values: list[int], sum_is_finite: bool, merged: bool) -> None:
        """Every rank reads the same slots: the same errors, stop requests, ``H`` and ``τ`` everywhere."""
        try:
            flat = self.buffers.global_of(f) if merged else self.rounds.wires[f].payload
            where = lambda: self.tracked.first_non_finite(flat, begin=self.buffers.ranges[f][0])  # noqa: E731
            slots = side_channel.read_round(values, sum_is_finite, where=where, comm_dtype=self.comm_dtype,
                                            merged=merged)  # fmt: skip
        except HPSGDError:
            self.aborted = True
            raise
        for slot in slots:
            self.stop_requested |= slot.stop
        self.stats.sync_every = self.schedule.agree(slots)
        self.stats.sync_delay = self.schedule.delay

    def _reconcile(self, step: int) -> None:
        try:
            changed = check_identical(self.tracked, self.group, step)
        except RanksDivergedError:
            self.aborted = True
            raise
        except RuntimeError as err:
            self.aborted = True
            raise communication_error("the check after the flush", self.rank, err) from err
        if changed:
            self._rebuild(self.tracked.tensors, self.tracked.always, self.tracked.trained, promote=changed)

    # ------------------------------------------------------------------ the model's tensors

    @torch.no_grad()
    def follow(self, tensors: Mapping[str, Tensor], averaged: Collection[str], step: int,
               trained: Collection[str] | None = None) -> bool:  # fmt: skip
        """Track the model's tensors after user code replaced some of them or changed which are trainable.

        * The same names, shapes and dtypes, and the same sets: tensors replaced by new objects (SWA resetting
          BatchNorm statistics, ``module.weight = nn.Parameter(...)``, ``param.data = ...``) are followed in place,
          with no collective. Their new values count as a change within the current round.
        * Anything else (a tensor added or removed, a shape or dtype changed, a parameter frozen or unfrozen): a
          flush over the old tensors, then ``R``, ``S`` and ``G`` are rebuilt over the new ones, and every new
          tensor that differs across ranks is averaged. A collective: call it at the same point on every rank.

        Returns:
            Whether it rebuilt (and so communicated).
        """
        trained = averaged if trained is None else trained
        # Replaced objects first, so that the flush counts their new values as this round's change.
        self.tracked.repoint(tensors)
        if self.tracked.same_layout(tensors, averaged, trained):
            return False
        self.flush(step)
        with self.guard("rebuild"):
            known = {name: (t.shape, t.dtype) for name, t in self.tracked.tensors.items()}
            self._rebuild(tensors, averaged, trained, promote=())
            self.tracked.check_same_structure(self.group, self.object_group)
            fresh = [t for n, t in self.tracked.tensors.items() if known.get(n) != (t.shape, t.dtype)]
            if average_if_different([t for t in fresh if t.is_floating_point()], self.group):
                self._build(*self._named_state())
        log.debug("HPSGDEngine: rebuilt over %d averaged tensors", len(self.replica))
        return True

    def _named_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``G`` and ``M`` by name: they survive a rebuild of the buffers."""
        return self.buffers.named_global(), dict(zip(self.tracked.names, self.outer.views))

    def _rebuild(
        self,
        tensors: Mapping[str, Tensor],
        averaged: Collection[str],
        trained: Collection[str],
        promote: Collection[str],
    ) -> None:
        state = self._named_state()
        promoted = (self.tracked.promoted | set(promote)) & set(tensors)
        self.tracked = TrackedTensors(tensors, averaged, trained, promoted)
        self._build(*state)

    def _build(self, global_values: Mapping[str, Tensor], momentum_values: Mapping[str, Tensor]) -> None:
        """(Re)allocate ``G``, ``S``, the wire and ``M`` for the current tensors. ``G`` starts from ``R``, or from
        ``global_values`` where a saved value still rounds to the replica (the extra bits of a narrow replica
        survive a rebuild); ``M`` from ``momentum_values`` by name, 0 for new tensors."""
        layout = self.layout
        ranges = fragment_ranges(layout.numel, self._fragments)
        self.rounds = Rounds(ranges, layout.dtype, self.device, comm_dtype=self._comm_dtype_option, group=self.group,
                             nodes=self.nodes, timeout=self.timeout)  # fmt: skip
        self.buffers = RuleBuffers(self.tracked, global_values, ranges)
        self.global_, self.start = self.buffers.global_, self.buffers.start
        self.outer = OuterStep(*self._outer_options, layout, self.tracked.num_trained)
        self.outer.load_state_dict(momentum_values, self.tracked.names)
        self.stats.bytes_per_round = self.rounds.bytes_per_round
        self.stats.promoted = len(self.tracked.promoted)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint written at a flush point needs beyond the model itself.

        ``global``: ``G`` of every tensor narrower than ``G`` (a bf16 replica cannot hold its bits; elsewhere
        ``G = R`` after a flush); ``promoted``: the frozen tensors averaged in every round; ``stats``: the counters;
        ``outer_momentum``: ``M`` by tensor name (with ``outer_momentum > 0``); ``sync_every``: with ``"auto"``,
        the current ``H`` and the step that ends the current round.
        Stop requests are not part of it: a run resumed from a preemption checkpoint must not stop again.
        """
        state: dict[str, Any] = {
            "global": self.buffers.narrow_global(),
            "promoted": sorted(self.tracked.promoted),
            "stats": self.stats.to_dict(),
        }
        if self.outer.buffer is not None:
            state["outer_momentum"] = self.outer.state_dict(self.tracked.names)
        if self.schedule.auto or self.schedule.delay_auto:
            state["sync_every"] = self.schedule.state_dict()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict`][lightning_hpsgd.engine.HPSGDEngine.state_dict] output right after construction
        (every rank loads the same state).

        ``G`` is restored only for tensors whose saved value still rounds to the current replica, so that stale
        values (the model was changed since) are never brought back.
        """
        promoted = set(state.get("promoted", ())) & set(self.tracked.tensors)
        if promoted - self.tracked.promoted:
            self._rebuild(self.tracked.tensors, self.tracked.always, self.tracked.trained, promote=promoted)
        restored = self.buffers.restore_global(state.get("global", {}))
        if "stats" in state:
            self.stats = EngineStats.from_dict(state["stats"])
            self.stats.bytes_per_round = self.rounds.bytes_per_round
            self.stats.promoted = len(self.tracked.promoted)
        self.outer.load_state_dict(state.get("outer_momentum", {}), self.tracked.names)
        self.schedule.load_state_dict(state.get("sync_every") or {})
        self.stats.sync_every, self.stats.sync_delay = self.sync_every, self.schedule.delay
        log.debug("HPSGDEngine: loaded state (G of %d tensors, %d promoted)", restored, len(promoted))

    # ------------------------------------------------------------------ stops, errors, measurements

    @property
    def needs_flush(self) -> bool:
        """Whether a round is in flight or a step was taken since the last flush (this rank's view)."""
        return self.pending is not None or self._steps_since_flush > 0

    @property
    def pending(self) -> Round | None:
        """``P``: the earliest-launched round not yet merged (of any fragment), or ``None``."""
        return self.rounds.pending

    def request_stop(self, reason: StopRequest = StopRequest.ABORT) -> None:
        """Ask every rank to stop: sent with this rank's next round or flush; see ``stop_requested``.

        No collective of its own, so it is safe from a signal handler. Every rank sees the union of all ranks'
        requests in ``stop_requested`` after the same merge, up to two rounds later (the launch at the next sync
        point, then its merge; one more with ``defer_checks``). With one rank, the request holds at once.
        """
        self._stop_to_send |= reason
        if self.world_size == 1:
            self.stop_requested |= reason

    @property
    def stop_sent(self) -> StopRequest:
        """The stop requests this rank has made ([`request_stop`][lightning_hpsgd.engine.HPSGDEngine.request_stop])."""
        return self._stop_to_send

    def abandon(self) -> None:
        """Give up after an error: drop the pending all-reduce without waiting and refuse further collectives.

        No collective runs here, since the error may have hit one rank only and the others may never answer.
        """
        self.rounds.abandon()
        self.aborted = True

    def request_drift(self) -> None:
        """Measure ``‖R − G‖ / ‖G‖`` at the next sync point (two extra passes over the model, on that round only)."""
        self._drift_requested = True

    def _record_times(self, f: int, times: Iterable[tuple[float, float]]) -> None:
        for wait, comm in times:  # (wait, comm) seconds of each round of fragment f timed since the last call
            self.schedule.record_comm(comm, wait)
            self.stats.add_timing(wait, comm, f)

    # ------------------------------------------------------------------ views of the parts

    @property
    def aborted(self) -> bool:
        """Whether the engine gave up after an error: it refuses every further collective."""
        return self.guard.aborted

    @aborted.setter
    def aborted(self, value: bool) -> None:
        self.guard.aborted = value

    @property
    def sync_every(self) -> int:
        """``H`` of the current round."""
        return self.schedule.sync_every

    @property
    def replica(self) -> list[Tensor]:
        """``R``: the averaged tensors, in the flat layout's order."""
        return self.tracked.replica

    @property
    def layout(self) -> FlatLayout:
        """The flat layout of ``R``, ``G`` and ``S``."""
        return self.tracked.layout

    @property
    def comm_dtype(self) -> torch.dtype:
        """The dtype on the wire."""
        return self.rounds.wires[0].dtype

    @property
    def sync_delay(self) -> int:
        """``τ`` of a round launched now."""
        return self.schedule.delay
