"""The check after every flush: every floating-point tensor of the model is bit-identical on every rank.

One all-reduce of 64-bit checksums ([`checksums`][lightning_hpsgd.tensor_utils.checksums], one per tensor). A
frozen tensor that differs was changed outside the optimizer (an EMA teacher, SWA, a target network): it is
averaged at once and promoted, so that it is averaged in every round from then on. An averaged tensor that differs
means the model is not what the engine wrote: [`RanksDivergedError`][lightning_hpsgd.errors.RanksDivergedError],
naming it.
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import Tensor

from lightning_hpsgd.errors import RanksDivergedError
from lightning_hpsgd.tensor_utils import average_tensors, checksums, differs_across_ranks
from lightning_hpsgd.tracked import TrackedTensors

log = logging.getLogger(__name__)

__all__ = ["average_if_different", "check_identical"]


def check_identical(tracked: TrackedTensors, group: dist.ProcessGroup | None, step: int) -> list[str]:
    """Compare every floating-point tensor across ranks; average the frozen ones that differ (a collective).

    Returns:
        The frozen names that differed (now averaged): the caller promotes them.

    Raises:
        RanksDivergedError: an averaged tensor differs between ranks; names the first one.
        RuntimeError: the collective failed (the caller reports it).
    """
    if dist.get_world_size(group) == 1:
        return []
    flags = differs_across_ranks(checksums(tracked.replica + tracked.frozen), group)
    diverged = [name for name, differs in zip(tracked.names, flags) if differs]
    if diverged:
        raise RanksDivergedError(
            f"HPSGD: right after the flush at optimizer step {step}, {len(diverged)} averaged tensor(s) differ"
            f" between ranks, first {diverged[0]!r}. Something changed the model behind HPSGD's back between its"
            " write and this check (another thread or CUDA stream writing into the module), or the ranks were not"
            " started from the same weights. Stop that writer, and resume from the last checkpoint."
        )
    frozen_flags = flags[len(tracked.names) :]
    changed = [(n, t) for n, t, differs in zip(tracked.frozen_names, tracked.frozen, frozen_flags) if differs]
    if not changed:
        return []
    average_tensors([t for _, t in changed], group)
    log.info(
        "HPSGD: %d frozen tensor(s) changed outside the optimizer and differed between ranks (first %r): averaged"
        " now, and in every round from now on",
        len(changed),
        changed[0][0],
    )
    return [n for n, _ in changed]


def average_if_different(tensors: list[Tensor], group: dist.ProcessGroup | None) -> bool:
    """Average those of ``tensors`` (floating-point) that differ across ranks, in place. A collective unless
    ``tensors`` is empty, which it is on every rank or none when the ranks' structures agree. Returns whether any
    differed."""
    flags = differs_across_ranks(checksums(tensors), group) if tensors else []
    differing = [t for t, differs in zip(tensors, flags) if differs]
    if differing:
        average_tensors(differing, group)
    return bool(differing)
