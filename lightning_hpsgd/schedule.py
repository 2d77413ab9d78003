"""When rounds end and when they merge: every ``H`` steps (fragment ``f`` of ``F`` at steps ``≡ f·H/F mod H``), or
with ``sync_every="auto"`` an ``H`` the ranks agree on from what they measure; each round merged ``τ``
(``sync_delay``) steps after its launch, fixed or agreed the same way. No communication here: the figures travel in
the side channel ([`lightning_hpsgd.side_channel`][])."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_hpsgd.options import SyncDelay, SyncEvery
from lightning_hpsgd.side_channel import Slot

__all__ = [
    "AUTO_MARGIN",
    "DELAY_SHRINK_MARGIN",
    "HIDDEN_WAIT",
    "Schedule",
    "agreed_sync_delay",
    "agreed_sync_every",
    "hiding_sync_every",
]

# "auto" chooses the smallest H with comm <= H x step / AUTO_MARGIN, from moving averages of both.
AUTO_MARGIN = 1.25
# A round is hidden when the slowest rank waits less than this fraction of one of its steps per round.
HIDDEN_WAIT = 0.2
# sync_delay="auto" shrinks only to a delay with this margin over the measured comm time.
DELAY_SHRINK_MARGIN = 1.5
_SMOOTHING = 0.3


def agreed_sync_every(slots: Sequence[Slot], current: int, max_sync_every: int) -> int:
    """``"auto"``: the smallest ``H`` whose ``H`` steps of the slowest rank's compute hide one all-reduce.

    The all-reduce's own cost is the *smallest* communication time any rank measured: a rank that launched early
    measures its wait for the last rank to launch on top of the link (a fast rank waiting for a slow one), and no
    rank can measure less than the link, since the all-reduce completes only after the last launch. Compute is the
    *largest* step time: the slowest rank must hide the link too. Every rank decides from the same slots, so all
    agree. ``current`` stays until every rank has measured both.

    ``H`` grows only while the slowest rank really waits (more than ``HIDDEN_WAIT`` of a step per round): a
    completion time read on the host can arrive late when the training thread holds the CPU (gloo's callback needs
    Python's lock), which makes a hidden all-reduce look longer than it is.
    """
    return _hiding_steps(slots, current, max_sync_every)


def agreed_sync_delay(slots: Sequence[Slot], current: int, sync_every: int) -> int:
    """``sync_delay="auto"``: the delay whose ``τ`` steps of the slowest rank's compute hide one all-reduce, from 1 to
    ``H``, from the figures every rank sent (so every rank agrees).

    * While the slowest rank waits at its merges (at least ``HIDDEN_WAIT`` of one of its steps), ``τ`` grows: to
      ``⌈AUTO_MARGIN · comm / step⌉`` if that is larger, else by one step, up to one step more than the shrink
      margin's delay below. A wait says the link is not hidden, whatever the estimate says (on a machine whose
      cores are all busy with compute, the all-reduce runs slower than the link alone would let it); the bound
      keeps noise from ratcheting ``τ`` up to ``H``.
    * While it does not wait, ``τ`` may only shrink, to ``⌈DELAY_SHRINK_MARGIN · comm / step⌉``: a wider margin than
      for growing, so that ``τ`` does not swing between a value that hides the link and one that just fails to.

    ``comm`` is the smallest communication time any rank measured and ``step`` the largest step time, as in
    [`agreed_sync_every`][]: a fast rank's comm includes its wait for slow peers, and the slowest rank's wait is the
    only one the link alone causes. With ``fragments``, a round is one fragment's all-reduce (``1/F`` of the bytes).
    """
    current = min(current, sync_every)
    measured = _link_over_step(slots)
    if measured is None:
        return current
    ratio, slowest = measured
    if slowest.wait_seconds >= HIDDEN_WAIT * slowest.step_seconds:
        step_more = min(current + 1, math.ceil(DELAY_SHRINK_MARGIN * ratio) + 1)
        return min(max(math.ceil(AUTO_MARGIN * ratio), step_more, current), sync_every)
    return max(min(math.ceil(DELAY_SHRINK_MARGIN * ratio), current), 1)


def _link_over_step(slots: Sequence[Slot]) -> tuple[float, Slot] | None:
    """The smallest comm time any rank measured over the slowest rank's step time, and the slowest rank's slot;
    ``None`` until every rank measured both."""
    if any(s.comm_seconds <= 0 or s.step_seconds <= 0 for s in slots):
        return None
    slowest = max(slots, key=lambda s: s.step_seconds)
    return min(s.comm_seconds for s in slots) / slowest.step_seconds, slowest


def hiding_sync_every(ratio: float, cap: int | None = None) -> int:
    """The smallest ``H`` whose ``H`` steps of compute hide one all-reduce that takes ``ratio`` steps, with the
    ``AUTO_MARGIN``: ``⌈AUTO_MARGIN · ratio⌉``, at least 1 and at most ``cap`` (``None``: no cap). The ``H`` that
    ``sync_every="auto"`` moves to while the slowest rank waits."""
    wanted = max(math.ceil(AUTO_MARGIN * ratio), 1)
    return wanted if cap is None else min(wanted, cap)


def _hiding_steps(slots: Sequence[Slot], current: int, cap: int) -> int:
    measured = _link_over_step(slots)
    if measured is None:
        return current
    ratio, slowest = measured
    wanted = hiding_sync_every(ratio, cap)
    if wanted > current and slowest.wait_seconds < HIDDEN_WAIT * slowest.step_seconds:
        return current  # already hidden
    return wanted


class Schedule:
    """The steps at which rounds end and merge, and this rank's moving averages of step and comm times.

    Args:
        sync_every: ``H``, or ``"auto"`` (start at 1; follow [`agreed_sync_every`][] at every merge).
        max_sync_every: the largest ``H`` that ``"auto"`` may choose.
        clock: seconds, monotonic (a fake clock in tests).
        sync_delay: ``τ``, steps from a round's launch to its merge (``None``: ``H``, the next sync point), or
            ``"auto"`` (start at ``H``; follow [`agreed_sync_delay`][] at every merge).
        fragments: ``F``; fragment ``f`` ends its rounds at the steps ``s`` with ``s ≡ ⌊f·H/F⌋ (mod H)``
            (a fixed ``H`` only).
    """

    def __init__(
        self,
        sync_every: SyncEvery,
        max_sync_every: int,
        clock: Callable[[], float] = time.perf_counter,
        *,
        sync_delay: SyncDelay = None,
        fragments: int = 1,
    ) -> None:
        self.auto = sync_every == "auto"
        self.sync_every: int = 1 if self.auto else int(sync_every)
        self.max_sync_every = max_sync_every
        self.delay_auto = sync_delay == "auto"
        self.sync_delay: int | None = None if sync_delay in (None, "auto") else int(sync_delay)  # None: follow H
        self.fragments = fragments
        # A fixed H: fragment f ends its rounds at the steps s with s ≡ ⌊f·H/F⌋ (mod H).
        self._offsets = [(f * self.sync_every) // fragments for f in range(fragments)]
        self.next_sync: int | None = None  # "auto": the step at or after which the current round ends
        self.step_seconds: float | None = None
        self.comm_seconds: float | None = None
        self.wait_seconds: float | None = None
        # (comm / step, the slowest rank's slot) at the latest merge where every rank had measured both
        self.measured: tuple[float, Slot] | None = None
        self._clock = clock
        self._round_started: float | None = None
        self._round_steps = 0
        self._last_step: int | None = None

    @property
    def delay(self) -> int:
        """``τ`` of a round launched now: ``sync_delay``, at most ``H`` (``H`` when it follows ``H``)."""
        return self.sync_every if self.sync_delay is None else min(self.sync_delay, self.sync_every)

    def count(self, step: int) -> tuple[int, ...]:
        """Record step ``step`` (1-based; numbers may jump); return the fragments whose round ends at it (empty:
        none; ``(0,)`` with one fragment)."""
        previous = step - 1 if self._last_step is None else self._last_step
        self._last_step = step
        self._round_steps += 1
        if not self.auto:
            h = self.sync_every
            return tuple(f for f, o in enumerate(self._offsets) if (step - o) // h > (previous - o) // h)
        if self.next_sync is None:
            self.next_sync = (previous // self.sync_every + 1) * self.sync_every
        return (0,) if step >= self.next_sync else ()

    def end_round(self) -> None:
        """At a sync point, before its merges: the compute time per step since the last sync point (waits
        excluded)."""
        if self._round_started is not None and self._round_steps > 0:
            per_step = (self._clock() - self._round_started) / self._round_steps
            self.step_seconds = _smooth(self.step_seconds, per_step)
        self._round_steps = 0

    def start_round(self, step: int | None, launched: bool = True) -> None:
        """After a sync point (``step``) or a flush (``None``: the time to the next sync point is not compute).
        ``launched``: whether the sync point launched a round (not only merged one)."""
        self._round_started = None if step is None else self._clock()
        if step is not None and self.auto and launched:
            self.next_sync = step + self.sync_every  # H as agreed at this sync point's merge

    def record_comm(self, seconds: float, wait: float = 0.0) -> None:
        """A round's time from launch to completion, and how long this rank waited for it at the merge."""
        self.comm_seconds = _smooth(self.comm_seconds, seconds)
        self.wait_seconds = _smooth(self.wait_seconds, wait)

    def times(self) -> dict[str, float | None]:
        """This rank's figures for the side channel: step, comm and wait seconds (``None``: not measured yet)."""
        return {"step_seconds": self.step_seconds, "comm_seconds": self.comm_seconds, "wait_seconds": self.wait_seconds}

    def agree(self, slots: Sequence[Slot]) -> int:
        """Set ``H`` and ``τ`` from a merged round's slots (``"auto"``; fixed values stay), and keep the link over
        step ratio they give (``measured``; the end-of-fit recommendation reads it). Returns the new ``H``."""
        self.measured = _link_over_step(slots) or self.measured
        if self.auto:
            self.sync_every = agreed_sync_every(slots, self.sync_every, self.max_sync_every)
        if self.delay_auto:
            self.sync_delay = agreed_sync_delay(slots, self.delay, self.sync_every)
        return self.sync_every

    def state_dict(self) -> dict[str, Any]:
        """``"auto"``: the current ``H`` and the step that ends the current round, and the current ``τ`` (empty when
        both are fixed)."""
        state: dict[str, Any] = {"current": self.sync_every, "next_sync": self.next_sync} if self.auto else {}
        if self.delay_auto:
            state["sync_delay"] = self.sync_delay
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict`][] output."""
        if self.auto and "current" in state:
            self.sync_every = min(int(state["current"]), self.max_sync_every)
            self.next_sync = state["next_sync"]
        if self.delay_auto and state.get("sync_delay") is not None:
            self.sync_delay = int(state["sync_delay"])


def _smooth(average: float | None, value: float) -> float:
    return value if average is None else average + _SMOOTHING * (value - average)
