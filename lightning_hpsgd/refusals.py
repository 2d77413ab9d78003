"""Models and optimizers HPSGD refuses at setup, each with a one-line ``ValueError`` that says what to do instead.

HPSGD averages each rank's whole, local copy of the model and keeps each rank's optimizer state local. A module that
another data-parallel scheme already wraps or shards (DDP, FSDP, FSDP2's ``fully_shard``, tensor parallelism,
DeepSpeed), or an optimizer that shards its state, would communicate behind HPSGD's back or hold only a part of the
model, so [`HPSGDStrategy`][lightning_hpsgd.HPSGDStrategy] refuses it before the first step.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

__all__ = ["reject_dtensors", "reject_sharded_optimizers", "reject_unsupported_model", "reject_wrapped_modules"]

_USE_PLAIN = "use the plain module and let strategy='hpsgd' handle communication."


def _fsdp1_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a build of PyTorch without torch.distributed
        return None
    return FullyShardedDataParallel


def _fsdp2_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule  # PyTorch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # PyTorch 2.4 and 2.5
        except ImportError:  # older, or without torch.distributed: no FSDP2 modules can exist
            return None
    return FSDPModule


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor  # PyTorch >= 2.4
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _is_deepspeed_engine(module: Module) -> bool:
    """Whether ``module`` is a ``deepspeed.DeepSpeedEngine`` (or a subclass), told without importing DeepSpeed."""
    return any(
        cls.__name__ == "DeepSpeedEngine" and cls.__module__.split(".")[0] == "deepspeed"
        for cls in type(module).__mro__
    )


def _wrapper_name(module: Module) -> str | None:
    """The data-parallel wrapper ``module`` is, as the refusal names it; ``None`` for a plain module."""
    if isinstance(module, DistributedDataParallel):
        return "DistributedDataParallel"
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and isinstance(module, fsdp1):
        return "FullyShardedDataParallel"
    fsdp2 = _fsdp2_class()
    if fsdp2 is not None and isinstance(module, fsdp2):
        return "FSDP2 (fully_shard)"
    if _is_deepspeed_engine(module):
        return "DeepSpeedEngine"
    return None


def reject_wrapped_modules(model: Module) -> None:
    """Refuse a model that holds, or is, a module wrapped for another data-parallel scheme.

    Refused: ``DistributedDataParallel``, ``FullyShardedDataParallel`` (FSDP1), modules passed to ``fully_shard``
    (FSDP2: their classes subclass ``FSDPModule``) and DeepSpeed engines (any class named ``DeepSpeedEngine`` from a
    ``deepspeed`` module in the module's class hierarchy; DeepSpeed is not imported).

    Args:
        model: the module to check, with all its submodules.

    Raises:
        ValueError: naming the first wrapped submodule (``'(root)'`` for ``model`` itself) and its wrapper.
    """
    for name, module in model.named_modules():
        wrapper = _wrapper_name(module)
        if wrapper is not None:
            raise ValueError(f"HPSGD: submodule {name or '(root)'!r} is already wrapped in {wrapper}; {_USE_PLAIN}")


def reject_dtensors(model: Module) -> None:
    """Refuse a model with a ``DTensor`` parameter or buffer (sharded by FSDP2 or laid out by tensor parallelism).

    HPSGD averages whole local tensors, and a ``DTensor`` holds only this rank's part of one.

    Args:
        model: the module to check, with all its submodules.

    Raises:
        ValueError: naming the first ``DTensor`` parameter or buffer.
    """
    dtensor = _dtensor_class()
    if dtensor is None:
        return
    tensors: Iterable[tuple[str, str, Tensor]] = [
        *(("parameter", name, p) for name, p in model.named_parameters()),
        *(("buffer", name, b) for name, b in model.named_buffers()),
    ]
    for kind, name, tensor in tensors:
        if isinstance(tensor, dtensor):
            raise ValueError(
                f"HPSGD: {kind} {name!r} is a DTensor (sharded by fully_shard or tensor parallelism); use plain"
                " tensors and let strategy='hpsgd' handle communication."
            )


def reject_unsupported_model(model: Module) -> None:
    """Every model check HPSGD runs at setup: [`reject_wrapped_modules`][], then [`reject_dtensors`][].

    Args:
        model: the module to be trained, after Lightning's ``configure_model`` and its move to the device.

    Raises:
        ValueError: one line naming the submodule, parameter or buffer HPSGD cannot train, and what to use instead.
    """
    reject_wrapped_modules(model)
    reject_dtensors(model)


def reject_sharded_optimizers(optimizers: Iterable[Optimizer]) -> None:
    """Refuse optimizers that shard or average their state across ranks (``ZeroRedundancyOptimizer``, post-local SGD).

    Args:
        optimizers: the optimizers to check; Lightning's ``LightningOptimizer`` wrappers are looked through.

    Raises:
        ValueError: naming the first such optimizer's class.
    """
    for optimizer in optimizers:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        if hasattr(optimizer, "consolidate_state_dict") or type(optimizer).__name__ == "PostLocalSGDOptimizer":
            raise ValueError(
                f"HPSGD: optimizer {type(optimizer).__name__} shards or averages state across ranks; use a plain"
                " optimizer such as torch.optim.SGD or AdamW."
            )
