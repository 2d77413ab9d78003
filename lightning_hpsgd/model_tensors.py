"""Which of a module's tensors HPSGD hands the engine, and how a change to them is noticed between batches.

* Trained: parameters that require grad. Averaged in every round; the outer optimizer steps them.
* Averaged as well: the running statistics of normalization layers (BatchNorm's ``running_mean`` and
  ``running_var``), which change at every forward pass.
* Every other floating-point tensor (frozen parameters, constant buffers such as a causal mask or a RoPE cache) is
  frozen: it costs nothing per round, is checked at every flush, and is averaged from then on if it changed (an EMA
  teacher, a target network).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

from torch import Tensor
from torch.nn import Module
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["ModelWatcher", "averaged_names", "model_tensors", "signature", "trained_names"]


def model_tensors(module: Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``module`` by name."""
    return dict(chain(module.named_parameters(), module.named_buffers()))


def trained_names(module: Module) -> set[str]:
    """The parameters that require grad."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def averaged_names(module: Module) -> set[str]:
    """Averaged in every round: trained parameters and normalization layers' running statistics."""
    names = trained_names(module)
    for prefix, sub in module.named_modules():
        if isinstance(sub, _NormBase):
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer.is_floating_point():
                    names.add(f"{prefix}.{name}" if prefix else name)
    return names


def signature(module: Module) -> tuple:
    """Cheap, per batch: which storage each tensor has, and which parameters train."""
    return tuple((t.data_ptr(), t.requires_grad) for t in _tensors(module))


def _tensors(module: Module) -> Iterator[Tensor]:
    return chain(module.parameters(), module.buffers())


class ModelWatcher:
    """Notices, before a batch, that user code replaced a tensor, (un)froze a parameter, or added or removed one.

    Args:
        module: the LightningModule (not a wrapper).
    """

    def __init__(self, module: Module) -> None:
        self.accept(module)

    def changed(self, module: Module) -> bool:
        """Whether anything changed since the last [`accept`][lightning_hpsgd.model_tensors.ModelWatcher.accept]."""
        return signature(module) != self._signature

    def parameters_replaced(self, module: Module) -> bool:
        """Whether a parameter object was replaced, added or removed (not only its ``requires_grad``)."""
        return [id(p) for p in module.parameters()] != self._parameters

    def trained_changed(self, module: Module) -> bool:
        """Whether the set of parameters that require grad changed."""
        return trained_names(module) != self._trained

    def accept(self, module: Module) -> None:
        """Take the module as it is now as the reference."""
        self._signature = signature(module)
        self._parameters = [id(p) for p in module.parameters()]
        self._trained = trained_names(module)
