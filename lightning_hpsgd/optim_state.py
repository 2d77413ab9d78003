"""Optimizer state across ranks: gather every rank's state for a checkpoint, and average states on a resize.

Under HPSGD, optimizer state (momentum, Adam moments) is local to each rank, so a checkpoint keeps one state per
rank (``HPSGD.md``, "Checkpoints"). Nothing here knows about a training framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_to_rank0", "mean_of_states", "to_cpu"]


def to_cpu(obj: Any) -> Any:
    """A copy of a nested structure of dicts, lists and tuples whose tensors are moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_to_rank0(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any] | None:
    """Gather one picklable object from every rank to global rank 0.

    Returns:
        On rank 0, the list of every rank's object in rank order; elsewhere ``None``.
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0, group=group)
    return gathered


def mean_of_states(states: Sequence[Any]) -> Any:
    """The element-wise mean of several optimizer state dicts that share one structure.

    Floating-point tensors are averaged; everything else (integer step counters, hyper-parameters, param groups)
    is taken from the first state.
    """
    first = states[0]
    if isinstance(first, Tensor):
        if first.is_floating_point() or first.is_complex():
            return torch.stack([s.to(first.device) for s in states]).mean(dim=0).to(first.dtype)
        return first.clone()
    if isinstance(first, dict):
        return {k: mean_of_states([s[k] for s in states]) for k in first}
    if isinstance(first, (list, tuple)) and all(isinstance(s, (list, tuple)) and len(s) == len(first) for s in states):
        return type(first)(mean_of_states([s[i] for s in states]) for i in range(len(first)))
    return first
