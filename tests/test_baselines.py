"""The post-local SGD baseline does local SGD on CPU too: no gradient all-reduce after warm-up, periodic averages."""

from __future__ import annotations

import torch

from tests.launch import run_ranks


def test_post_local_sgd_steps_alone_between_averages_on_cpu(tmp_path):
    args = {"strategy": "localsgd", "record_every_step": True, "num_batches": 16, "max_epochs": 1}
    a, b = (r.result["by_step"] for r in run_ranks("fit", tmp_path, args))

    def same(step: int) -> bool:
        return all(torch.equal(a[step][k], b[step][k]) for k in a[step])

    # Warm-up: 8 steps of DDP (gradients all-reduced), so the ranks stay identical although their data differ.
    assert all(same(step) for step in range(1, 9))
    # Then each rank steps on its own gradients, and PeriodicModelAverager averages the models every 4th step
    # (steps 9, 13, ...): without the hook (Lightning on CPU) the ranks would never differ.
    assert [step for step in range(9, 17) if same(step)] == [9, 13]
