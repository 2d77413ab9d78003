"""``G`` and ``S``: the rule's two flat buffers over the tracked tensors' layout, each with a view per tensor."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_hpsgd.tracked import TrackedTensors

__all__ = ["RuleBuffers"]


class RuleBuffers:
    """``G`` (``global_``) and ``S`` (``start``) in the layout's dtype (fp32 or wider), built from ``R``.

    Both start equal to ``R``. ``G`` of a tensor then takes its value from ``saved`` where that value still rounds
    to the replica: the extra bits of ``G`` behind a narrow (bf16/fp16) replica survive a rebuild or a resume, and
    stale values (the model was changed since) are never brought back.

    Args:
        tracked: the tensors and their flat layout.
        saved: earlier values of ``G`` by tensor name (default: none).
    """

    def __init__(self, tracked: TrackedTensors, saved: Mapping[str, Tensor] | None = None) -> None:
        self._tracked = tracked
        layout = tracked.layout
        self.global_ = layout.new_buffer()
        self.start = layout.new_buffer()
        self.global_views = layout.views(self.global_)
        self.start_views = layout.views(self.start)
        with torch.no_grad():
            torch._foreach_copy_(self.start_views, tracked.replica)
            self.global_.copy_(self.start)
            self.restore_global(saved or {})

    def delta_into_start(self) -> None:
        """``S ← R − S``: until the launch copies it to the wire, ``S`` holds this round's ``Δ``."""
        self.start.neg_()
        torch._foreach_add_(self.start_views, self._tracked.replica)

    def write_replica(self) -> None:
        """``R ← S``. Writing ``G + Δ`` into a narrow ``R`` rounds it: ``S`` is then re-read from ``R``, so that the
        next ``Δ`` measures only the optimizer's progress."""
        torch._foreach_copy_(self._tracked.replica, self.start_views)
        if self._tracked.replica_is_narrow:
            torch._foreach_copy_(self.start_views, self._tracked.replica)

    @torch.no_grad()
    def restore_global(self, saved: Mapping[str, Tensor]) -> int:
        """Set ``G`` of each tensor from ``saved`` where the saved value rounds to the replica. Returns how many."""
        restored = 0
        for name, tensor, view in zip(self._tracked.names, self._tracked.replica, self.global_views):
            value = saved.get(name)
            if value is not None and value.shape == view.shape:
                value = value.to(device=view.device, dtype=view.dtype)
                if torch.equal(value.to(tensor.dtype), tensor):
                    view.copy_(value)
                    restored += 1
        return restored

    def named_global(self) -> dict[str, Tensor]:
        """``G`` by tensor name (views: they survive a rebuild only if copied by the new buffers)."""
        return dict(zip(self._tracked.names, self.global_views))

    def narrow_global(self) -> dict[str, Tensor]:
        """``G`` of every tensor narrower than ``G``, on the CPU: what a checkpoint needs (elsewhere ``G = R``
        after a flush)."""
        dtype = self._tracked.layout.dtype
        return {
            name: view.detach().cpu().clone()
            for name, tensor, view in zip(self._tracked.names, self._tracked.replica, self.global_views)
            if tensor.dtype != dtype
        }

    @torch.no_grad()
    def drift(self) -> Tensor:
        """``‖R − G‖ / ‖G‖`` as a 0-d tensor (no host sync). One tensor at a time: the scratch is the largest tensor,
        not a flat copy of the model."""
        dtype = self.global_.dtype
        squares = torch.zeros((), dtype=dtype, device=self.global_.device)
        for replica, global_ in zip(self._tracked.replica, self.global_views):
            squares += torch.sub(replica, global_).square().sum(dtype=dtype)
        return squares.sqrt() / torch.linalg.vector_norm(self.global_).clamp_min(torch.finfo(dtype).tiny)
