"""``checksums``: the documented formula, every single-element change and swap caught, independence from the list.

Pure one-process tests; no timing (``python -m lightning_hpsgd.bench.checksum`` measures the cost).
"""

from __future__ import annotations

import struct

import pytest
import torch

from lightning_hpsgd import tensor_utils
from lightning_hpsgd.tensor_utils import checksums

U64 = (1 << 64) - 1
BLOCK = tensor_utils._BLOCK
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def splitmix64(n: int) -> int:
    """Output ``n`` of splitmix64 seeded with 0 (the reference algorithm, in Python integers)."""
    z = ((n + 1) * 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def reference(tensor: torch.Tensor) -> int:
    """The docstring's formula, word by word in Python integers: the sum of ``word_j * A[j % 1024] * C[j // 1024]``."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).tolist()
    data += [0] * (-len(data) % 8)
    words = struct.unpack(f"<{len(data) // 8}Q", bytes(data))
    total = 0
    for j, word in enumerate(words):
        total += word * (splitmix64(2 * (j % BLOCK)) | 1) * (splitmix64(2 * (j // BLOCK) + 1) | 1)
    total &= U64
    return total - (1 << 64) if total >> 63 else total


def one(tensor: torch.Tensor) -> int:
    return checksums([tensor]).item()


def changed(tensor: torch.Tensor, index: int, how: str) -> torch.Tensor:
    """A copy of ``tensor`` with element ``index`` (flat) changed in one bit: the lowest, or the sign."""
    out = tensor.clone()
    bits = out.view(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()])
    mask = 1 if how == "lowest bit" else -(1 << (8 * out.element_size() - 1))
    bits[index] ^= mask
    return out


def test_splitmix64_matches_the_published_sequence():
    # The first outputs of splitmix64 seeded with 0 (Vigna's splitmix64.c).
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    assert [splitmix64(n) for n in range(4)] == expected
    got = tensor_utils._splitmix64(torch.arange(4)).tolist()
    assert [v & U64 for v in got] == expected


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_checksum_is_the_documented_formula(dtype):
    torch.manual_seed(0)
    # A grouped pair (same dtype and size, one row each), odd sizes (a padded last word), one block exactly, more
    # than one block with a partial last row, a 0-d tensor.
    tensors = [torch.randn(2, 8), torch.randn(16), torch.randn(7), torch.randn(3, 5), torch.randn(BLOCK * 8 // 4),
               torch.randn(3 * BLOCK + 5), torch.randn(())]  # fmt: skip
    tensors = [t.to(dtype) for t in tensors]
    assert checksums(tensors).tolist() == [reference(t) for t in tensors]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_single_element_change_is_caught(dtype):
    torch.manual_seed(1)
    per_block = BLOCK * 8 // torch.empty((), dtype=dtype).element_size()
    small = torch.randn(37).to(dtype)
    large = torch.randn(3 * per_block + 3).to(dtype)  # three full rows and a partial one
    for tensor in (small, large):
        base = one(tensor)
        n = tensor.numel()
        positions = {0, 1, n // 2, n - 2, n - 1}
        if n > per_block:
            positions |= {per_block - 1, per_block, per_block + 1, 2 * per_block, 3 * per_block}
        for index in sorted(positions):
            for how in ("lowest bit", "sign bit"):
                assert one(changed(tensor, index, how)) != base, (dtype, n, index, how)


def test_single_element_changes_are_caught_across_kernel_boundaries_without_mv(monkeypatch):
    # The path for devices without an integer mv (CUDA), with kernels of three rows: 4 kernels for this tensor.
    monkeypatch.setattr(tensor_utils, "_MV_DEVICES", ())
    monkeypatch.setattr(tensor_utils, "_WORDS_PER_KERNEL", 3 * BLOCK)
    torch.manual_seed(2)
    tensor = torch.randn(2 * 11 * BLOCK + 1)
    base = one(tensor)
    assert base == reference(tensor)
    for index in (0, 6 * BLOCK - 1, 6 * BLOCK, 6 * BLOCK + 1, 12 * BLOCK, tensor.numel() - 1):
        assert one(changed(tensor, index, "lowest bit")) != base, index


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_swapping_two_elements_is_caught(dtype):
    torch.manual_seed(3)
    per_block = BLOCK * 8 // torch.empty((), dtype=dtype).element_size()
    tensor = torch.randn(2 * per_block + 10).to(dtype)
    base = one(tensor)
    # Within one word, in neighbouring words, across a row boundary, first and last.
    for i, j in ((0, 1), (1, 2), (3, 11), (per_block - 1, per_block), (5, per_block + 5), (0, tensor.numel() - 1)):
        swapped = tensor.clone()
        swapped[i], swapped[j] = tensor[j], tensor[i]
        assert not torch.equal(swapped, tensor)
        assert one(swapped) != base, (i, j)


def test_a_tensors_checksum_does_not_depend_on_the_others_in_the_list():
    torch.manual_seed(4)
    tensors = [torch.randn(64), torch.randn(64), torch.randn(64).half(), torch.randn(5, 5).double(), torch.randn(0),
               torch.randn(3 * BLOCK), torch.randn(64).bfloat16(), torch.randn(7)]  # fmt: skip
    alone = [one(t) for t in tensors]
    assert checksums(tensors).tolist() == alone
    order = [5, 2, 7, 0, 4, 6, 1, 3]
    assert checksums([tensors[k] for k in order]).tolist() == [alone[k] for k in order]
    # A tensor among others of its dtype and size (read as rows of one matrix) or among none.
    assert checksums([tensors[0]] + [torch.randn(64) for _ in range(9)])[0].item() == alone[0]
    assert checksums([torch.randn(64).bfloat16(), tensors[0]])[1].item() == alone[0]


def test_empty_list_and_empty_tensors():
    empty = checksums([])
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    assert checksums([torch.empty(0)]).tolist() == [0]
    assert checksums([torch.empty(0, 3).half(), torch.zeros(0).double()]).tolist() == [0, 0]
    tensor = torch.randn(10)
    assert checksums([torch.empty(0), tensor, torch.empty(2, 0)]).tolist() == [0, one(tensor), 0]


def test_non_contiguous_and_misaligned_tensors_equal_their_contiguous_copies():
    torch.manual_seed(5)
    base = torch.randn(40, 3 * BLOCK + 2)
    views = [
        base.t(),  # transposed, larger than one row
        base[:, ::2],  # strided
        base[1:3, 5:9],  # small and strided
        base.view(-1)[1:65],  # contiguous but misaligned for int64 (an odd float offset)
        base.view(-1)[3 : 3 + 4 * BLOCK],  # misaligned and larger than one row
        base.half()[:, 1:].t(),
        torch.randn(8, 8, dtype=torch.float64)[:, 2],
    ]
    for view in views:
        assert not view.is_contiguous() or view.storage_offset() % 2
    copies = [v.contiguous().clone() for v in views]
    assert checksums(views).tolist() == checksums(copies).tolist() == [reference(c) for c in copies]


def test_result_is_int64_one_per_tensor_on_the_tensors_device_without_grad():
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3000))]
    result = checksums(params)
    assert result.dtype == torch.int64 and result.shape == (2,) and result.device == params[0].device
    assert not result.requires_grad
    assert result.tolist() == [reference(p) for p in params]


def test_equal_tensors_get_equal_checksums_and_the_path_without_mv_agrees(monkeypatch):
    torch.manual_seed(6)
    tensors = [torch.randn(64) for _ in range(5)] + [torch.randn(5 * BLOCK + 3).bfloat16(), torch.randn(9).double()]
    expected = checksums(tensors).tolist()
    assert checksums([t.clone() for t in tensors]).tolist() == expected
    monkeypatch.setattr(tensor_utils, "_MV_DEVICES", ())
    monkeypatch.setattr(tensor_utils, "_WORDS_PER_KERNEL", 2 * BLOCK)
    assert checksums(tensors).tolist() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_checksums_equal_the_cpu_ones():
    torch.manual_seed(7)
    tensors = [torch.randn(64) for _ in range(5)] + [torch.randn(3 * BLOCK + 1).half(), torch.randn(2_000_003),
                                                     torch.randn(33).double(), torch.randn(0)]  # fmt: skip
    on_gpu = checksums([t.cuda() for t in tensors])
    assert on_gpu.device.type == "cuda"
    assert on_gpu.cpu().tolist() == checksums(tensors).tolist()
