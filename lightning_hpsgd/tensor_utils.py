"""Flat-buffer helpers for the HPSGD engine: layout, packing and broadcast.

Nothing here knows about a training framework: it works on lists of tensors and a process group, in the manner of
``torch.distributed.algorithms.model_averaging.utils``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "FlatLayout",
    "accumulation_dtype",
    "average_tensors",
    "broadcast_tensors",
    "checksums",
    "differs_across_ranks",
]


def accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype that holds every tensor exactly: never below fp32, never below the widest tensor's dtype.

    Args:
        tensors: floating-point tensors.

    Returns:
        ``torch.float64`` if any tensor is fp64, else ``torch.float32``.
    """
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


class FlatLayout:
    """Where each tensor of a list lives inside one flat buffer.

    Args:
        tensors: the tensors to lay out, all on one device. Their order is the order in the buffer.
        dtype: the buffer's dtype.
    """

    def __init__(self, tensors: Sequence[Tensor], dtype: torch.dtype) -> None:
        if not tensors:
            raise ValueError("FlatLayout needs at least one tensor; received an empty list.")
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(
                f"All tensors must be on one device to share a flat buffer; found {sorted(map(str, devices))}."
            )
        self.device: torch.device = devices.pop()
        self.dtype = dtype
        self.shapes = [t.shape for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.offsets: list[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.numel = total

    def new_buffer(self, dtype: torch.dtype | None = None, extra: int = 0) -> Tensor:
        """A zeroed flat buffer of ``numel + extra`` elements on the layout's device."""
        return torch.zeros(self.numel + extra, dtype=dtype or self.dtype, device=self.device)

    def views(self, buffer: Tensor) -> list[Tensor]:
        """Views into ``buffer`` shaped like the laid-out tensors (no copy)."""
        return [buffer[o : o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def index_of(self, flat_index: int) -> int:
        """The position, in the tensor list, of the tensor that holds element ``flat_index`` of the buffer."""
        for i in range(len(self.offsets) - 1, -1, -1):
            if flat_index >= self.offsets[i]:
                return i
        raise IndexError(flat_index)


def broadcast_tensors(tensors: Sequence[Tensor], src: int, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, one flat broadcast per dtype.

    Args:
        tensors: tensors of any dtype, on one device; modified in place.
        src: the global rank whose values win.
        group: the process group (default: the world).
    """
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    # Iterate in a fixed order so every rank issues the same sequence of broadcasts.
    for dtype in sorted(by_dtype, key=str):
        group_tensors = by_dtype[dtype]
        layout = FlatLayout(group_tensors, dtype)
        flat = layout.new_buffer()
        with torch.no_grad():
            torch._foreach_copy_(layout.views(flat), [t.detach() for t in group_tensors])
            dist.broadcast(flat, src=src, group=group)
            torch._foreach_copy_([t.detach() for t in group_tensors], layout.views(flat))


# Same-width integer dtypes, to read a floating-point tensor's bits.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# An odd 64-bit multiplier (2**64 / golden ratio, as a signed int64): spreads positions over all 64 bits.
_POSITION_MULTIPLIER = -7046029254386353131
_CHECKSUM_CHUNK = 1 << 20


def checksums(tensors: Sequence[Tensor]) -> Tensor:
    """A 64-bit checksum of each tensor's bits: ``sum_i bits_i * w_i`` modulo ``2**64``, ``w_i`` odd and set by ``i``.

    Two tensors that differ in one element always get different checksums (``w_i`` is odd, so it is invertible
    modulo ``2**64``); tensors that differ in several elements collide with probability about ``2**-64``. The sum
    wraps modulo ``2**64`` in any order, so the result does not depend on how the device reduces it.

    Args:
        tensors: floating-point tensors on one device (any shape and dtype; the bits are read, not the values).

    Returns:
        An int64 tensor of ``len(tensors)`` checksums, on the tensors' device.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    device = tensors[0].device
    positions = torch.arange(_CHECKSUM_CHUNK, dtype=torch.int64, device=device)
    sums = []
    for tensor in tensors:
        bits = tensor.detach().reshape(-1).view(_BITS_DTYPE[tensor.element_size()])
        total = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, bits.numel(), _CHECKSUM_CHUNK):
            chunk = bits[start : start + _CHECKSUM_CHUNK]
            weights = (positions[: chunk.numel()] + start).mul_(_POSITION_MULTIPLIER).bitwise_or_(1)
            total += weights.mul_(chunk).sum()
        sums.append(total)
    return torch.stack(sums)


def differs_across_ranks(values: Tensor, group: dist.ProcessGroup | None = None) -> list[bool]:
    """For each element of an int64 tensor, whether the ranks of ``group`` hold different values (a collective).

    One all-reduce of ``2 * len(values)`` integers: the maximum of the values and of their bitwise complements
    (the complement of the minimum), so no value overflows.
    """
    both = torch.cat([values, torch.bitwise_not(values)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = values.numel()
    return (both[:n] != torch.bitwise_not(both[n:])).tolist()


def average_tensors(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Replace ``tensors`` on every rank by their mean over the ranks of ``group`` (a blocking collective).

    The sum runs in [`accumulation_dtype`][] (fp32 or wider), and every rank writes back the same rounded mean.
    """
    layout = FlatLayout(tensors, accumulation_dtype(tensors))
    flat = layout.new_buffer()
    with torch.no_grad():
        torch._foreach_copy_(layout.views(flat), [t.detach() for t in tensors])
        dist.all_reduce(flat, group=group)
        flat.div_(dist.get_world_size(group))
        torch._foreach_copy_([t.detach() for t in tensors], layout.views(flat))
