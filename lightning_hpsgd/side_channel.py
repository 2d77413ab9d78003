"""The side channel: a few integers per rank that travel with every round, so that every rank learns the same facts
at the same merge (pure functions; no communication here).

Each rank writes its own slot of ``FIELDS`` values and leaves the other ranks' slots at zero, so the all-reduce's
sum holds every rank's slot. Every value stays below ``2**24``: exact even on an fp32 wire.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hpsgd.errors import NonFiniteUpdateError, RanksOutOfStepError

__all__ = ["FIELDS", "Slot", "StopRequest", "check_steps", "decode", "encode", "non_finite_error", "read_round", "size"]

# Per rank: step code high bits, low bits, non-finite flag, stop request, step, communication and wait times.
FIELDS = 7
_CODE_BITS = 12  # each half of a step code stays below 2**24, exact in fp32
_TIME_TICK = 1e-5  # seconds per unit of the time fields: 10 µs, up to 167 s
_TIME_MAX = (1 << 24) - 1


class StopRequest(enum.IntFlag):
    """Why ranks should stop, carried in each round's side channel so that every rank stops at the same step."""

    ABORT = 1  # stop now (SIGTERM): Lightning's SIGTERMException
    FINISH = 2  # end training cleanly after this step (a time limit)


@dataclass(frozen=True)
class Slot:
    """One rank's part of a round's side channel.

    Attributes:
        step: the step the round ended at.
        is_flush: whether the round is a flush.
        non_finite: whether the rank's Δ held NaN or inf.
        stop: the rank's stop requests.
        step_seconds: the rank's compute time per step (a moving average; 0: not measured yet).
        comm_seconds: the rank's time from launching an all-reduce to its completion (0: not measured yet).
        wait_seconds: the time the rank waited at its merges for the all-reduce (0: never, or not measured).
    """

    step: int
    is_flush: bool
    non_finite: bool
    stop: StopRequest
    step_seconds: float
    comm_seconds: float
    wait_seconds: float = 0.0


def size(world_size: int) -> int:
    """The number of values the side channel takes for ``world_size`` ranks."""
    return FIELDS * world_size


def _ticks(seconds: float | None) -> int:
    return 0 if not seconds else min(max(round(seconds / _TIME_TICK), 1), _TIME_MAX)


def encode(
    meta: Tensor,
    rank: int,
    *,
    step: int,
    is_flush: bool,
    non_finite: Tensor,
    stop: StopRequest,
    step_seconds: float | None,
    comm_seconds: float | None,
    wait_seconds: float | None = None,
) -> None:
    """Write this rank's slot into ``meta`` (zeroed first). ``non_finite`` is a 0-d tensor, so no host sync."""
    w = meta.numel() // FIELDS
    code = 2 * step + int(is_flush)
    meta.zero_()
    meta[rank] = code >> _CODE_BITS
    meta[w + rank] = code & ((1 << _CODE_BITS) - 1)
    meta[2 * w + rank] = non_finite
    meta[3 * w + rank] = int(stop)
    meta[4 * w + rank] = _ticks(step_seconds)
    meta[5 * w + rank] = _ticks(comm_seconds)
    meta[6 * w + rank] = _ticks(wait_seconds)


def decode(values: Sequence[int]) -> list[Slot]:
    """Every rank's slot from the summed side channel."""
    w = len(values) // FIELDS
    field = [values[i * w : (i + 1) * w] for i in range(FIELDS)]
    slots = []
    for r in range(w):
        code = (field[0][r] << _CODE_BITS) + field[1][r]
        slots.append(
            Slot(
                step=code // 2,
                is_flush=bool(code % 2),
                non_finite=bool(field[2][r]),
                stop=StopRequest(field[3][r]),
                step_seconds=field[4][r] * _TIME_TICK,
                comm_seconds=field[5][r] * _TIME_TICK,
                wait_seconds=field[6][r] * _TIME_TICK,
            )
        )
    return slots


def check_steps(slots: Sequence[Slot]) -> None:
    """Raise [`RanksOutOfStepError`][lightning_hpsgd.errors.RanksOutOfStepError] unless every rank reached this
    round at the same point."""
    if len({(s.step, s.is_flush) for s in slots}) == 1:
        return
    seen = ", ".join(
        f"rank {r}: {'flush' if s.is_flush else 'sync point'} at step {s.step}" for r, s in enumerate(slots)
    )
    raise RanksOutOfStepError(
        f"HPSGD: ranks reached the all-reduce at different points ({seen}). Every rank must take the same number of"
        " optimizer steps: with manual optimization, call `optimizer.step()` under the same conditions on every"
        " rank, and give every rank the same number of batches."
    )


def non_finite_error(
    slots: Sequence[Slot],
    sum_is_finite: bool,
    *,
    where: Callable[[], str],
    comm_dtype: torch.dtype,
    merged: bool,
) -> NonFiniteUpdateError | None:
    """The error for a round that carried NaN or inf (from a rank, or from a sum that overflowed the wire), or
    ``None``. ``where`` names the first tensor holding a non-finite value; it is called only on an error."""
    bad_ranks = [r for r, s in enumerate(slots) if s.non_finite]
    if not bad_ranks and sum_is_finite:
        return None
    slot = slots[0]
    source = (
        f"from rank(s) {bad_ranks}" if bad_ranks else f"from the sum over ranks, which overflowed the {comm_dtype} wire"
    )
    fate = (
        "It reached the global model before the check (checks are deferred on this device), which is abandoned: no"
        " flush or checkpoint will use it."
        if merged
        else "It was not merged into the global model."
    )
    return NonFiniteUpdateError(
        f"HPSGD: a non-finite update (NaN or inf) {source} in the {'flush' if slot.is_flush else 'round'} that ended"
        f" at optimizer step {slot.step}, first in parameter {where()!r}. {fate} Lower the learning rate, clip"
        " gradients (Trainer(gradient_clip_val=...)), or check the data of that step; with comm_dtype=float16,"
        " values beyond ±65504 overflow, so try bfloat16."
    )


def read_round(
    values: Sequence[int], sum_is_finite: bool, *, where: Callable[[], str], comm_dtype: torch.dtype, merged: bool
) -> list[Slot]:
    """Decode a merged round's side channel and check it: every rank reads the same slots, so every rank raises the
    same error ([`check_steps`][lightning_hpsgd.side_channel.check_steps], then
    [`non_finite_error`][lightning_hpsgd.side_channel.non_finite_error]) or returns the same slots."""
    slots = decode(values)
    check_steps(slots)
    error = non_finite_error(slots, sum_is_finite, where=where, comm_dtype=comm_dtype, merged=merged)
    if error is not None:
        raise error
    return slots
