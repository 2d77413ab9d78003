"""A mid-epoch resume is exact with shuffled data, given a sampler whose position the checkpoint holds.

``StatefulDataLoader(shuffle=True)`` under a distributed strategy is not exact, under DDP as under HPSGD: Lightning
does not recognise torchdata's ``RandomSampler`` as its own ``RandomSampler``, so it wraps it in a
``DistributedSamplerWrapper``, which is not stateful. The checkpoint keeps only the count of samples the epoch
used; the wrapped sampler's generator is not saved, and draws a new permutation at each ``iter()``: once per epoch
in a run, three times while a resume restores the loader. The resumed epoch goes on in another order. torchdata's
``StatefulDistributedSampler`` is a ``DistributedSampler`` that Lightning leaves in place: its permutation follows
from the seed and the epoch, and the checkpoint holds its position (docs/multinode.md, "Preemption").
"""

from __future__ import annotations

import torch

from tests.launch import run_ranks

# 6 steps per epoch on each of 2 ranks; a checkpoint every 4 steps: at step 4 in epoch 0, at step 8 in epoch 1.
ARGS = {"num_batches": 6, "max_epochs": 2, "sync_every": 2, "checkpoint": {"every_n_train_steps": 4}}


def final_parameters_after_resumes(tmp_path, shuffle: str, steps: tuple[int, ...]):
    """The uninterrupted run's results, and those of a run resumed from its checkpoint at each of ``steps``."""
    args = {**ARGS, "shuffle": shuffle}
    first = run_ranks("fit", tmp_path / "a", args)
    resumed = {}
    for step in steps:
        (ckpt,) = (tmp_path / "a" / "ckpt").glob(f"*-step={step}.ckpt")
        resumed[step] = run_ranks("fit", tmp_path / f"from{step}", {**args, "resume_from": str(ckpt)})
        assert [r.result["start_step"] for r in resumed[step]] == [step, step]
    return first, resumed


def test_a_stateful_distributed_sampler_resumes_exactly_in_mid_epoch(tmp_path):
    """Resumed in epoch 0 and in epoch 1, each rank ends bit-identical to the uninterrupted run."""
    first, resumed = final_parameters_after_resumes(tmp_path, "sampler", (4, 8))
    assert [r.result["train_sampler"] for r in first] == [("StatefulDistributedSampler", True)] * 2
    for step, runs in resumed.items():
        for a, b in zip(first, runs):
            assert b.result["global_step"] == a.result["global_step"] == 12
            for name, value in a.result["final"].items():
                assert torch.equal(b.result["final"][name], value), f"rank {a.rank}: {name} after the resume at {step}"


def test_a_shuffling_stateful_data_loader_does_not_resume_exactly(tmp_path):
    """The limitation the Multi-node page states (Lightning 2.6, torchdata 0.11). If this fails, an upstream release
    made ``StatefulDataLoader(shuffle=True)`` exact: the page and train.py can say so."""
    first, resumed = final_parameters_after_resumes(tmp_path, "loader", (4,))
    assert [r.result["train_sampler"] for r in first] == [("DistributedSamplerWrapper", True)] * 2
    for a, b in zip(first, resumed[4]):
        assert not torch.equal(b.result["final"]["net.0.weight"], a.result["final"]["net.0.weight"])
