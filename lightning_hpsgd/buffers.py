"""``G`` and ``S``: the rule's two flat buffers over the tracked tensors' layout, each with a view per tensor, and
the parts of ``R`` and ``S`` in each fragment (``fragments``: contiguous ranges of the flat layout)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_hpsgd.tracked import TrackedTensors

__all__ = ["RuleBuffers", "fragment_ranges"]


def fragment_ranges(numel: int, fragments: int) -> list[tuple[int, int]]:
    """``fragments`` contiguous, near-equal ``[begin, end)`` ranges of a flat buffer of ``numel`` elements."""
    if not 1 <= fragments <= numel:
        raise ValueError(
            f"fragments must be an integer from 1 to the model's {numel} averaged elements; received {fragments!r}."
        )
    size = -(-numel // fragments)
    return [(f * size, min((f + 1) * size, numel)) for f in range(fragments) if f * size < numel]


class RuleBuffers:
    """``G`` (``global_``) and ``S`` (``start``) in the layout's dtype (fp32 or wider), built from ``R``.

    Both start equal to ``R``. ``G`` of a tensor then takes its value from ``saved`` where that value still rounds
    to the replica: the extra bits of ``G`` behind a narrow (bf16/fp16) replica survive a rebuild or a resume, and
    stale values (the model was changed since) are never brought back.

    Args:
        tracked: the tensors and their flat layout.
        saved: earlier values of ``G`` by tensor name (default: none).
        ranges: the fragments' ``[begin, end)`` ranges of the flat layout (default: one, the whole model).
    """

    def __init__(
        self,
        tracked: TrackedTensors,
        saved: Mapping[str, Tensor] | None = None,
        ranges: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self._tracked = tracked
        layout = tracked.layout
        self.ranges = list(ranges or [(0, layout.numel)])
        self._pieces: dict[int, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        self.global_ = layout.new_buffer()
        self.start = layout.new_buffer()
        self.global_views = layout.views(self.global_)
        self.start_views = layout.views(self.start)
        with torch.no_grad():
            torch._foreach_copy_(self.start_views, tracked.replica)
            self.global_.copy_(self.start)
            self.restore_global(saved or {})

    def delta_into_start(self, fragment: int | None = None) -> None:
        """``S ← R − S`` (of one fragment, or of the whole model): until the launch copies it to the wire, ``S``
        holds this round's ``Δ``."""
        replica, start = self.parts(fragment)
        self.start_of(fragment).neg_()
        torch._foreach_add_(start, replica)

    def write_replica(self, fragment: int | None = None) -> None:
        """``R ← S`` (of one fragment, or of the whole model). Writing ``G + Δ`` into a narrow ``R`` rounds it:
        ``S`` is then re-read from ``R``, so that the next ``Δ`` measures only the optimizer's progress."""
        replica, start = self.parts(fragment)
        torch._foreach_copy_(replica, start)
        if self._tracked.replica_is_narrow:
            torch._foreach_copy_(start, replica)

    def start_of(self, fragment: int | None) -> Tensor:
        """``S`` of a fragment (flat), or all of ``S``."""
        return self.start if fragment is None else self.start[slice(*self.ranges[fragment])]

    def global_of(self, fragment: int | None) -> Tensor:
        """``G`` of a fragment (flat), or all of ``G``."""
        return self.global_ if fragment is None else self.global_[slice(*self.ranges[fragment])]

    def parts(self, fragment: int | None) -> tuple[list[Tensor], list[Tensor]]:
        """The pieces of ``R`` in a fragment and the matching views of ``S`` (whole tensors where a tensor lies in
        the fragment; flat slices of the tensors a boundary cuts). ``None``, or the only fragment: every tensor."""
        replica = self._tracked.replica
        if fragment is None or len(self.ranges) == 1:
            return replica, self.start_views
        cached = self._pieces.get(fragment)
        if cached is None or any(a is not b for a, b in zip(cached[0], replica)):
            cached = (list(replica), *self._cut(replica, *self.ranges[fragment]))
            self._pieces[fragment] = cached  # rebuilt when user code replaced a tensor object
        return cached[1], cached[2]

    def _cut(self, replica: Sequence[Tensor], begin: int, end: int) -> tuple[list[Tensor], list[Tensor]]:
        layout = self._tracked.layout
        pieces, starts = [], []
        for name, tensor, offset, numel, view in zip(
            self._tracked.names, replica, layout.offsets, layout.numels, self.start_views
        ):
            low, high = max(begin, offset), min(end, offset + numel)
            if low >= high:
                continue
            if (low, high) == (offset, offset + numel):
                pieces.append(tensor)
                starts.append(view)
                continue
            if not tensor.is_contiguous():
                raise ValueError(
                    f"HPSGD: fragments cut tensor {name!r}, which is not contiguous; make it contiguous or choose"
                    " fragments=1."
                )
            pieces.append(tensor.view(-1)[low - offset : high - offset])
            starts.append(self.start[low:high])
        return pieces, starts

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
