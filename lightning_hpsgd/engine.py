"""The HPSGD rule of ``HPSGD.md`` on a list of tensors and a process group.

This module imports only torch and torch.distributed, so it can be used (and tested) without a training framework.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hpsgd.tensor_utils import FlatLayout, accumulation_dtype, broadcast_tensors

log = logging.getLogger(__name__)

MergeMode = Literal["replica", "stale"]
MERGE_MODES: tuple[str, ...] = ("replica", "stale")
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
    """A worker's change Δ held NaN or inf; it was stopped before reaching the global model."""


class RanksOutOfStepError(HPSGDError):
    """Ranks reached an HPSGD collective at different optimizer steps (their step counts diverged)."""


class HPSGDCommunicationError(HPSGDError):
    """An HPSGD all-reduce failed: a peer died, hung past the timeout, or the network broke."""


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


def validate_options(sync_every: object, merge: object) -> None:
    """Raise a ``ValueError`` naming the accepted values if ``sync_every`` or ``merge`` is invalid."""
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1 (optimizer steps per round); received {sync_every!r}.")
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {list(MERGE_MODES)}; received {merge!r}.")


# The side channel: 4 fields of W slots (step code high bits, low bits, non-finite flag, stop request).
_META_FIELDS = 4
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
    # Set by the backend's completion callback. A one-element list, so that the callback holds only this list: a
    # callback that held the ``_Pending`` (and so the works) would make a reference cycle through C++ that Python
    # never frees, and gloo's threads would then destroy the work, and its tensors, during interpreter shutdown:
    # the process aborts at exit ("terminate called without an active exception").
    completion: list[float] = field(default_factory=list)

    @property
    def completed_at(self) -> float | None:
        return self.completion[0] if self.completion else None


@dataclass
class EngineStats:
    """What the engine measured; the figures grow over a run.

    Attributes:
        rounds: all-reduces merged (sync points and flushes).
        flushes: blocking all-reduces run by ``flush``.
        overlapped_rounds: rounds merged at a sync point, i.e. launched at one sync point and merged at the next.
            The sums below are over these rounds.
        wait_seconds: host seconds the sync points spent waiting for the pending all-reduce.
        comm_seconds: seconds from each launch to the backend's completion of the all-reduce.
        staleness_steps: optimizer steps between each launch and its merge.
        last_wait_seconds, last_comm_seconds, last_staleness_steps: the same, for the latest overlapped round.
        last_drift: ``‖R − G‖ / ‖G‖`` just before the merge, at the latest sync point that measured it (see
            :meth:`HPSGDEngine.request_drift`), or ``None``. A 0-d tensor on the engine's device, so reading it
            is the only host sync it costs.
        bytes_per_round: payload bytes of one all-reduce, per rank.
    """

    rounds: int = 0
    flushes: int = 0
    overlapped_rounds: int = 0
    wait_seconds: float = 0.0
    comm_seconds: float = 0.0
    staleness_steps: int = 0
    last_wait_seconds: float = 0.0
    last_comm_seconds: float = 0.0
    last_staleness_steps: int = 0
    last_drift: Tensor | None = None
    bytes_per_round: int = 0


class HPSGDEngine:
    r"""Hierarchical Parallel SGD on a list of tensors (the replica ``R``) and a process group.

    State on every rank, named as in ``HPSGD.md``:

    * ``R`` (``replica``): the tensors the optimizer updates (parameters and floating-point buffers).
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
    the same model and nothing is in flight.

    ``G``, ``S`` and the communication buffers are flat and preallocated, in fp32 or the widest dtype of ``R``. The
    all-reduce carries a small integer side channel (each rank's step and a non-finite flag) so that every rank
    detects, at the same point, a NaN/inf change or ranks whose step counts diverged.

    Args:
        replica: the tensors to average, all floating-point and on one device. They are updated in place.
        names: one name per tensor, used in error messages and by :meth:`global_state` (default: ``tensor{i}``).
        group: the process group for the HPSGD all-reduce. Give it a group of its own so that other collectives
            never queue behind a pending round (default: the world).
        sync_every: ``H``, optimizer steps per round (>= 1; default 1).
        merge: ``"replica"`` (HPSGD: ``R ← G + Δ``) or ``"stale"`` (``R ← G``, the stale-gradient baseline).
        comm_dtype: dtype on the wire (``None``: full precision; bf16/fp16 compress, ``G`` stays fp32 or wider).
        timeout: the longest a merge waits for the pending all-reduce before raising
            :class:`HPSGDCommunicationError` (default: the process group's own timeout).
        broadcast_extra: tensors that are not averaged but must start equal (frozen parameters, integer buffers);
            broadcast from rank 0 at construction together with ``replica``.
        broadcast: whether to broadcast rank 0's values at construction (default ``True``). Set ``False`` only if
            the caller has already made ``replica`` identical on every rank.
    """

    def __init__(
        self,
        replica: Sequence[Tensor],
        names: Sequence[str] | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        sync_every: int = 1,
        merge: MergeMode = "replica",
        comm_dtype: str | torch.dtype | None = None,
        timeout: timedelta | None = None,
        broadcast_extra: Sequence[Tensor] = (),
        broadcast: bool = True,
    ) -> None:
        validate_options(sync_every, merge)
        self.replica = [t.detach() for t in replica]
        self.names = list(names) if names is not None else [f"tensor{i}" for i in range(len(self.replica))]
        if len(self.names) != len(self.replica):
            raise ValueError(f"Got {len(self.names)} names for {len(self.replica)} tensors.")
        for name, tensor in zip(self.names, self.replica):
            if not tensor.is_floating_point():
                raise ValueError(
                    f"HPSGD averages floating-point tensors only; {name!r} has dtype {tensor.dtype}. Leave integer"
                    " tensors out of `replica` (pass them as `broadcast_extra`)."
                )
        self.group = group
        self.sync_every = sync_every
        self.merge = merge
        self.timeout = timeout
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

        self.layout = FlatLayout(self.replica, accumulation_dtype(self.replica))
        self.device = self.layout.device
        wire_dtype = resolve_comm_dtype(comm_dtype) or self.layout.dtype
        self.compressed = torch.finfo(wire_dtype).bits < torch.finfo(self.layout.dtype).bits
        self.comm_dtype = wire_dtype if self.compressed else self.layout.dtype
        # A compressed wire carries Δ / W (so the sum cannot overflow where the mean would not); a full-precision
        # wire carries Δ and the merge divides the sum by W, as HPSGD.md writes it.
        self._merge_scale = 1.0 if self.compressed else 1.0 / self.world_size
        # When R is stored in a narrower dtype than G (bf16-true), writing G + Δ into R rounds it, so S must be
        # re-read from R for Δ to measure only the optimizer's progress.
        self.replica_is_narrow = any(t.dtype != self.layout.dtype for t in self.replica)

        if broadcast:
            broadcast_tensors(self.replica + [t.detach() for t in broadcast_extra], src=self._src(), group=group)

        self.global_ = self.layout.new_buffer()
        self.start = self.layout.new_buffer()
        self._start_views = self.layout.views(self.start)
        self._global_views = self.layout.views(self.global_)
        # Three flat buffers in all: G, S (which holds Δ during a sync point) and the wire. A full-precision wire
        # also carries the side channel in a tail of 4W values (exact integers in fp32/fp64), so a round is a single
        # all-reduce; a compressed one cannot hold them exactly, and sends them in a separate int64 all-reduce.
        self._packed = not self.compressed
        tail = _META_FIELDS * self.world_size if self._packed else 0
        self._wire = torch.zeros(self.layout.numel + tail, dtype=self.comm_dtype, device=self.device)
        self._payload = self._wire[: self.layout.numel]
        # Side channel, summed across ranks, each rank writing only its own slot of each field: the step code (in
        # two 12-bit halves, exact in fp32), the non-finite flag and the stop request.
        self._meta = (
            self._wire[self.layout.numel :]
            if self._packed
            else torch.zeros(_META_FIELDS * self.world_size, dtype=torch.int64, device=self.device)
        )
        self._comm_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self.pending: _Pending | None = None
        self._abandoned: _Pending | None = None
        self._last_step: int | None = None
        self._steps_since_flush = 0
        self._busy = False
        self._drift_requested = False
        self.aborted = False
        # Set at the merge that carried any rank's stop request: every rank learns it at the same merge.
        self.stop_requested = StopRequest(0)
        self._stop_to_send = StopRequest(0)
        self.stats = EngineStats(bytes_per_round=self._payload.numel() * self._payload.element_size())

        with torch.no_grad():
            torch._foreach_copy_(self._start_views, self.replica)
            self.global_.copy_(self.start)
        log.debug(
            "HPSGDEngine: %d tensors, %d elements, G in %s, wire in %s, world size %d",
            len(self.replica),
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
        """Ask every rank to stop: sent with this rank's next round or flush; see :attr:`stop_requested`.

        No collective of its own, so it is safe from a signal handler. Every rank sees the union of all ranks'
        requests in ``stop_requested`` after the same merge, up to two rounds later (the launch at the next sync
        point, then its merge).
        """
        self._stop_to_send |= reason

    @property
    def stop_sent(self) -> StopRequest:
        """The stop requests this rank has made (:meth:`request_stop`)."""
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
        if step // self.sync_every <= previous // self.sync_every:
            return False
        self.sync_point(step)
        return True

    @torch.no_grad()
    def sync_point(self, step: int) -> None:
        """Steps 1-5 of the rule: merge the pending average, rebase ``R`` and launch this round's all-reduce."""
        with self._exclusive("sync point"):
            if self._drift_requested:
                self._measure_drift()
            self._delta_into_start()
            pending = self.pending
            wait_seconds = self._merge_pending()
            if pending is not None:
                self._record_round(pending, step, wait_seconds)
            self._launch(step, is_flush=False)  # the wire takes Δ from S; S is free again
            if self.merge == "replica":
                self.start.add_(self.global_)  # S ← G + Δ
            else:
                self.start.copy_(self.global_)
            self._write_replica_from_start()

    @torch.no_grad()
    def flush(self, step: int) -> None:
        """Leave every rank with ``R = S = G`` and nothing in flight (a blocking all-reduce of the last ``Δ``).

        A collective: every rank must call it at the same point. It always communicates, even when this rank took
        no step since the last flush, so that ranks whose step counts diverged get :class:`RanksOutOfStepError`
        instead of waiting for each other, and changes made outside optimizer steps (BatchNorm statistics from
        forward passes) are averaged too.
        """
        with self._exclusive("flush"):
            self._delta_into_start()
            self._merge_pending()
            self._launch(step, is_flush=True)
            self._merge_pending()
            self.start.copy_(self.global_)
            self._write_replica_from_start()
        self._steps_since_flush = 0
        self.stats.flushes += 1

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

    def global_state(self) -> dict[str, Tensor]:
        """``G`` by tensor name, as CPU copies: what a flushed narrow replica (bf16) cannot hold by itself."""
        return {name: view.detach().cpu().clone() for name, view in zip(self.names, self.layout.views(self.global_))}

    @torch.no_grad()
    def load_global_state(self, state: Mapping[str, Tensor]) -> int:
        """Set ``G`` from :meth:`global_state` output, for the names present in both with the same shape.

        Call it right after construction (or a flush). It restores only ``G``'s extra precision: it is meant for
        values whose rounding to the replica's dtype equals the replica, and it leaves ``R`` and ``S`` as they are.

        Returns:
            How many tensors were restored.
        """
        restored = 0
        for name, view in zip(self.names, self.layout.views(self.global_)):
            saved = state.get(name)
            if saved is not None and saved.shape == view.shape:
                view.copy_(saved)
                restored += 1
        return restored

    # ------------------------------------------------------------------ the rule's steps

    def _delta_into_start(self) -> None:
        """``S ← R − S``: until the launch copies it to the wire, S holds this round's Δ."""
        self.start.neg_()
        torch._foreach_add_(self._start_views, self.replica)

    def _write_replica_from_start(self) -> None:
        torch._foreach_copy_(self.replica, self._start_views)
        if self.replica_is_narrow:
            torch._foreach_copy_(self._start_views, self.replica)

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
        completed = pending.completed_at if pending.completed_at is not None else time.perf_counter()
        stats.overlapped_rounds += 1
        stats.last_wait_seconds = wait_seconds
        stats.last_comm_seconds = max(0.0, completed - pending.launched_at)
        stats.last_staleness_steps = step - pending.step
        stats.wait_seconds += wait_seconds
        stats.comm_seconds += stats.last_comm_seconds
        stats.staleness_steps += stats.last_staleness_steps

    def _launch(self, step: int, is_flush: bool) -> None:
        """Put S's Δ (or Δ / W on a compressed wire) and this rank's side channel on the wire; start the all-reduce."""
        if self.compressed:
            torch.mul(self.start, 1.0 / self.world_size, out=self._payload)
        else:
            self._payload.copy_(self.start)
        code = 2 * step + int(is_flush)
        w, r = self.world_size, self.rank
        self._meta.zero_()
        self._meta[r] = code >> _CODE_BITS
        self._meta[w + r] = code & ((1 << _CODE_BITS) - 1)
        self._meta[3 * w + r] = int(self._stop_to_send)
        self._meta[2 * w + r] = torch.logical_not(torch.isfinite(self._payload.sum(dtype=self.layout.dtype)))
        stream_ctx = nullcontext()
        if self._comm_stream is not None:
            # Wire and side channel were written on the compute stream: the side stream starts after that work,
            # and the compute stream goes on with the next steps while the all-reduce runs.
            self._comm_stream.wait_stream(torch.cuda.current_stream(self.device))
            stream_ctx = torch.cuda.stream(self._comm_stream)
        with stream_ctx:
            works: tuple[dist.Work, ...] = (dist.all_reduce(self._wire, group=self.group, async_op=True),)
            if not self._packed:
                works += (dist.all_reduce(self._meta, group=self.group, async_op=True),)
        pending = _Pending(step=step, is_flush=is_flush, works=works, launched_at=time.perf_counter())
        if not is_flush:
            completion = pending.completion
            works[0].get_future().add_done_callback(lambda _: completion.append(time.perf_counter()))
        self.pending = pending

    def _merge_pending(self) -> float:
        """Wait for ``P`` and set ``G ← G + mean(P)``. Returns the host seconds spent waiting."""
        pending = self.pending
        if pending is None:
            return 0.0
        self.pending = None
        started = time.perf_counter()
        try:
            for work in pending.works:
                # With a timeout, NCCL's wait blocks the host and raises too, instead of only ordering streams.
                if self.timeout is None:
                    work.wait()
                else:
                    work.wait(self.timeout)
            if self._comm_stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self._comm_stream)
            waited = time.perf_counter() - started
            meta = [int(v) for v in self._meta.tolist()]
            # A narrow wire can overflow in the sum although every rank's part was finite; a full-precision one
            # (fp32 range or wider) cannot in practice, so it skips this extra pass.
            reduced_finite = not self.compressed or bool(torch.isfinite(self._payload.sum(dtype=self.layout.dtype)))
        except RuntimeError as err:
            self.aborted = True
            raise HPSGDCommunicationError(
                f"HPSGD: the all-reduce of the round that ended at optimizer step {pending.step} failed on rank"
                f" {self.rank}: {err}. A peer process probably died, hung past the process group timeout, or lost"
                " its network. Check the other ranks' logs; resume from the last checkpoint."
            ) from err
        self._check_meta(meta, reduced_finite, pending)
        self.global_.add_(self._payload, alpha=self._merge_scale)
        self.stats.rounds += 1
        return waited

    # ------------------------------------------------------------------ checks

    def _check_meta(self, meta: list[int], reduced_finite: bool, pending: _Pending) -> None:
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
        bad_ranks = [r for r, flag in enumerate(meta[2 * w : 3 * w]) if flag]
        if bad_ranks or not reduced_finite:
            self.aborted = True
            bad = (~torch.isfinite(self._payload)).nonzero()
            where = self.names[self.layout.index_of(int(bad[0]))] if bad.numel() else "(unknown)"
            kind = "round" if not pending.is_flush else "flush"
            source = (
                f"from rank(s) {bad_ranks}"
                if bad_ranks
                else f"from the sum over ranks, which overflowed the {self.comm_dtype} wire"
            )
            raise NonFiniteUpdateError(
                f"HPSGD: a non-finite update (NaN or inf) {source} in the {kind} that ended at optimizer step"
                f" {pending.step}, first in parameter {where!r}. It was not merged into the global model. Lower the"
                " learning rate, clip gradients (Trainer(gradient_clip_val=...)), or check the data of that step;"
                " with comm_dtype=float16, values beyond ±65504 overflow, so try bfloat16."
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
