"""What an HPSGD checkpoint holds beyond a DDP one, in one place: every rank's optimizer and precision state, and
the engine's state.

Under HPSGD, optimizer state (momentum, Adam moments) is local to each rank, so a checkpoint keeps one state per
rank, gathered to rank 0 (``docs/algorithm.md``, "Checkpoints"). It lives under ``checkpoint["hpsgd"]``:

* ``world_size``: the number of ranks that wrote it;
* ``optimizer_states``: one list of optimizer state dicts per rank;
* ``precision_states``: one precision-plugin state per rank (a GradScaler's scale, for example);
* ``engine``: [`lightning_hpsgd.engine.HPSGDEngine.state_dict`][] (``G`` of narrow tensors, promoted frozen
  tensors, counters).

Nothing here knows about a training framework beyond optimizers and a ``state_dict``/``load_state_dict`` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "CHECKPOINT_KEY",
    "gather_per_rank_state",
    "gather_to_rank0",
    "mean_of_states",
    "restore_per_rank_state",
    "saved_engine_state",
    "to_cpu",
]

CHECKPOINT_KEY = "hpsgd"


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


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
    """Gather one picklable object from every rank to the first rank of ``group``.

    Returns:
        On that rank, the list of every rank's object in rank order; elsewhere ``None``.
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    dist.gather_object(obj, gathered, dst=dst, group=group)
    return gathered


def mean_of_states(states: Sequence[Any]) -> Any:
    """The element-wise mean of several optimizer state dicts.

    Floating-point tensors are averaged; everything else (integer step counters, hyper-parameters, param groups)
    is taken from the first state that has it. A key missing from some states (a parameter that got no gradient on
    some rank, so its optimizer never made state for it: an unused branch, an MoE expert) is averaged over the
    states that have it.
    """
    first = states[0]
    if isinstance(first, Tensor):
        if first.is_floating_point() or first.is_complex():
            return torch.stack([s.to(first.device) for s in states]).mean(dim=0).to(first.dtype)
        return first.clone()
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for s in states for k in s))
        return {k: mean_of_states([s[k] for s in states if k in s]) for k in keys}
    if isinstance(first, (list, tuple)) and all(isinstance(s, (list, tuple)) and len(s) == len(first) for s in states):
        return type(first)(mean_of_states([s[i] for s in states]) for i in range(len(first)))
    return first


def gather_per_rank_state(
    optimizers: Sequence[Optimizer],
    precision: _Stateful,
    engine_state: Mapping[str, Any] | None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Every rank's optimizer and precision state, gathered to rank 0, and the engine's state (a collective).

    Returns:
        The ``checkpoint["hpsgd"]`` entry on rank 0 (elsewhere without the per-rank lists, which only rank 0 writes).
    """
    local = {
        "optimizer_states": [to_cpu(optimizer.state_dict()) for optimizer in optimizers],
        "precision_state": to_cpu(precision.state_dict()),
    }
    gathered = gather_to_rank0(local, group=group)
    state: dict[str, Any] = {"world_size": dist.get_world_size(group)}
    if gathered is not None:
        state["optimizer_states"] = [g["optimizer_states"] for g in gathered]
        state["precision_states"] = [g["precision_state"] for g in gathered]
    if engine_state is not None:
        state["engine"] = dict(engine_state)
    return state


def restore_per_rank_state(
    saved: Mapping[str, Any],
    optimizers: Sequence[Optimizer],
    precision: _Stateful,
    rank: int,
    world_size: int,
) -> None:
    """Give each rank its own saved optimizer and precision state back; the mean of them on another world size.

    On a different world size the run cannot continue exactly as the original would have; the caller says so.
    """
    per_rank = saved["optimizer_states"]
    if saved["world_size"] == world_size:
        states = per_rank[rank]
        precision_state = saved.get("precision_states", [None] * world_size)[rank]
        if precision_state:
            precision.load_state_dict(precision_state)
    else:
        states = [mean_of_states([rank_states[i] for rank_states in per_rank]) for i in range(len(per_rank[0]))]
    for optimizer, state in zip(optimizers, states):
        optimizer.load_state_dict(state)


def saved_engine_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The engine state a checkpoint holds, or ``None`` (a DDP checkpoint)."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        return None
    return dict(saved.get("engine", {}))
