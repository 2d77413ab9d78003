"""What an HPSGD checkpoint holds beyond a DDP one, in one place: every rank's optimizer and precision state, and
the engine's state.

Under HPSGD, optimizer state (momentum, Adam moments) is local to each rank, so a checkpoint keeps one state per
rank, gathered to rank 0 (``docs/algorithm.md``, "Checkpoints"). It lives under ``checkpoint["hpsgd"]``:

* ``world_size``: the number of ranks that wrote it; ``local_size``: ranks per node with ``hierarchy="node"``
  (1 otherwise);
* ``optimizer_states``: one list of optimizer state dicts per worker: per rank, or per node under
  ``hierarchy="node"`` (node-mates hold the same state);
* ``precision_states``: one precision-plugin state per worker (a GradScaler's scale, for example);
* ``engine``: [`lightning_hpsgd.engine.HPSGDEngine.state_dict`][] (``G`` of narrow tensors, promoted frozen
  tensors, counters);
* ``steps``: the steps (batches that stepped an optimizer) the run had counted;
* ``abandoned``: only in a checkpoint written after an error without a flush (``OnExceptionCheckpoint``): why. It
  holds rank 0's unmerged replica and no per-rank state, so a fit refuses to resume from it.

Nothing here knows about a training framework beyond optimizers and a ``state_dict``/``load_state_dict`` protocol.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "CHECKPOINT_KEY",
    "SavedEngineState",
    "abandoned_entry",
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

    Floating-point tensors, and Python floats that differ (a GradScaler's scale), are averaged; everything else
    (integer step counters, hyper-parameters, param groups) is taken from the first state that has it. A key
    missing from some states (a parameter that got no gradient on some rank, so its optimizer never made state for
    it: an unused branch, an MoE expert) is averaged over the states that have it.
    """
    first = states[0]
    if isinstance(first, float) and all(isinstance(s, float) for s in states) and len(set(states)) > 1:
        return sum(states) / len(states)  # a GradScaler's scale
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
    local_size: int = 1,
) -> dict[str, Any]:
    """Every worker's optimizer and precision state, gathered to rank 0, and the engine's state (a collective).

    Args:
        local_size: ranks per node whose states are identical (``hierarchy="node"``): only each node's first rank
            (``rank % local_size == 0``) contributes, so the file holds one state per node.

    Returns:
        The ``checkpoint["hpsgd"]`` entry on rank 0 (elsewhere without the per-worker lists, which only rank 0
        writes).
    """
    local = None
    if dist.get_rank(group) % local_size == 0:
        local = {
            "optimizer_states": [to_cpu(optimizer.state_dict()) for optimizer in optimizers],
            "precision_state": to_cpu(precision.state_dict()),
        }
    gathered = gather_to_rank0(local, group=group)
    state: dict[str, Any] = {"world_size": dist.get_world_size(group), "local_size": local_size}
    if gathered is not None:
        gathered = [g for g in gathered if g is not None]
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
    local_size: int = 1,
) -> None:
    """Give each worker its own saved optimizer and precision state back; the mean of them on another layout.

    Args:
        rank: this rank's global rank; with ``local_size > 1`` its node is ``rank // local_size``.
        world_size: the number of ranks now.
        local_size: ranks per node now (``hierarchy="node"``), 1 otherwise.

    On a different world size (or node layout) the run cannot continue exactly as the original would have: rank 0
    warns, and each rank takes the mean of the saved states, the GradScaler's scale included.
    """
    per_worker = saved["optimizer_states"]
    precision_states = [p for p in saved.get("precision_states", []) if p]
    if saved["world_size"] == world_size and saved.get("local_size", 1) == local_size:
        states = per_worker[rank // local_size]
        precision_state = precision_states[rank // local_size] if precision_states else None
    else:
        if rank == 0:
            warnings.warn(
                f"HPSGD: the checkpoint was written by {saved['world_size']} ranks and is resumed on {world_size} (or"
                " on another number per node). Each worker starts from the mean of the saved optimizer states"
                " (momentum, Adam moments) and GradScaler scales, so the run will not continue exactly as the"
                " original would have.",
                stacklevel=2,
            )
        states = [mean_of_states([worker[i] for worker in per_worker]) for i in range(len(per_worker[0]))]
        precision_state = mean_of_states(precision_states) if precision_states else None
    if precision_state:
        precision.load_state_dict(precision_state)
    for optimizer, state in zip(optimizers, states):
        optimizer.load_state_dict(state)


def saved_engine_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The engine state a checkpoint holds, or ``None`` (a DDP checkpoint)."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        return None
    return dict(saved.get("engine", {}))


def abandoned_entry(world_size: int, reason: str) -> dict[str, Any]:
    """The ``checkpoint["hpsgd"]`` entry of a checkpoint written after an error, without a flush."""
    return {"world_size": world_size, "abandoned": reason}


class SavedEngineState:
    """Engine state read from a checkpoint, used once, and only by the fit that resumes from that checkpoint.

    ``validate``, ``test`` and ``predict`` with ``ckpt_path`` read checkpoints too; their state is dropped, so it
    never leaks into a later ``fit`` (momentum, ``H``, the next round boundary).
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None
        self._steps: int | None = None
        self.last_fit: dict[str, Any] | None = None  # the last engine's state, for a checkpoint saved after fit

    def read(self, checkpoint: Mapping[str, Any], fitting: bool, path: Any) -> None:
        """Remember the engine state of a checkpoint a fit resumes from; refuse one written after an error."""
        self._state, self._steps = None, None
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        if saved.get("abandoned"):
            message = (
                f"HPSGD: {path} was written after an error without a flush ({saved['abandoned']}): it holds rank 0's"
                " unmerged replica and no per-rank optimizer state, so a run resumed from it would not continue"
                " exactly. Resume from the last checkpoint written during training (ModelCheckpoint)."
            )
            if fitting:
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
            return
        if fitting:
            self._state = dict(saved.get("engine", {}))
            self._steps = saved.get("steps")

    def take(self) -> tuple[dict[str, Any] | None, int | None]:
        """The engine state and step count for the fit that starts now (once)."""
        taken = (self._state, self._steps)
        self._state, self._steps, self.last_fit = None, None, None
        return taken
