"""The HPSGD rule (``docs/algorithm.md``) on named tensors and a process group.

This module imports only torch and torch.distributed (through the engine's parts), so it can be used and tested
without a training framework. The parts, each with its own state:

* [`lightning_hpsgd.tracked`][]: which tensors are averaged, trained, promoted or frozen, and the flat layout;
* [`lightning_hpsgd.wire`][]: the all-reduce of ``Δ`` and the side channel, flat or node-sharded, and its timing;
* [`lightning_hpsgd.side_channel`][]: each rank's slot (step, stop, non-finite flag, times) and its checks;
* [`lightning_hpsgd.schedule`][]: where rounds end, fixed or ``"auto"``;
* [`lightning_hpsgd.outer`][]: how a merged mean enters ``G`` (plain, or the outer optimizer with ``M``);
* [`lightning_hpsgd.integrity`][]: the check after every flush.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hpsgd import side_channel
from lightning_hpsgd.errors import (
    HPSGDCommunicationError,
    HPSGDError,
    HPSGDReentryError,
    NonFiniteUpdateError,
    RanksDivergedError,
    RanksOutOfStepError,
    communication_error,
)
from lightning_hpsgd.integrity import check_identical
from lightning_hpsgd.options import (
    DEFAULT_MAX_SYNC_EVERY,
    MergeMode,
    SyncEvery,
    resolve_comm_dtype,
    validate_options,
)
from lightning_hpsgd.outer import OuterStep
from lightning_hpsgd.schedule import Schedule
from lightning_hpsgd.side_channel import StopRequest
from lightning_hpsgd.stats import EngineStats
from lightning_hpsgd.tensor_utils import FlatLayout, average_tensors, broadcast_tensors, checksums, differs_across_ranks
from lightning_hpsgd.tracked import TrackedTensors
from lightning_hpsgd.wire import NodeGroups, Round, Wire

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
    r"""Hierarchical Parallel SGD on a model's named tensors and a process group.

    State on every rank, named as in the rule (``docs/algorithm.md``):

    * ``R`` (``replica``): the tensors averaged in every round, updated in place (see
      [`TrackedTensors`][lightning_hpsgd.tracked.TrackedTensors]).
    * ``G`` (``global_``): the sum of every average merged so far; equal on every rank.
    * ``S`` (``start``): the value of ``R`` right after the last sync point.
    * ``P`` (``pending``): an all-reduce that was launched and not yet merged, or ``None``.

    At a sync point (after every ``sync_every``-th step):

    .. math::

        \Delta &= R - S \\
        G &\leftarrow G + U\big(\tfrac{1}{W}\textstyle\sum_{w} P_w\big)
            \quad \text{(if } P \text{ is pending; wait for it)} \\
        R &\leftarrow G + \Delta \ \text{(merge="replica")}
            \quad\text{or}\quad R \leftarrow G \ \text{(merge="stale")} \\
        S &\leftarrow R, \qquad P \leftarrow \text{all\_reduce\_async}(\Delta)

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
        max_sync_every: int = DEFAULT_MAX_SYNC_EVERY,
        merge: MergeMode = "replica",
        comm_dtype: str | torch.dtype | None = None,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        outer_nesterov: bool = True,
        timeout: timedelta | None = None,
        broadcast: bool = True,
        nodes: NodeGroups | None = None,
        defer_checks: bool | None = None,
    ) -> None:
        validate_options(sync_every, merge, max_sync_every=max_sync_every, outer_lr=outer_lr,
                         outer_momentum=outer_momentum, outer_nesterov=outer_nesterov)  # fmt: skip
        self.group, self.merge, self.timeout, self.nodes = group, merge, timeout, nodes
        self.object_group = object_group if object_group is not None else group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if nodes is not None and nodes.local_size * nodes.num_nodes != self.world_size:
            raise ValueError(
                f"HPSGD: {nodes.num_nodes} nodes of {nodes.local_size} ranks do not make the group's"
                f" {self.world_size} ranks."
            )
        self._outer_options = (float(outer_lr), float(outer_momentum), outer_nesterov)
        self._comm_dtype_option = resolve_comm_dtype(comm_dtype)
        self.tracked = TrackedTensors(tensors, averaged, trained)
        self.device = self.tracked.device
        self.defer_checks = self.device.type == "cuda" if defer_checks is None else defer_checks
        self.tracked.check_same_structure(group, self.object_group)
        if broadcast:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            broadcast_tensors(list(self.tracked.tensors.values()), src=src, group=group)
        self.schedule = Schedule(sync_every, max_sync_every)
        self.pending: Round | None = None
        self._abandoned: Round | None = None  # kept alive: the backend may still write into its buffers
        self._deferred: Round | None = None  # merged; its side channel is checked at the next merge
        self._steps_unsent = 0  # steps since the last launch
        self._steps_since_flush = 0
        self._busy = False
        self._drift_requested = False
        self.aborted = False
        # Set at the merge that carried any rank's stop request: every rank learns it at the same merge.
        self.stop_requested = StopRequest(0)
        self._stop_to_send = StopRequest(0)
        self.stats = EngineStats(sync_every=self.sync_every)
        self._build({}, {})
        log.debug("HPSGDEngine: %d averaged and %d frozen tensors, %d elements, G in %s, wire in %s, %d ranks",
                  len(self.replica), len(self.tracked.frozen), self.layout.numel, self.layout.dtype,
                  self.comm_dtype, self.world_size)  # fmt: skip

    # ------------------------------------------------------------------ the rule

    def on_optimizer_step(self, step: int) -> bool:
        """Record that step number ``step`` (1-based) was taken; run a sync point if the round ends there.

        A step is what the caller counts: Lightning's adapter counts batches that stepped an optimizer. Numbers may
        jump; a round ends at the first step at or past each boundary. Returns whether a sync point ran.
        """
        self._steps_since_flush += 1
        self._steps_unsent += 1
        if not self.schedule.count(step):
            return False
        self.sync_point(step)
        return True

    @torch.no_grad()
    def sync_point(self, step: int) -> None:
        """Merge the pending average, rebase ``R`` and launch this round's all-reduce."""
        with self._exclusive("sync point"):
            self.schedule.end_round()
            if self._drift_requested:
                self._measure_drift()
            self._delta_into_start()  # S ← R − S = Δ
            pending = self.pending
            waited = self._merge(defer=self.defer_checks)  # G ← G + U(mean P)
            if pending is not None:
                self._record_round(pending, step, waited)
            self.pending = self._launch(step, is_flush=False)  # the wire takes Δ from S; S is free again
            if self.merge == "replica":
                self.start.add_(self.global_)  # S ← G + Δ
            else:
                self.start.copy_(self.global_)  # S ← G
            self._write_replica_from_start()  # R ← S
            self.schedule.start_round(step)

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
        with self._exclusive("flush"):
            self._delta_into_start()
            self._merge(defer=False)
            self.pending = self._launch(step, is_flush=True)
            self._merge(defer=False)
            self.start.copy_(self.global_)
            self._write_replica_from_start()
            for wait, comm in self.wire.times(None, 0.0, block=True):
                self._add_timing(wait, comm)
            self._reconcile(step)
        self._steps_since_flush = 0
        self.schedule.start_round(None)
        self.stats.flushes += 1

    def _delta_into_start(self) -> None:
        """``S ← R − S``: until the launch copies it to the wire, S holds this round's Δ."""
        self.start.neg_()
        torch._foreach_add_(self._start_views, self.replica)

    def _write_replica_from_start(self) -> None:
        torch._foreach_copy_(self.replica, self._start_views)
        if self.tracked.replica_is_narrow:
            # Writing G + Δ into a narrow R rounds it: S must be re-read from R for Δ to measure only the
            # optimizer's progress.
            torch._foreach_copy_(self._start_views, self.replica)

    def _launch(self, step: int, is_flush: bool) -> Round:
        slot = {"stop": self._stop_to_send, "step_seconds": self.schedule.step_seconds,
                "comm_seconds": self.schedule.comm_seconds, "wait_seconds": self.schedule.wait_seconds}  # fmt: skip
        rnd = self.wire.launch(self.start, slot, step=step, is_flush=is_flush, steps=self._steps_unsent)
        self._steps_unsent = 0
        self.stats.bytes_sent += self.stats.bytes_per_round
        return rnd

    def _merge(self, defer: bool) -> float:
        """Wait for ``P``, check its side channel, and set ``G ← G + U(mean P)``. Returns the host seconds waited.

        With ``defer``, this round's side channel is copied to the host without blocking and checked at the next
        merge, and the previous round's is checked now.
        """
        pending, self.pending = self.pending, None
        if pending is None:
            self._check_deferred()
            return 0.0
        try:
            waited = self.wire.finish(pending)
            self._check_deferred()
            if defer:
                self.wire.snapshot()
                self._deferred = pending
            else:
                values, finite = [int(v) for v in self.wire.meta.tolist()], self.wire.sum_is_finite()
        except HPSGDError:
            raise  # the previous round's deferred check
        except RuntimeError as err:
            self.aborted = True
            what = f"the all-reduce of the round that ended at optimizer step {pending.step}"
            raise communication_error(what, self.rank, err) from err
        if not defer:
            self._check(values, finite, merged=False)
        self.outer.apply(self.global_, self.wire.payload, self.wire.merge_scale, outer=pending.steps > 0)
        self.stats.rounds += 1
        return waited

    def _check_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._check(*self.wire.read_snapshot(), merged=True)

    def _check(self, values: list[int], sum_is_finite: bool, merged: bool) -> None:
        """Every rank reads the same slots: the same errors, stop requests and ``H`` everywhere."""
        slots = side_channel.decode(values)
        try:
            side_channel.check_steps(slots)
        except RanksOutOfStepError:
            self.aborted = True
            raise
        for slot in slots:
            self.stop_requested |= slot.stop
        self.stats.sync_every = self.schedule.agree(slots)
        error = side_channel.non_finite_error(slots, sum_is_finite, where=lambda: self._first_non_finite(merged),
                                              comm_dtype=self.comm_dtype, merged=merged)  # fmt: skip
        if error is not None:
            self.aborted = True
            raise error

    def _first_non_finite(self, merged: bool) -> str:
        bad = (~torch.isfinite(self.global_ if merged else self.wire.payload)).nonzero()
        return self.tracked.name_at(int(bad[0])) if bad.numel() else "(unknown)"

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
    def follow(
        self,
        tensors: Mapping[str, Tensor],
        averaged: Collection[str],
        step: int,
        trained: Collection[str] | None = None,
    ) -> bool:
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
        with self._exclusive("rebuild"):
            known = {name: (t.shape, t.dtype) for name, t in self.tracked.tensors.items()}
            self._rebuild(tensors, averaged, trained, promote=())
            self.tracked.check_same_structure(self.group, self.object_group)
            fresh = [t for n, t in self.tracked.tensors.items() if known.get(n) != (t.shape, t.dtype)]
            fresh_floating = [t for t in fresh if t.is_floating_point()]
            if fresh_floating:
                flags = differs_across_ranks(checksums(fresh_floating), self.group)
                differing = [t for t, differs in zip(fresh_floating, flags) if differs]
                if differing:
                    average_tensors(differing, self.group)
                    self._build(*self._named_state())
        log.debug("HPSGDEngine: rebuilt over %d averaged and %d frozen tensors", len(self.replica),
                  len(self.tracked.frozen))  # fmt: skip
        return True

    def _named_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``G`` and ``M`` by name: they survive a rebuild of the buffers."""
        names = self.tracked.names
        return dict(zip(names, self._global_views)), dict(zip(names, self.outer.views))

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
        self.wire = Wire(layout.numel, layout.dtype, self.device, comm_dtype=self._comm_dtype_option,
                         group=self.group, nodes=self.nodes, timeout=self.timeout)  # fmt: skip
        self.global_ = layout.new_buffer()
        self.start = layout.new_buffer()
        self._global_views = layout.views(self.global_)
        self._start_views = layout.views(self.start)
        self.outer = OuterStep(*self._outer_options, layout, self.tracked.num_trained)
        self.outer.load_state_dict(momentum_values, self.tracked.names)
        self.stats.bytes_per_round = self.wire.bytes_per_round
        self.stats.promoted = len(self.tracked.promoted)
        with torch.no_grad():
            torch._foreach_copy_(self._start_views, self.replica)
            self.global_.copy_(self.start)
            self._restore_global(global_values)

    def _restore_global(self, values: Mapping[str, Tensor]) -> int:
        restored = 0
        for name, tensor, view in zip(self.tracked.names, self.replica, self._global_views):
            saved = values.get(name)
            if saved is not None and saved.shape == view.shape:
                saved = saved.to(device=view.device, dtype=view.dtype)
                if torch.equal(saved.to(tensor.dtype), tensor):
                    view.copy_(saved)
                    restored += 1
        return restored

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint written at a flush point needs beyond the model itself.

        ``global``: ``G`` of every tensor narrower than ``G`` (a bf16 replica cannot hold its bits; elsewhere
        ``G = R`` after a flush); ``promoted``: the frozen tensors averaged in every round; ``stats``: the counters;
        ``outer_momentum``: ``M`` by tensor name (with ``outer_momentum > 0``); ``sync_every``: with ``"auto"``,
        the current ``H`` and the step that ends the current round.
        Stop requests are not part of it: a run resumed from a preemption checkpoint must not stop again.
        """
        narrow = {
            name: view.detach().cpu().clone()
            for name, tensor, view in zip(self.tracked.names, self.replica, self._global_views)
            if tensor.dtype != self.layout.dtype
        }
        state: dict[str, Any] = {
            "global": narrow,
            "promoted": sorted(self.tracked.promoted),
            "stats": self.stats.to_dict(),
        }
        if self.outer.buffer is not None:
            state["outer_momentum"] = self.outer.state_dict(self.tracked.names)
        if self.schedule.auto:
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
            t = self.tracked
            self._rebuild(t.tensors, t.always, t.trained, promote=promoted)
        restored = self._restore_global(state.get("global", {}))
        if "stats" in state:
            self.stats = EngineStats.from_dict(state["stats"])
            self.stats.bytes_per_round = self.wire.bytes_per_round
            self.stats.promoted = len(self.tracked.promoted)
        self.outer.load_state_dict(state.get("outer_momentum", {}), self.tracked.names)
        self.schedule.load_state_dict(state.get("sync_every") or {})
        self.stats.sync_every = self.sync_every
        log.debug("HPSGDEngine: loaded state (G of %d tensors, %d promoted)", restored, len(promoted))

    # ------------------------------------------------------------------ stops, errors, measurements

    @property
    def needs_flush(self) -> bool:
        """Whether a round is in flight or a step was taken since the last flush (this rank's view)."""
        return self.pending is not None or self._steps_since_flush > 0

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
        if self.pending is not None:
            log.debug("HPSGDEngine: abandoning the all-reduce of step %d", self.pending.step)
            self._abandoned = self.pending
        self.pending = None
        self.aborted = True

    def request_drift(self) -> None:
        """Measure ``‖R − G‖ / ‖G‖`` at the next sync point (two extra passes over the model, on that round only)."""
        self._drift_requested = True

    def _measure_drift(self) -> None:
        # One tensor at a time, so the scratch is the largest tensor, not a flat copy of the model.
        self._drift_requested = False
        squares = torch.zeros((), dtype=self.layout.dtype, device=self.device)
        for replica, global_ in zip(self.replica, self._global_views):
            squares += torch.sub(replica, global_).square().sum(dtype=self.layout.dtype)
        norm = torch.linalg.vector_norm(self.global_).clamp_min(torch.finfo(self.layout.dtype).tiny)
        self.stats.last_drift = squares.sqrt() / norm

    def _record_round(self, pending: Round, step: int, waited: float) -> None:
        self.stats.overlapped_rounds += 1
        self.stats.last_staleness_steps = step - pending.step
        self.stats.staleness_steps += self.stats.last_staleness_steps
        for wait, comm in self.wire.times(pending, waited):
            self._add_timing(wait, comm)

    def _add_timing(self, wait: float, comm: float) -> None:
        self.schedule.record_comm(comm, wait)
        self.stats.add_timing(wait, comm)

    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
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

    # ------------------------------------------------------------------ views of the parts

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
        return self.wire.dtype
