"""The HPSGD rule (``docs/algorithm.md``) on named tensors and a process group.

This module imports only torch and torch.distributed, so it can be used (and tested) without a training framework.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hpsgd.tensor_utils import (
    FlatLayout,
    accumulation_dtype,
    average_tensors,
    broadcast_tensors,
    checksums,
    differs_across_ranks,
)

log = logging.getLogger(__name__)

MergeMode = Literal["replica", "stale"]
MERGE_MODES: tuple[str, ...] = ("replica", "stale")
SyncEvery = int | Literal["auto"]
HIERARCHIES: tuple[str | None, ...] = (None, "node")
DEFAULT_MAX_SYNC_EVERY = 32
# sync_every="auto" proposes the smallest H with comm <= H x compute / AUTO_MARGIN, from moving averages of both.
AUTO_MARGIN = 1.25
_AUTO_SMOOTHING = 0.3
COMM_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


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


def resolve_comm_dtype(comm_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn the ``comm_dtype`` option into a dtype, or raise a ``ValueError`` naming the accepted values.

    Args:
        comm_dtype: ``None`` (full precision), ``torch.bfloat16`` / ``torch.float16`` / ``torch.float32``, or one
            of the strings ``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"float16"``, ``"half"``, ``"fp32"``,
            ``"float32"`` (also with a ``"torch."`` prefix). A wire dtype at least as wide as ``G`` means no
            compression.
    """
    if comm_dtype is None:
        return None
    if isinstance(comm_dtype, torch.dtype) and comm_dtype in COMM_DTYPES.values():
        return comm_dtype
    if isinstance(comm_dtype, str):
        key = comm_dtype.lower().removeprefix("torch.")
        if key in COMM_DTYPES:
            return COMM_DTYPES[key]
        if key in ("none", "null"):
            return None
    raise ValueError(
        "comm_dtype must be None (full precision), torch.bfloat16, torch.float16 or torch.float32 (or one of the"
        f" strings {sorted(COMM_DTYPES)}); received {comm_dtype!r}."
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_options(
    sync_every: object,
    merge: object,
    *,
    max_sync_every: object = DEFAULT_MAX_SYNC_EVERY,
    outer_lr: object = 1.0,
    outer_momentum: object = 0.0,
    outer_nesterov: object = True,
    hierarchy: object = None,
) -> None:
    """Raise a ``ValueError`` naming the accepted values if an option of the rule is invalid."""
    if not (_is_count(sync_every) or sync_every == "auto"):
        raise ValueError(
            "sync_every must be an integer >= 1 (optimizer steps per round) or 'auto' (chosen from the measured"
            f" communication and compute times); received {sync_every!r}."
        )
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {list(MERGE_MODES)}; received {merge!r}.")
    if not _is_count(max_sync_every) or max_sync_every >= 1 << 20:
        raise ValueError(
            f"max_sync_every must be an integer from 1 to {(1 << 20) - 1} (the largest H 'auto' may choose);"
            f" received {max_sync_every!r}."
        )
    if not _is_real(outer_lr) or not 0 < outer_lr < float("inf"):
        raise ValueError(f"outer_lr must be a finite number > 0 (1.0: plain HPSGD); received {outer_lr!r}.")
    if not _is_real(outer_momentum) or not 0 <= outer_momentum < 1:
        raise ValueError(
            f"outer_momentum must be a number in [0, 1) (0.0: no momentum; 0.9 amplifies a steady step up to 10 x);"
            f" received {outer_momentum!r}."
        )
    if not isinstance(outer_nesterov, bool):
        raise ValueError(f"outer_nesterov must be True or False; received {outer_nesterov!r}.")
    if hierarchy not in HIERARCHIES:
        raise ValueError(
            f"hierarchy must be None (flat HPSGD: every rank a worker) or 'node' (synchronous inside a node, HPSGD"
            f" across nodes); received {hierarchy!r}."
        )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The side channel: 5 fields of W slots (step code high bits, low bits, non-finite flag, stop request, proposed H).
_META_FIELDS = 5
_CODE_BITS = 12  # each half of a step code stays below 2**24, exact in fp32


class StopRequest(enum.IntFlag):
    """Why ranks should stop, carried in each round's side channel so that every rank stops at the same step."""

    ABORT = 1  # stop now (SIGTERM): Lightning's SIGTERMException
    FINISH = 2  # end training cleanly after this step (a time limit)


@dataclass
class _Pending:
    """An all-reduce launched at the end of the round that ended at optimizer step ``step``."""

    step: int
    is_flush: bool
    works: tuple[dist.Work, ...]
    launched_at: float
    steps: int = 1  # optimizer steps in the round (the same on every rank): 0 for a flush right after a flush
    # CUDA events around the all-reduce on the communication stream (NCCL: the host never sees its completion).
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
    # Set by the backend's completion callback (gloo: the work really completed). A one-element list, so that the
    # callback holds only this list: a callback that held the ``_Pending`` (and so the works) would make a
    # reference cycle through C++ that Python never frees, and gloo's threads would then destroy the work, and its
    # tensors, during interpreter shutdown: the process aborts at exit.
    completion: list[float] = field(default_factory=list)


@dataclass
class _Timing:
    """A merged round whose wait and communication times are read once its CUDA events have completed."""

    comm: tuple[torch.cuda.Event, torch.cuda.Event]
    wait: tuple[torch.cuda.Event, torch.cuda.Event]


@dataclass
class _DeferredCheck:
    """A round's side channel, copied to the host without blocking and checked at the next merge (CUDA)."""

    pending: _Pending
    ready: torch.cuda.Event | None


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
            callback; CUDA: events around the all-reduce on the communication stream).
        staleness_steps: optimizer steps between each launch and its merge.
        last_wait_seconds, last_comm_seconds: the same, for the latest timed round.
        last_staleness_steps: the same, for the latest overlapped round.
        last_drift: ``‖R − G‖ / ‖G‖`` just before the merge, at the latest sync point that measured it (see
            [`HPSGDEngine.request_drift`][]), or ``None``. A 0-d tensor on the engine's device, so reading it
            is the only host sync it costs.
        bytes_per_round: payload bytes one rank puts on the HPSGD all-reduce per round (with
            ``hierarchy="node"``: its ``1/L`` share of the model, on the group across nodes).
        bytes_sent: the payload bytes of every all-reduce this rank launched, summed (the side channel excluded).
        promoted: frozen tensors found changed at a flush, and averaged in every round since.
        sync_every: ``H`` of the current round (with ``sync_every="auto"``, the latest agreed value).
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

    def to_dict(self) -> dict[str, Any]:
        """The counters as plain Python values (``last_drift`` as a float or ``None``)."""
        out = asdict(self)
        out["last_drift"] = None if self.last_drift is None else float(self.last_drift)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EngineStats:
        """The inverse of [`to_dict`][]; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        stats = cls(**{k: v for k, v in values.items() if k in known})
        if stats.last_drift is not None:
            stats.last_drift = torch.tensor(float(stats.last_drift))
        return stats


class HPSGDEngine:
    r"""Hierarchical Parallel SGD on a model's named tensors and a process group.

    State on every rank, named as in the rule (``docs/algorithm.md``):

    * ``R`` (``replica``): the tensors averaged in every round, updated in place: those named in ``averaged``
      (trainable parameters and floating-point buffers), and frozen tensors found changed (below).
    * ``G`` (``global_``): the sum of every average merged so far; equal on every rank.
    * ``S`` (``start``): the value of ``R`` right after the last sync point.
    * ``P`` (``pending``): an all-reduce that was launched and not yet merged, or ``None``.

    At a sync point (after every ``sync_every``-th optimizer step):

    .. math::

        \Delta &= R - S \\
        G &\leftarrow G + \tfrac{1}{W}\textstyle\sum_{w} P_w \quad \text{(if } P \text{ is pending; wait for it)} \\
        R &\leftarrow G + \Delta \ \text{(merge="replica")}
            \quad\text{or}\quad R \leftarrow G \ \text{(merge="stale")} \\
        S &\leftarrow R, \qquad P \leftarrow \text{all\_reduce\_async}(\Delta)

    A flush merges ``P``, runs a blocking all-reduce of the last ``Δ`` and sets ``R = S = G``, so every rank holds
    the same model and nothing is in flight. It then compares a 64-bit checksum of every floating-point tensor
    across ranks: a frozen tensor (one not in ``R``) that differs is averaged at once and joins ``R`` for every
    later round (an EMA teacher, say), and a tensor of ``R`` that differs raises [`RanksDivergedError`][]. Frozen
    tensors that do not change cost nothing per round.

    ``G``, ``S`` and the communication buffer are flat and preallocated, in fp32 or the widest dtype of ``R``. The
    all-reduce carries a small integer side channel (each rank's step, a non-finite flag and a stop request) so that
    every rank detects, at the same point, a NaN/inf change or ranks whose step counts diverged.

    Args:
        tensors: every tensor of the model's state by name (parameters and buffers, any dtype, on one device), or a
            sequence of tensors (named ``tensor{i}``). All are broadcast from rank 0 at construction.
        averaged: the names averaged in every round; floating-point only (default: every floating-point tensor).
            Other floating-point tensors are *frozen*: checked at every flush, and averaged from then on if they
            changed. Non-floating tensors (``num_batches_tracked``) are only broadcast at construction.
        group: the process group for the HPSGD collectives. Give it a group of its own so that other collectives
            never queue behind a pending round (default: the world).
        object_group: the group for the pickled structure check (a CPU/gloo group when ``group`` is NCCL; default:
            ``group``).
        sync_every: ``H``, optimizer steps per round (>= 1; default 1), or ``"auto"``: start at 1, and at every
            merge set ``H`` to the largest of the ranks' proposals. Each rank proposes the smallest ``H`` for which
            its measured all-reduce time fits in ``H`` steps of its measured compute with a margin of
            ``AUTO_MARGIN`` (moving averages of both), up to ``max_sync_every``. Every rank reads the same
            proposals at the same merge, so rounds end at the same steps everywhere; ``H`` changes only at a round
            boundary, and applies from the round that the merge starts.
        max_sync_every: the largest ``H`` that ``"auto"`` may choose (default 32).
        merge: ``"replica"`` (HPSGD: ``R ← G + Δ``) or ``"stale"`` (``R ← G``, the stale-gradient baseline).
        comm_dtype: dtype on the wire (``None``: full precision; bf16/fp16 compress, ``G`` stays fp32 or wider).
        outer_lr, outer_momentum, outer_nesterov: the outer optimizer. Every merge of a round that contained
            optimizer steps (at a sync point or a flush) adds ``U`` to ``G`` instead of the merged mean change
            ``ḡ``: ``M ← μ·M + ḡ``, then ``U = η·(ḡ + μ·M)`` (Nesterov, the default) or ``U = η·M``. ``M`` is
            flat, as wide as ``G``, the same on every rank, and part of [`state_dict`][]. The defaults (``η = 1``,
            ``μ = 0``) give ``U = ḡ``: plain HPSGD, bit for bit, with no extra buffer.
        timeout: with gloo, the longest a merge waits for the pending all-reduce before raising
            [`HPSGDCommunicationError`][] (default: the process group's own timeout). With NCCL the process
            group's timeout and watchdog apply instead, so that a merge never blocks the host.
        broadcast: whether to broadcast rank 0's values at construction (default ``True``). With ``False`` the
            caller promises that the tensors are already identical on every rank; the first flush checks it.
        nodes: ``hierarchy="node"``: the node's groups ([`NodeGroups`][]). The caller keeps node-mates identical
            (a synchronous gradient all-reduce inside each node), so their ``Δ`` are equal; each rank then
            all-reduces only its share (slice ``local_rank`` of ``L`` near-equal slices of the flat ``Δ``, and the
            side channel) on ``nodes.across``, and the merge all-gathers the node's shares over ``nodes.node``, so
            every rank adds the same full mean to ``G``. ``group`` still spans every rank (broadcast, checks at
            flushes). Default ``None``: flat HPSGD, every rank a worker.
        defer_checks: read each round's side channel one merge later, from a non-blocking copy, so that a sync
            point never blocks the host (default: on CUDA). Errors are still raised on every rank at the same
            merge, one round later; a non-finite round has then already reached ``G``, which is abandoned.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor] | Sequence[Tensor],
        averaged: Collection[str] | None = None,
        *,
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
        validate_options(
            sync_every,
            merge,
            max_sync_every=max_sync_every,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            outer_nesterov=outer_nesterov,
        )
        self.group = group
        self.object_group = object_group if object_group is not None else group
        self.auto = sync_every == "auto"
        # H of the current round. With "auto" it starts at 1 and follows the ranks' agreed proposal.
        self.sync_every: int = 1 if self.auto else int(sync_every)
        self.max_sync_every = max_sync_every
        self.merge = merge
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.outer_nesterov = outer_nesterov
        self.timeout = timeout
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.nodes = nodes
        if nodes is not None and nodes.local_size * nodes.num_nodes != self.world_size:
            raise ValueError(
                f"HPSGD: {nodes.num_nodes} nodes of {nodes.local_size} ranks do not make the group's"
                f" {self.world_size} ranks."
            )
        # The group of each round's all-reduce, and how many distinct changes it averages (workers, or nodes).
        self._round_group = nodes.across if nodes is not None else group
        self.num_workers = nodes.num_nodes if nodes is not None else self.world_size
        self._wire_dtype_option = resolve_comm_dtype(comm_dtype)
        self._promoted: set[str] = set()
        self._set_tensors(tensors, averaged)
        self.device = self.layout.device
        backend = dist.get_backend(group)
        # NCCL work completes on the GPU: its future completes at enqueue time and a wait with a timeout blocks
        # the host. Time it with CUDA events and let the process group's watchdog handle timeouts.
        self._nccl_like = self.device.type == "cuda" and backend != "gloo"
        self._comm_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self.defer_checks = self.device.type == "cuda" if defer_checks is None else defer_checks

        self._check_same_structure()
        if broadcast:
            broadcast_tensors(list(self._tensors.values()), src=self._src(), group=group)

        self.pending: _Pending | None = None
        self._abandoned: _Pending | None = None
        self._deferred: _DeferredCheck | None = None
        self._timings: deque[_Timing] = deque()
        self._last_wait_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._last_step: int | None = None
        # "auto": the step at or after which the current round ends (fixed H: every multiple of H).
        self._next_sync: int | None = None
        self._step_seconds: float | None = None  # moving averages for "auto"
        self._comm_seconds: float | None = None
        self._round_started: float | None = None
        self._round_steps = 0
        self._steps_unsent = 0  # optimizer steps since the last launch
        self._steps_since_flush = 0
        self._busy = False
        self._drift_requested = False
        self.aborted = False
        # Set at the merge that carried any rank's stop request: every rank learns it at the same merge.
        self.stop_requested = StopRequest(0)
        self._stop_to_send = StopRequest(0)
        self.stats = EngineStats(sync_every=self.sync_every)
        self._build_buffers({})
        log.debug(
            "HPSGDEngine: %d averaged and %d frozen tensors, %d elements, G in %s, wire in %s, world size %d",
            len(self.replica),
            len(self.frozen),
            self.layout.numel,
            self.layout.dtype,
            self.comm_dtype,
            self.world_size,
        )

    # ------------------------------------------------------------------ public API

    @property
    def needs_flush(self) -> bool:
        """Whether a round is in flight or an optimizer step was taken since the last flush (this rank's view)."""
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
        """The stop requests this rank has made ([`request_stop`][])."""
        return self._stop_to_send

    def on_optimizer_step(self, step: int) -> bool:
        """Record that optimizer step number ``step`` (1-based, as ``trainer.global_step`` counts) was taken.

        Runs a sync point when ``step`` reaches a new multiple of ``sync_every``. Step numbers may jump (a
        training loop that counts a batch whose optimizer step was skipped); a round ends at the first step at or
        past each multiple.

        Returns:
            Whether a sync point ran.
        """
        previous = step - 1 if self._last_step is None else self._last_step
        self._last_step = step
        self._steps_since_flush += 1
        self._round_steps += 1
        self._steps_unsent += 1
        if self.auto:
            if self._next_sync is None:
                self._next_sync = (previous // self.sync_every + 1) * self.sync_every
            if step < self._next_sync:
                return False
            self.sync_point(step)
            self._next_sync = step + self.sync_every  # H as agreed at this merge
            return True
        if step // self.sync_every <= previous // self.sync_every:
            return False
        self.sync_point(step)
        return True

    @torch.no_grad()
    def sync_point(self, step: int) -> None:
        """Steps 1-5 of the rule: merge the pending average, rebase ``R`` and launch this round's all-reduce."""
        with self._exclusive("sync point"):
            self._measure_step_time()
            if self._drift_requested:
                self._measure_drift()
            self._delta_into_start()
            pending = self.pending
            wait_seconds = self._merge_pending(defer=self.defer_checks)
            if pending is not None:
                self._record_round(pending, step, wait_seconds)
            self._launch(step, is_flush=False)  # the wire takes Δ from S; S is free again
            if self.merge == "replica":
                self.start.add_(self.global_)  # S ← G + Δ
            else:
                self.start.copy_(self.global_)
            self._write_replica_from_start()
            self._round_started = time.perf_counter()

    @torch.no_grad()
    def flush(self, step: int) -> None:
        """Leave every rank with ``R = S = G``, nothing in flight, and every floating-point tensor identical.

        A collective: every rank must call it at the same point. It always communicates, even when this rank took
        no step since the last flush, so that ranks whose step counts diverged get [`RanksOutOfStepError`][]
        instead of waiting for each other, and changes made outside optimizer steps (BatchNorm statistics from
        forward passes, an EMA teacher) are averaged too.

        Raises:
            RanksDivergedError: a tensor of ``R`` differs across ranks after the merge; names the first one.
        """
        with self._exclusive("flush"):
            self._delta_into_start()
            self._merge_pending(defer=False)
            self._launch(step, is_flush=True)
            self._merge_pending(defer=False)
            self.start.copy_(self.global_)
            self._write_replica_from_start()
            self._drain_timings(block=True)
            self._reconcile(step)
        self._steps_since_flush = 0
        self._round_started = None  # the time to the next sync point includes whatever followed the flush
        self.stats.flushes += 1

    @torch.no_grad()
    def follow(self, tensors: Mapping[str, Tensor], averaged: Collection[str], step: int) -> bool:
        """Track the model's tensors after user code replaced some of them or changed which are trainable.

        * The same names, shapes and dtypes, and the same ``averaged`` set: tensors replaced by new objects (SWA
          resetting BatchNorm statistics, ``module.weight = nn.Parameter(...)``, ``param.data = ...``) are followed
          in place, with no collective. Their new values count as a change within the current round.
        * Anything else (a tensor added or removed, a shape or dtype changed, a parameter frozen or unfrozen):
          a flush over the old tensors, then ``R``, ``S`` and ``G`` are rebuilt over the new ones, and every new
          tensor that differs across ranks is averaged. A collective: call it at the same point on every rank.

        Returns:
            Whether it rebuilt (and so communicated).
        """
        averaged = frozenset(averaged)
        names = list(tensors)
        same_layout = (
            names == list(self._tensors)
            and averaged == self._always
            and all(t.shape == self._tensors[n].shape and t.dtype == self._tensors[n].dtype for n, t in tensors.items())
        )
        # Replaced objects first, so that the flush counts their new values as this round's change.
        self._repoint({n: t for n, t in tensors.items() if _same_kind(t, self._tensors.get(n))})
        if same_layout:
            return False
        self.flush(step)
        with self._exclusive("rebuild"):
            known = {name: (tensor.shape, tensor.dtype) for name, tensor in self._tensors.items()}
            global_views = dict(zip(self.names, self._global_views))
            momentum_views = dict(zip(self.names, self._momentum_views))
            self._promoted &= set(tensors)
            self._set_tensors(tensors, averaged)
            self._check_same_structure()
            fresh = [n for n, t in self._tensors.items() if known.get(n) != (t.shape, t.dtype)]
            fresh_floating = [self._tensors[n] for n in fresh if self._tensors[n].is_floating_point()]
            if fresh_floating:
                flags = differs_across_ranks(checksums(fresh_floating), self.group)
                differing = [t for t, differs in zip(fresh_floating, flags) if differs]
                if differing:
                    average_tensors(differing, self.group)
            self._build_buffers(global_views, momentum_views)
        log.debug("HPSGDEngine: rebuilt over %d averaged and %d frozen tensors", len(self.replica), len(self.frozen))
        return True

    def request_drift(self) -> None:
        """Measure ``‖R − G‖ / ‖G‖`` at the next sync point (two extra passes over the model, on that round only)."""
        self._drift_requested = True

    def abandon(self) -> None:
        """Give up after an error: drop the pending all-reduce without waiting and refuse further collectives.

        No collective runs here, since the error may have hit one rank only and the others may never answer.
        """
        if self.pending is not None:
            log.debug("HPSGDEngine: abandoning the all-reduce of step %d", self.pending.step)
            # Keep the work (and through it the buffers) alive: the backend may still be writing into them.
            self._abandoned = self.pending
        self.pending = None
        self.aborted = True

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
            for name, tensor, view in zip(self.names, self.replica, self._global_views)
            if tensor.dtype != self.layout.dtype
        }
        state: dict[str, Any] = {"global": narrow, "promoted": sorted(self._promoted), "stats": self.stats.to_dict()}
        if self._momentum is not None:
            state["outer_momentum"] = {n: v.detach().cpu().clone() for n, v in zip(self.names, self._momentum_views)}
        if self.auto:
            state["sync_every"] = {"current": self.sync_every, "next_sync": self._next_sync}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict`][] output right after construction (every rank loads the same state).

        ``G`` is restored only for tensors whose saved value still rounds to the current replica, so that stale
        values (the model was changed since) are never brought back.
        """
        promoted = set(state.get("promoted", ())) & set(self._tensors)
        if promoted - self._promoted:
            self._promoted |= promoted
            self._set_tensors(self._tensors, self._always)
            self._build_buffers({})
        restored = 0
        for name, tensor, view in zip(self.names, self.replica, self._global_views):
            saved = state.get("global", {}).get(name)
            if saved is None or saved.shape != view.shape:
                continue
            saved = saved.to(device=view.device, dtype=view.dtype)
            if torch.equal(saved.to(tensor.dtype), tensor):
                view.copy_(saved)
                restored += 1
        if "stats" in state:
            self.stats = EngineStats.from_dict(state["stats"])
            self.stats.bytes_per_round = self._wire_share.numel() * self._wire_share.element_size()
        if self._momentum is not None:
            self._copy_by_name(state.get("outer_momentum", {}), self._momentum_views)
        if self.auto and state.get("sync_every"):
            self.sync_every = min(int(state["sync_every"]["current"]), self.max_sync_every)
            self._next_sync = state["sync_every"]["next_sync"]
        self.stats.sync_every = self.sync_every
        log.debug("HPSGDEngine: loaded state (G of %d tensors, %d promoted)", restored, len(promoted))

    # ------------------------------------------------------------------ tensors and buffers

    def _copy_by_name(self, values: Mapping[str, Tensor], views: Sequence[Tensor]) -> None:
        for name, view in zip(self.names, views):
            saved = values.get(name)
            if saved is not None and saved.shape == view.shape:
                view.copy_(saved)

    def _set_tensors(self, tensors: Mapping[str, Tensor] | Sequence[Tensor], averaged: Collection[str] | None) -> None:
        if not isinstance(tensors, Mapping):
            tensors = {f"tensor{i}": t for i, t in enumerate(tensors)}
        self._tensors: dict[str, Tensor] = {name: t.detach() for name, t in tensors.items()}
        floating = {name for name, t in self._tensors.items() if t.is_floating_point()}
        always = frozenset(floating if averaged is None else averaged)
        unknown = sorted(always - set(self._tensors))
        if unknown:
            raise ValueError(f"averaged names {unknown} that are not among the tensors.")
        for name in sorted(always - floating):
            raise ValueError(
                f"HPSGD averages floating-point tensors only; {name!r} has dtype {self._tensors[name].dtype}. Leave"
                " it out of `averaged`: it is broadcast at setup and stays local after that."
            )
        self._always = always
        averaged_now = always | self._promoted
        self.names = [n for n in self._tensors if n in averaged_now]
        self.replica = [self._tensors[n] for n in self.names]
        self.frozen_names = [n for n in floating if n not in averaged_now]
        self.frozen_names.sort(key=list(self._tensors).index)
        self.frozen = [self._tensors[n] for n in self.frozen_names]
        if not self.replica:
            raise ValueError("HPSGD found no tensor to average: give it at least one trainable floating-point tensor.")
        self.layout = FlatLayout(self.replica, accumulation_dtype(self.replica))
        # Whether some tensor of R is narrower than G (bf16-true), so that G holds bits R cannot. Set once per
        # layout: a replaced tensor keeps its dtype, and anything else rebuilds the layout.
        self.replica_is_narrow = any(t.dtype != self.layout.dtype for t in self.replica)

    def _build_buffers(
        self, global_values: Mapping[str, Tensor], momentum_values: Mapping[str, Tensor] | None = None
    ) -> None:
        """(Re)allocate G, S, the wire (and M) for the current layout. ``G`` starts from ``R``, or from
        ``global_values`` where a saved value still rounds to the replica (the extra bits of a narrow replica survive
        a rebuild); ``M`` from ``momentum_values`` by name, 0 for new tensors."""
        wire_dtype = self._wire_dtype_option or self.layout.dtype
        self.compressed = torch.finfo(wire_dtype).bits < torch.finfo(self.layout.dtype).bits
        self.comm_dtype = wire_dtype if self.compressed else self.layout.dtype
        # A compressed wire carries Δ / W (so the sum cannot overflow where the mean would not); a full-precision
        # wire carries Δ and the merge divides the sum by W, as the rule writes it. (W: workers, or nodes.)
        self._merge_scale = 1.0 if self.compressed else 1.0 / self.num_workers
        self.global_ = self.layout.new_buffer()
        self.start = self.layout.new_buffer()
        # The outer momentum M: only when used, so that the defaults keep three buffers. New tensors start at 0.
        self._momentum = self.layout.new_buffer().zero_() if self.outer_momentum > 0 else None
        self._momentum_views = self.layout.views(self._momentum) if self._momentum is not None else []
        with torch.no_grad():
            self._copy_by_name(momentum_values or {}, self._momentum_views)
        self._start_views = self.layout.views(self.start)
        self._global_views = self.layout.views(self.global_)
        # Three flat buffers in all: G, S (which holds Δ during a sync point) and the wire. A full-precision wire
        # also carries the side channel in a tail of 5W values (exact integers in fp32/fp64), so a round is a single
        # all-reduce; a compressed one cannot hold them exactly, and sends them in a separate int64 all-reduce.
        # With nodes, the wire carries this rank's share of Δ (slice `local_rank` of L; the last one zero-padded),
        # and a fourth buffer receives the node's merged shares.
        local_size = self.nodes.local_size if self.nodes is not None else 1
        local_rank = self.nodes.local_rank if self.nodes is not None else 0
        share = -(-self.layout.numel // local_size)
        numel = self.layout.numel
        self._share_range = (min(local_rank * share, numel), min((local_rank + 1) * share, numel))
        self._packed = not self.compressed
        tail = _META_FIELDS * self.world_size
        self._wire = torch.zeros(share + (tail if self._packed else 0), dtype=self.comm_dtype, device=self.device)
        self._wire_share = self._wire[:share]
        self._wire_meta = (
            self._wire[share:] if self._packed else torch.zeros(tail, dtype=torch.int64, device=self.device)
        )
        self._gather = local_size > 1
        if self._gather:
            self._gathered = torch.zeros(local_size, share, dtype=self.comm_dtype, device=self.device)
            self._payload = self._gathered.view(-1)[: self.layout.numel]
            self._gathered_meta = torch.zeros(local_size, tail, dtype=self._wire_meta.dtype, device=self.device)
            self._meta = torch.zeros(tail, dtype=self._wire_meta.dtype, device=self.device)
        else:
            self._payload = self._wire_share
            self._meta = self._wire_meta
        pin = self.device.type == "cuda"
        self._meta_host = torch.zeros(self._meta.shape, dtype=self._meta.dtype, pin_memory=pin)
        self._finite_host = torch.ones((), dtype=torch.bool, pin_memory=pin)
        self.stats.bytes_per_round = self._wire_share.numel() * self._wire_share.element_size()
        self.stats.promoted = len(self._promoted)
        with torch.no_grad():
            torch._foreach_copy_(self._start_views, self.replica)
            self.global_.copy_(self.start)
            for name, tensor, view in zip(self.names, self.replica, self._global_views):
                saved = global_values.get(name)
                if saved is not None and saved.shape == view.shape and torch.equal(saved.to(tensor.dtype), tensor):
                    view.copy_(saved)

    def _repoint(self, tensors: Mapping[str, Tensor]) -> None:
        """Follow tensors replaced by new objects of the same shape and dtype (no collective)."""
        for name, tensor in tensors.items():
            if tensor.data_ptr() != self._tensors[name].data_ptr():
                log.debug("HPSGDEngine: following the new tensor behind %r", name)
                self._tensors[name] = tensor.detach()
        self.replica = [self._tensors[n] for n in self.names]
        self.frozen = [self._tensors[n] for n in self.frozen_names]

    def _check_same_structure(self) -> None:
        """Raise on every rank, naming the first difference, if ranks hold tensors of different names or shapes."""
        signature = [(name, tuple(t.shape), str(t.dtype), name in self.names) for name, t in self._tensors.items()]
        digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
        code = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=self.device)
        if not differs_across_ranks(code, self.group)[0]:
            return
        signatures: list[Any] = [None] * self.world_size
        dist.all_gather_object(signatures, signature, group=self.object_group)
        reference = signatures[0]
        for rank, other in enumerate(signatures[1:], start=1):
            for i in range(max(len(reference), len(other))):
                ours = reference[i] if i < len(reference) else None
                theirs = other[i] if i < len(other) else None
                if ours != theirs:
                    raise ValueError(
                        "HPSGD: ranks hold different models, so their tensors cannot be averaged. First difference,"
                        f" at tensor #{i}: rank 0 has {_describe(ours)}, rank {rank} has {_describe(theirs)}. Build"
                        " the same model on every rank (same architecture, dtype and frozen parameters)."
                    )

    # ------------------------------------------------------------------ the rule's steps

    def _delta_into_start(self) -> None:
        """``S ← R − S``: until the launch copies it to the wire, S holds this round's Δ."""
        self.start.neg_()
        torch._foreach_add_(self._start_views, self.replica)

    def _write_replica_from_start(self) -> None:
        torch._foreach_copy_(self.replica, self._start_views)
        if self.replica_is_narrow:
            # Writing G + Δ into a narrow R rounds it: S must be re-read from R for Δ to measure only the
            # optimizer's progress.
            torch._foreach_copy_(self._start_views, self.replica)

    def _reconcile(self, step: int) -> None:
        """After a flush: every floating-point tensor must be identical on every rank (one int64 all-reduce).

        A frozen tensor that differs was changed outside the optimizer (an EMA teacher, SWA): average it now and
        average it in every round from now on. A tensor of ``R`` that differs means the model is not what the
        engine wrote: raise, naming it.
        """
        if self.world_size == 1:
            return
        tensors = self.replica + self.frozen
        try:
            flags = differs_across_ranks(checksums(tensors), self.group)
        except RuntimeError as err:
            self.aborted = True
            raise self._communication_error("the check after the flush", err) from err
        diverged = [name for name, differs in zip(self.names, flags) if differs]
        if diverged:
            self.aborted = True
            raise RanksDivergedError(
                f"HPSGD: right after the flush at optimizer step {step}, {len(diverged)} averaged tensor(s) differ"
                f" between ranks, first"
                f" {diverged[0]!r}. Something changed the model behind HPSGD's back between its write and this check"
                " (another thread or CUDA stream writing into the module), or the ranks were not started from the"
                " same weights. Stop that writer, and resume from the last checkpoint."
            )
        changed = [(n, t) for n, t, differs in zip(self.frozen_names, self.frozen, flags[len(self.names) :]) if differs]
        if not changed:
            return
        average_tensors([t for _, t in changed], self.group)
        self._promoted |= {n for n, _ in changed}
        log.info(
            "HPSGD: %d frozen tensor(s) changed outside the optimizer and differed between ranks (first %r): averaged"
            " now, and in every round from now on",
            len(changed),
            changed[0][0],
        )
        global_views = dict(zip(self.names, self._global_views))
        momentum_views = dict(zip(self.names, self._momentum_views))
        self._set_tensors(self._tensors, self._always)
        self._build_buffers(global_views, momentum_views)

    def _measure_step_time(self) -> None:
        """``"auto"``: the compute time per optimizer step since the last sync point (a moving average)."""
        if self._round_started is not None and self._round_steps > 0:
            per_step = (time.perf_counter() - self._round_started) / self._round_steps
            self._step_seconds = _smooth(self._step_seconds, per_step)
        self._round_steps = 0

    def _proposal(self) -> int:
        """``"auto"``: the smallest H for which one all-reduce fits in H steps of compute, with the margin."""
        if not self.auto or self._step_seconds is None or self._comm_seconds is None:
            return self.sync_every
        wanted = math.ceil(AUTO_MARGIN * self._comm_seconds / max(self._step_seconds, 1e-9))
        return min(max(wanted, 1), self.max_sync_every)

    def _measure_drift(self) -> None:
        # One tensor at a time, so the scratch is the largest tensor, not a flat copy of the model.
        self._drift_requested = False
        squares = torch.zeros((), dtype=self.layout.dtype, device=self.device)
        for replica, global_ in zip(self.replica, self._global_views):
            squares += torch.sub(replica, global_).square().sum(dtype=self.layout.dtype)
        self.stats.last_drift = squares.sqrt() / torch.linalg.vector_norm(self.global_).clamp_min(
            torch.finfo(self.layout.dtype).tiny
        )

    def _record_round(self, pending: _Pending, step: int, wait_seconds: float) -> None:
        stats = self.stats
        stats.overlapped_rounds += 1
        stats.last_staleness_steps = step - pending.step
        stats.staleness_steps += stats.last_staleness_steps
        if self._last_wait_events is not None and pending.events is not None:
            self._timings.append(_Timing(comm=pending.events, wait=self._last_wait_events))
            self._drain_timings(block=False)
            return
        completed = pending.completion[0] if pending.completion else time.perf_counter()
        self._add_timing(wait_seconds, max(0.0, completed - pending.launched_at))

    def _add_timing(self, wait_seconds: float, comm_seconds: float) -> None:
        self._comm_seconds = _smooth(self._comm_seconds, comm_seconds)
        stats = self.stats
        stats.timed_rounds += 1
        stats.last_wait_seconds = wait_seconds
        stats.last_comm_seconds = comm_seconds
        stats.wait_seconds += wait_seconds
        stats.comm_seconds += comm_seconds

    def _drain_timings(self, block: bool) -> None:
        """Add the times of merged rounds whose CUDA events completed (all of them when ``block``)."""
        while self._timings:
            timing = self._timings[0]
            if block:
                timing.wait[1].synchronize()
            elif not (timing.wait[1].query() and timing.comm[1].query()):
                return
            self._timings.popleft()
            comm = timing.comm[0].elapsed_time(timing.comm[1]) / 1000
            wait = timing.wait[0].elapsed_time(timing.wait[1]) / 1000
            self._add_timing(wait, comm)

    def _launch(self, step: int, is_flush: bool) -> None:
        """Put S's Δ (or Δ / W on a compressed wire) and this rank's side channel on the wire; start the all-reduce."""
        begin, end = self._share_range
        share = self._wire_share[: end - begin]
        if self.compressed:
            torch.mul(self.start[begin:end], 1.0 / self.num_workers, out=share)
        else:
            share.copy_(self.start[begin:end])
        code = 2 * step + int(is_flush)
        w, r = self.world_size, self.rank
        meta = self._wire_meta
        meta.zero_()
        meta[r] = code >> _CODE_BITS
        meta[w + r] = code & ((1 << _CODE_BITS) - 1)
        meta[3 * w + r] = int(self._stop_to_send)
        meta[4 * w + r] = self._proposal()
        meta[2 * w + r] = torch.logical_not(torch.isfinite(share.sum(dtype=self.layout.dtype)))
        self.stats.bytes_sent += self.stats.bytes_per_round
        stream_ctx = nullcontext()
        events = None
        if self._comm_stream is not None:
            # Wire and side channel were written on the compute stream: the side stream starts after that work,
            # and the compute stream goes on with the next steps while the all-reduce runs.
            self._comm_stream.wait_stream(torch.cuda.current_stream(self.device))
            stream_ctx = torch.cuda.stream(self._comm_stream)
            if self._nccl_like and not is_flush:
                events = (_timing_event(), _timing_event())
        with stream_ctx:
            if events is not None:
                events[0].record()
            works: tuple[dist.Work, ...] = (dist.all_reduce(self._wire, group=self._round_group, async_op=True),)
            if not self._packed:
                works += (dist.all_reduce(self._wire_meta, group=self._round_group, async_op=True),)
            if events is not None:
                events[1].record()
        pending = _Pending(
            step=step,
            is_flush=is_flush,
            works=works,
            launched_at=time.perf_counter(),
            steps=self._steps_unsent,
            events=events,
        )
        self._steps_unsent = 0
        if not is_flush and events is None:
            completion = pending.completion
            works[0].get_future().add_done_callback(lambda _: completion.append(time.perf_counter()))
        self.pending = pending

    def _merge_pending(self, defer: bool) -> float:
        """Wait for ``P``, check its side channel and set ``G ← G + mean(P)``. Returns the host seconds waited.

        With ``defer``, this round's side channel is copied to the host without blocking and checked at the next
        merge, and the previous round's is checked now.
        """
        self._last_wait_events = None
        pending = self.pending
        if pending is None:
            self._check_deferred()
            return 0.0
        self.pending = None
        started = time.perf_counter()
        try:
            for work in pending.works:
                # NCCL: only orders the streams. Gloo: blocks the host, and raises after the timeout.
                if self.timeout is None or self._nccl_like:
                    work.wait()
                else:
                    work.wait(self.timeout)
            if self._comm_stream is not None:
                current = torch.cuda.current_stream(self.device)
                if self._nccl_like and not pending.is_flush:
                    self._last_wait_events = (_timing_event(), _timing_event())
                    self._last_wait_events[0].record(current)
                current.wait_stream(self._comm_stream)
                if self._last_wait_events is not None:
                    self._last_wait_events[1].record(current)
            if self._gather:
                self._gather_node_shares()
            waited = time.perf_counter() - started
            self._check_deferred()
            if defer:
                self._meta_host.copy_(self._meta, non_blocking=True)
                if self.compressed:
                    finite_flag = torch.isfinite(self._payload.sum(dtype=self.layout.dtype))
                    self._finite_host.copy_(finite_flag, non_blocking=True)
                ready = torch.cuda.Event() if self.device.type == "cuda" else None
                if ready is not None:
                    ready.record()
                self._deferred = _DeferredCheck(pending, ready)
            else:
                meta = [int(v) for v in self._meta.tolist()]
                # A narrow wire can overflow in the sum although every rank's part was finite; a full-precision one
                # (fp32 range or wider) cannot in practice, so it skips this extra pass.
                finite = not self.compressed or bool(torch.isfinite(self._payload.sum(dtype=self.layout.dtype)))
        except HPSGDError:
            raise  # the previous round's deferred check
        except RuntimeError as err:
            self.aborted = True
            what = f"the all-reduce of the round that ended at optimizer step {pending.step}"
            raise self._communication_error(what, err) from err
        if not defer:
            self._check_meta(meta, finite, pending, merged=False)
        self._add_to_global(outer=pending.steps > 0)
        self.stats.rounds += 1
        return waited

    def _gather_node_shares(self) -> None:
        """``hierarchy="node"``: every rank of the node receives the node's merged shares and side channels (each
        side channel holds the fields of the ranks with its local rank; their sum holds every rank's)."""
        assert self.nodes is not None
        dist.all_gather(list(self._gathered.unbind(0)), self._wire_share, group=self.nodes.node)
        dist.all_gather(list(self._gathered_meta.unbind(0)), self._wire_meta, group=self.nodes.node)
        torch.sum(self._gathered_meta, dim=0, out=self._meta)

    def _add_to_global(self, outer: bool) -> None:
        """``G ← G + U``: ``U`` is the outer optimizer's step on ``ḡ``, the merged mean change on the wire.

        Only a round that contained optimizer steps takes an outer step: a flush right after a flush (validation,
        then a checkpoint, then the end of fit) adds its ``ḡ`` (zero, or changes made outside the optimizer) as it
        is, so that how often a run flushes never moves the model.
        """
        mean_scale = self._merge_scale  # ḡ = mean_scale * wire
        if not outer:
            self.global_.add_(self._payload, alpha=mean_scale)
            return
        if self._momentum is None:
            # η = 1 is plain HPSGD, bit for bit.
            alpha = mean_scale if self.outer_lr == 1.0 else mean_scale * self.outer_lr
            self.global_.add_(self._payload, alpha=alpha)
            return
        mu, lr = self.outer_momentum, self.outer_lr
        self._momentum.mul_(mu).add_(self._payload, alpha=mean_scale)  # M ← μ·M + ḡ
        if self.outer_nesterov:
            self.global_.add_(self._payload, alpha=lr * mean_scale).add_(self._momentum, alpha=lr * mu)
        else:
            self.global_.add_(self._momentum, alpha=lr)

    # ------------------------------------------------------------------ checks

    def _check_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        if deferred.ready is not None:
            deferred.ready.synchronize()  # copied a round ago: long complete
        meta = [int(v) for v in self._meta_host.tolist()]
        self._check_meta(meta, bool(self._finite_host), deferred.pending, merged=True)

    def _check_meta(self, meta: list[int], reduced_finite: bool, pending: _Pending, merged: bool) -> None:
        w = self.world_size
        codes = [(high << _CODE_BITS) + low for high, low in zip(meta[:w], meta[w : 2 * w])]
        if len(set(codes)) != 1:
            self.aborted = True
            seen = ", ".join(
                f"rank {r}: {'flush' if c % 2 else 'sync point'} at step {c // 2}" for r, c in enumerate(codes)
            )
            raise RanksOutOfStepError(
                f"HPSGD: ranks reached the all-reduce at different points ({seen}). Every rank must take the same"
                " number of optimizer steps: with manual optimization, call `optimizer.step()` under the same"
                " conditions on every rank, and give every rank the same number of batches."
            )
        for flags in meta[3 * w : 4 * w]:
            self.stop_requested |= StopRequest(flags)
        if self.auto:
            agreed = min(max(meta[4 * w : 5 * w]), self.max_sync_every)
            if agreed != self.sync_every:
                log.debug("HPSGDEngine: sync_every %d -> %d after step %d", self.sync_every, agreed, pending.step)
            self.sync_every = self.stats.sync_every = agreed
        bad_ranks = [r for r, flag in enumerate(meta[2 * w : 3 * w]) if flag]
        if bad_ranks or not reduced_finite:
            self.aborted = True
            source_buffer = self.global_ if merged else self._payload
            bad = (~torch.isfinite(source_buffer)).nonzero()
            where = self.names[self.layout.index_of(int(bad[0]))] if bad.numel() else "(unknown)"
            kind = "round" if not pending.is_flush else "flush"
            source = (
                f"from rank(s) {bad_ranks}"
                if bad_ranks
                else f"from the sum over ranks, which overflowed the {self.comm_dtype} wire"
            )
            fate = (
                "It reached the global model before the check (checks are deferred on this device), which is"
                " abandoned: no flush or checkpoint will use it."
                if merged
                else "It was not merged into the global model."
            )
            raise NonFiniteUpdateError(
                f"HPSGD: a non-finite update (NaN or inf) {source} in the {kind} that ended at optimizer step"
                f" {pending.step}, first in parameter {where!r}. {fate} Lower the learning rate, clip gradients"
                " (Trainer(gradient_clip_val=...)), or check the data of that step; with comm_dtype=float16, values"
                " beyond ±65504 overflow, so try bfloat16."
            )

    def _communication_error(self, what: str, err: BaseException) -> HPSGDCommunicationError:
        return HPSGDCommunicationError(
            f"HPSGD: {what} failed on rank {self.rank}: {err}. A peer process probably died, hung past the process"
            " group timeout, or lost its network. Check the other ranks' logs; resume from the last checkpoint."
        )

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

    def _src(self) -> int:
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0


def _smooth(average: float | None, value: float) -> float:
    return value if average is None else average + _AUTO_SMOOTHING * (value - average)


def _same_kind(tensor: Tensor, other: Tensor | None) -> bool:
    return other is not None and tensor.shape == other.shape and tensor.dtype == other.dtype


def _timing_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def _describe(entry: tuple | None) -> str:
    if entry is None:
        return "no tensor"
    name, shape, dtype, averaged = entry
    return f"{name!r} shape={list(shape)} dtype={dtype} averaged={averaged}"
