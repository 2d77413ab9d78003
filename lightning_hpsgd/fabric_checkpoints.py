"""``fabric.save`` and ``fabric.load`` under HPSGD: what the file holds besides the models.

``fabric.save`` flushes first, so the models it writes are the global model, identical on every rank. Under
``"hpsgd"`` it adds each rank's own optimizer state (the ranks' states differ: each trained its own replica) and
the engine's state (``G``, the outer momentum, ``H``, the round schedule) with the iteration count.
``fabric.load`` gives each rank its own optimizer state back (their mean, with a warning, on another world size)
and restarts the engine from the file, so that the run goes on as if it had never stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch.nn import Module
from torch.optim import Optimizer

from lightning_hpsgd.checkpoint import (
    CHECKPOINT_KEY,
    SavedEngineState,
    abandoned_entry,
    gather_per_rank_state,
    restore_per_rank_state,
)
from lightning_hpsgd.compat import PathLike

__all__ = ["FabricCheckpoints"]


class FabricCheckpoints:
    """The checkpoint methods of the Fabric [`HPSGDStrategy`][lightning_hpsgd.fabric.HPSGDStrategy] (a mixin placed
    before Fabric's ``DDPStrategy``)."""

    _engine: Any
    _groups: Any
    _modules: list[Module]
    _steps: int
    checkpoint_io: Any
    precision: Any

    def save_checkpoint(
        self,
        path: PathLike,
        state: dict[str, Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """Flush, then write the state as DDP does, with every rank's optimizer state and the engine's under
        ``"hpsgd"`` (a collective: call ``fabric.save`` on every rank)."""
        if CHECKPOINT_KEY in state:
            raise ValueError(f"HPSGD: the checkpoint key {CHECKPOINT_KEY!r} is HPSGD's own; name your entry otherwise.")
        self.flush("fabric.save")
        converted = self._convert_stateful_objects_in_state(state, filter=filter or {})
        keys = [key for key, obj in state.items() if isinstance(obj, Optimizer)]
        engine = self._engine
        if engine is not None and engine.aborted:
            converted[CHECKPOINT_KEY] = abandoned_entry(self.world_size, "training stopped with an exception")
            rank_zero_warn(
                f"HPSGD: {path} is written after an error, without a flush: it holds rank 0's unmerged replica."
                " Resume from the last checkpoint written during training; fabric.load refuses this one."
            )
        elif engine is not None:
            groups = self._groups
            nodes = groups.nodes if groups is not None else None
            entry = gather_per_rank_state(
                [state[key] for key in keys], self.precision, engine.state_dict(),
                groups.objects if groups is not None else None, nodes.local_size if nodes is not None else 1,
            )  # fmt: skip
            converted[CHECKPOINT_KEY] = {**entry, "steps": self._steps, "optimizer_keys": keys}
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint=converted, path=path, storage_options=storage_options)

    def load_checkpoint(
        self,
        path: PathLike,
        state: Module | Optimizer | dict[str, Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Restore the models and each rank's own optimizer state (the mean of them on another world size), then
        restart the engine from the file: ``G``, the outer momentum, ``H`` and the iteration count."""
        if not isinstance(state, dict) or not state:
            return super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        engine = self._engine
        if engine is not None and not engine.aborted and engine.needs_flush:
            self.flush("fabric.load")  # nothing in flight may land on the loaded values
        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        missing = [key for key in state if key not in checkpoint]
        if strict and missing:
            raise KeyError(
                f"The requested state contains a key '{missing[0]}' that does not exist in the loaded checkpoint."
                " To disable strict loading, set `strict=False`."
            )
        saved = checkpoint.pop(CHECKPOINT_KEY, None)
        reader = SavedEngineState()
        reader.read({CHECKPOINT_KEY: saved} if saved is not None else {}, True, path)  # refuses an abandoned one
        engine_state, steps = reader.take()
        per_rank = self._restore_optimizers(saved, state) if saved is not None else set()
        loaded_model = False
        for name, obj in list(state.items()):
            if name not in checkpoint:
                continue
            value = checkpoint.pop(name)
            if isinstance(obj, Module):
                self.load_module_state_dict(module=obj, state_dict=value, strict=strict)
                loaded_model |= any(obj is m for m in self._modules)
            elif isinstance(obj, Optimizer):
                if name not in per_rank:
                    obj.load_state_dict(value)
            elif hasattr(obj, "load_state_dict") and hasattr(obj, "state_dict"):
                obj.load_state_dict(value)
            else:
                state[name] = value
        if loaded_model:
            self._restart_engine(engine_state, steps)
        return checkpoint

    def _restore_optimizers(self, saved: dict[str, Any], state: dict[str, Any]) -> set[str]:
        """Each rank's own optimizer state for the requested optimizers the file holds per rank."""
        keys = saved.get("optimizer_keys", [])
        wanted = [i for i, key in enumerate(keys) if isinstance(state.get(key), Optimizer)]
        if not wanted or "optimizer_states" not in saved:
            return set()
        subset = {**saved, "optimizer_states": [[worker[i] for i in wanted] for worker in saved["optimizer_states"]]}
        nodes = self._groups.nodes if self._groups is not None else None
        restore_per_rank_state(subset, [state[keys[i]] for i in wanted], self.precision, self.global_rank,
                               self.world_size, nodes.local_size if nodes is not None else 1)  # fmt: skip
        return {keys[i] for i in wanted}
