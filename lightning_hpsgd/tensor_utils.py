"""Flat-buffer helpers for the HPSGD engine: layout, packing and broadcast.

Nothing here knows about a training framework: it works on lists of tensors and a process group, in the manner of
``torch.distributed.algorithms.model_averaging.utils``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors

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


# The checksum reads every tensor as 64-bit words and weighs word ``j`` by ``A[j % _BLOCK] * C[j // _BLOCK]``: a
# block of ``_BLOCK`` words is one matrix row, so each tensor's sum is a matrix-vector product (rows by ``A``)
# followed by a short dot product (row sums by ``C``), a few large kernels instead of one per element chunk.
# ``_BLOCK`` is part of the checksum's definition (the same on every device); how many rows one kernel takes is not.
_BLOCK = 1 << 10
# Devices with an integer matrix-vector product (``torch.mv`` on int64). Elsewhere (CUDA), a block of rows is
# multiplied by ``A`` into a temporary of ``_WORDS_PER_KERNEL`` int64 at most (8 MiB), then summed.
_MV_DEVICES = ("cpu",)
_WORDS_PER_KERNEL = 1 << 20
_U64 = 1 << 64
# splitmix64's increment and finalizer multipliers (as in the public-domain splitmix64.c), as signed int64 values.
_GAMMA = 0x9E3779B97F4A7C15 - _U64
_MIX1 = 0xBF58476D1CE4E5B9 - _U64
_MIX2 = 0x94D049BB133111EB - _U64
# Weights per device: ``A`` (``_BLOCK`` entries, by position in a block) and ``C`` (by block, grown on demand).
_IN_BLOCK_WEIGHTS: dict[torch.device, Tensor] = {}
_BLOCK_WEIGHTS: dict[torch.device, Tensor] = {}


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """``x >> bits`` with zeros shifted in (torch's ``>>`` on int64 copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(n: Tensor) -> Tensor:
    """Output ``n`` (counted from 0) of splitmix64 seeded with 0, for an int64 tensor of ``n`` (wrapping arithmetic)."""
    z = (n + 1) * _GAMMA
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _weights(device: torch.device, blocks: int) -> tuple[Tensor, Tensor]:
    """The odd weights ``A`` (``_BLOCK`` of them, splitmix64's even outputs) and ``C`` (at least ``blocks``, its odd
    outputs) on ``device``, computed once on the CPU so that every device uses the same ones."""
    in_block = _IN_BLOCK_WEIGHTS.get(device)
    if in_block is None:
        in_block = _IN_BLOCK_WEIGHTS[device] = (_splitmix64(torch.arange(0, 2 * _BLOCK, 2)) | 1).to(device)
    per_block = _BLOCK_WEIGHTS.get(device)
    if per_block is None or per_block.numel() < blocks:
        size = max(blocks, 1024, 0 if per_block is None else 2 * per_block.numel())
        per_block = _BLOCK_WEIGHTS[device] = (_splitmix64(torch.arange(1, 2 * size, 2)) | 1).to(device)
    return in_block, per_block


def _row_sums(matrix: Tensor, weights: Tensor) -> Tensor:
    """``matrix @ weights`` for an int64 matrix and vector, wrapping modulo ``2**64``: one matrix-vector product on
    the CPU (no temporary); elsewhere, where integer ``mv`` does not exist, a multiply and a row sum per block of
    rows."""
    if matrix.device.type in _MV_DEVICES:
        return torch.mv(matrix, weights)
    rows = max(1, _WORDS_PER_KERNEL // max(1, matrix.shape[1]))
    if matrix.shape[0] <= rows:
        return (matrix * weights).sum(1)
    return torch.cat([(matrix[r : r + rows] * weights).sum(1) for r in range(0, matrix.shape[0], rows)])


def _words(tensor: Tensor) -> Tensor:
    """The tensor's bytes, flattened, as int64 words; the last word is padded with zero bytes. A copy only when the
    tensor is not contiguous, not 8-byte aligned or not a whole number of words."""
    flat = tensor.detach().reshape(-1).contiguous()
    size = flat.element_size()
    pad = -flat.numel() % (8 // size) if size < 8 else 0
    if pad or (flat.storage_offset() * size) % 8 or flat.data_ptr() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(torch.int64)


def checksums(tensors: Sequence[Tensor]) -> Tensor:
    """A 64-bit checksum of each tensor's bits: ``sum_j word_j * w_j`` modulo ``2**64``, ``w_j`` odd and set by ``j``.

    ``word_j`` is the ``j``-th 64-bit word of the tensor's bytes (flattened in row-major order, the last word padded
    with zero bytes, read in the machine's byte order), so a word holds 1, 2, 4 or 8 whole elements and one element
    lies within one word. The weight of
    word ``j`` is ``A[j % 1024] * C[j // 1024]``, both odd values of splitmix64, so it depends on ``j`` only.

    Two tensors that differ in one element always get different checksums (the word that holds it differs, and
    ``w_j`` is odd, so it is invertible modulo ``2**64``); tensors that differ in several elements collide with
    probability about ``2**-64``. The sum wraps modulo ``2**64`` in any order, so the result depends neither on how
    the device reduces it nor on the other tensors of the list: integer arithmetic only, the same on every device.

    A few kernels per tensor at most: tensors of up to 1024 words with the same dtype and size are read together,
    as the rows of one matrix; each other one is a matrix of 1024-word rows. Either way a matrix-vector product by
    ``A``, then a dot product of the row sums with ``C``. On a CPU that costs about twice a plain sum of the same
    tensors, and less than one for many small tensors (``python -m lightning_hpsgd.bench checksum``).

    Args:
        tensors: floating-point tensors on one device (any shape and dtype; the bits are read, not the values).

    Returns:
        An int64 tensor of ``len(tensors)`` checksums, on the tensors' device.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    device = tensors[0].device
    # Tensors of one dtype and size that fit in one row and fill whole words: one matrix, one row each (copied
    # together, so aligned). The others, each on its own. An empty tensor's checksum is 0.
    rows_of: dict[tuple[torch.dtype, int], list[int]] = {}
    single: list[int] = []
    for i, tensor in enumerate(tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes and nbytes % 8 == 0 and nbytes <= 8 * _BLOCK:
            rows_of.setdefault((tensor.dtype, tensor.numel()), []).append(i)
        elif nbytes:
            single.append(i)
    for key in [key for key, indices in rows_of.items() if len(indices) == 1]:
        single.extend(rows_of.pop(key))
    blocks = max((-(-tensors[i].numel() * tensors[i].element_size() // (8 * _BLOCK)) for i in single), default=1)
    in_block, per_block = _weights(device, blocks)
    owners: list[int] = []
    values: list[Tensor] = []
    with torch.no_grad():
        for indices in rows_of.values():
            flat = _flatten_dense_tensors([tensors[i] for i in indices]).view(torch.int64)
            width = flat.numel() // len(indices)
            # All are block 0: weight C[0].
            values.append(_row_sums(flat.view(len(indices), width), in_block[:width]) * per_block[0])
            owners.extend(indices)
        for i in single:
            words = _words(tensors[i])
            full, rest = divmod(words.numel(), _BLOCK)
            sums = []
            if full:
                sums.append(_row_sums(words[: full * _BLOCK].view(full, _BLOCK), in_block))
            if rest:
                sums.append(_row_sums(words[full * _BLOCK :].view(1, rest), in_block[:rest]))
            row_sums = sums[0] if len(sums) == 1 else torch.cat(sums)
            values.append(_row_sums(row_sums.view(1, -1), per_block[: row_sums.numel()]))
            owners.append(i)
        # Back in the list's order; an empty tensor takes the 0 appended last.
        where = [len(owners)] * len(tensors)
        for k, i in enumerate(owners):
            where[i] = k
        values.append(torch.zeros(1, dtype=torch.int64, device=device))
        return torch.cat(values)[torch.tensor(where, dtype=torch.int64, device=device)]


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
