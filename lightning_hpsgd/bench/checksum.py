"""``python -m lightning_hpsgd.bench checksum``: the cost of the post-flush checksum against a plain sum.

After each flush, [`check_identical`][lightning_hpsgd.integrity.check_identical] hashes every floating-point tensor
of the model, frozen ones included, with [`checksums`][lightning_hpsgd.tensor_utils.checksums]. This times it side
by side with a plain sum of the same tensors (``torch.stack([t.sum() for t in tensors])``, one value per tensor) and
with the implementation it replaced (one kernel per tensor and per chunk of elements, kept here as
``_checksums_unbatched``), on two cases:

* **resnet50**: torchvision's ResNet-50 (``weights=None``, nothing downloaded), its parameters and floating-point
  buffers: 267 tensors, 25.6 M elements, most of them in large convolutions;
* **300 x 64**: 300 fp32 tensors of 64 elements (per-tensor overhead only).

The three alternate within each repeat; each figure is the median over the repeats of the time per call.
``python -m lightning_hpsgd.bench.checksum`` runs it too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_hpsgd.extras import require
from lightning_hpsgd.tensor_utils import checksums

# The implementation before the batched one (same contract, different weights), for the figure before and after.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POSITION_MULTIPLIER = -7046029254386353131
_CHECKSUM_CHUNK = 1 << 20


def _checksums_unbatched(tensors: Sequence[Tensor]) -> Tensor:
    """The previous ``checksums``: per tensor and per chunk of 2**20 elements, ``sum_i bits_i * w_i`` with
    ``w_i = (i * 0x9E3779B97F4A7C15) | 1``."""
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


def _plain_sum(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.sum() for t in tensors])


METHODS: dict[str, Callable[[Sequence[Tensor]], Tensor]] = {
    "sum": _plain_sum,
    "checksums": checksums,
    "unbatched": _checksums_unbatched,
}


def resnet50_tensors(device: torch.device) -> list[Tensor]:
    """ResNet-50's parameters and floating-point buffers (random initialization), as the integrity check sees them."""
    resnet50 = require("torchvision.models", "The ResNet-50 integrity check").resnet50
    model = resnet50(weights=None).to(device)
    return [p.detach() for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]


def small_tensors(device: torch.device, count: int = 300, numel: int = 64) -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(numel, generator=generator).to(device) for _ in range(count)]


def _seconds_per_call(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def measure_case(tensors: Sequence[Tensor], repeats: int = 7, min_seconds: float = 0.05) -> dict[str, Any]:
    """Median seconds per call of each method over ``repeats`` (methods alternating, in a rotating order), each
    repeat calling a method often enough to last about ``min_seconds``."""
    device = tensors[0].device
    calls = {}
    for name, method in METHODS.items():
        warm = _seconds_per_call(lambda method=method: method(tensors), 1, device)
        calls[name] = max(1, round(min_seconds / max(warm, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    names = list(METHODS)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            method = METHODS[name]
            times[name].append(_seconds_per_call(lambda method=method: method(tensors), calls[name], device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "tensors": len(tensors),
        "elements": sum(t.numel() for t in tensors),
        "median_s": medians,
        "over_sum": {name: medians[name] / medians["sum"] for name in METHODS},
        "per_repeat_s": times,
    }


def measure(device: str = "cpu", repeats: int = 7, min_seconds: float = 0.05) -> dict[str, Any]:
    """Both cases on ``device``: for each, the median time per call of each method and its ratio to the sum."""
    dev = torch.device(device)
    cases = {"resnet50": resnet50_tensors(dev), "300 x 64": small_tensors(dev)}
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "cases": {name: measure_case(tensors, repeats, min_seconds) for name, tensors in cases.items()},
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"checksums against a plain sum on {result['device']} ({result['threads']} threads), median of"
        f" {result['repeats']} repeats, ms per call (x: over the sum)",
        f"  {'case':<10} {'tensors':>7} {'elements':>10} {'sum':>9} {'checksums':>17} {'before (unbatched)':>19}",
    ]
    for name, case in result["cases"].items():
        ms, over = case["median_s"], case["over_sum"]
        lines.append(
            f"  {name:<10} {case['tensors']:>7} {case['elements']:>10} {1000 * ms['sum']:>9.3f}"
            f" {1000 * ms['checksums']:>9.3f} ({over['checksums']:>5.2f}x)"
            f" {1000 * ms['unbatched']:>10.3f} ({over['unbatched']:>5.1f}x)"
        )
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hpsgd.bench checksum",
        description="The post-flush checksum (tensor_utils.checksums) against a plain sum of the same tensors and"
        " against the unbatched implementation it replaced: ResNet-50's tensors and 300 tensors of 64 elements.",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.05, help="time per method and repeat, at least")
    options = parser.parse_args(args)
    if options.threads:
        torch.set_num_threads(options.threads)
    print(report(measure(options.device, options.repeats, options.min_seconds)))


if __name__ == "__main__":
    main()
