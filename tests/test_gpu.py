"""CUDA/NCCL paths: skipped on machines without a GPU (CI has none); run them where one is present."""

from __future__ import annotations

import pytest
import torch

from tests.launch import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_cuda_nccl_precisions(tmp_path, precision):
    world = min(2, torch.cuda.device_count())
    results = run_ranks(
        "fit",
        tmp_path,
        {
            "accelerator": "gpu",
            "backend": "nccl",
            "precision": precision,
            "max_epochs": 2,
            "val": True,
            "after_fit": True,
            "sync_every": 2,
        },
        world_size=world,
    )
    for r in results:
        assert not r.result["pending_at_end"] and r.result["rounds"] > 0
        assert r.result["global_dtype"] == torch.float32
        for name, value in r.result["final"].items():
            assert torch.isfinite(value.float()).all(), name
            assert torch.equal(value, results[0].result["final"][name])


def test_cuda_engine_matches_reference(tmp_path):
    """The side-stream all-reduce path gives the same model as the reference simulation."""
    from tests.models import build_net, make_batches
    from tests.reference import simulate
    from tests.test_reference import NUM_BATCHES, assert_matches, mse, sgd

    world = min(2, torch.cuda.device_count())
    args = {"accelerator": "gpu", "backend": "nccl", "per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 3}
    results = run_ranks("fit", tmp_path, args, world_size=world)
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(world)]
    reference = simulate(build_net(), sgd, batches, 3, "replica", mse)
    for r in results:
        assert_matches(r.result, reference)
