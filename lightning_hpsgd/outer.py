"""The outer step: how a merged mean change ``ḡ`` enters the global model ``G``.

``G ← G + ḡ`` is plain HPSGD. With the outer optimizer (``η = outer_lr``, ``μ = outer_momentum``), the part of
``G`` that the optimizers train takes ``M ← μ·M + ḡ`` and ``U = η·(ḡ + μ·M)`` (Nesterov) or ``U = η·M``; the rest
(floating-point buffers such as BatchNorm statistics, and tensors changed outside the optimizer: an EMA teacher, a
target network) always takes the plain mean, since momentum on them has no meaning (and can drive a running
variance negative).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_hpsgd.tensor_utils import FlatLayout

__all__ = ["OuterStep"]


class OuterStep:
    """Adds each merged round to ``G``; holds ``M`` (flat, as wide as ``G``) when ``outer_momentum > 0``.

    Args:
        lr: ``η`` (1.0 with ``momentum=0``: plain HPSGD, bit for bit, with no extra buffer).
        momentum: ``μ`` in [0, 1).
        nesterov: Nesterov's form of the momentum step.
        layout: the flat layout of ``G``.
        trained: the number of leading tensors of the layout that the optimizers train; the outer optimizer
            applies to them only.
    """

    def __init__(self, lr: float, momentum: float, nesterov: bool, layout: FlatLayout, trained: int) -> None:
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self._trained = trained
        self._split = layout.offsets[trained] if trained < len(layout.offsets) else layout.numel
        self.buffer = torch.zeros(self._split, dtype=layout.dtype, device=layout.device) if momentum > 0 else None
        self.views: list[Tensor] = []
        if self.buffer is not None:
            spans = zip(layout.offsets[:trained], layout.numels[:trained], layout.shapes[:trained])
            self.views = [self.buffer[o : o + n].view(shape) for o, n, shape in spans]

    def apply(self, global_: Tensor, payload: Tensor, scale: float, outer: bool, begin: int = 0) -> None:
        """``G ← G + U`` for ``ḡ = scale · payload``, where ``global_`` and ``payload`` hold the elements from
        ``begin`` of the flat layout (a fragment). Without ``outer`` (a round with no optimizer step: a flush right
        after a flush) ``ḡ`` is added as it is, so that how often a run flushes never moves the model."""
        if not outer or (self.lr == 1.0 and self.buffer is None):
            global_.add_(payload, alpha=scale)
            return
        k = min(max(self._split - begin, 0), payload.numel())  # the trained elements come first in the layout
        global_[k:].add_(payload[k:], alpha=scale)
        trained, change = global_[:k], payload[:k]
        if self.buffer is None:
            trained.add_(change, alpha=scale * self.lr)
            return
        mu, lr = self.momentum, self.lr
        buffer = self.buffer[begin : begin + k]
        buffer.mul_(mu).add_(change, alpha=scale)  # M ← μ·M + ḡ
        if self.nesterov:
            trained.add_(change, alpha=lr * scale).add_(buffer, alpha=lr * mu)
        else:
            trained.add_(buffer, alpha=lr)

    def state_dict(self, names: Sequence[str]) -> dict[str, Tensor]:
        """``M`` by tensor name (empty without momentum)."""
        return {n: v.detach().cpu().clone() for n, v in zip(names, self.views)}

    @torch.no_grad()
    def load_state_dict(self, values: Mapping[str, Tensor], names: Sequence[str]) -> None:
        """Restore ``M`` by name; tensors without a saved value (or of another shape) keep 0."""
        for name, view in zip(names, self.views):
            saved = values.get(name)
            if saved is not None and saved.shape == view.shape:
                view.copy_(saved)
