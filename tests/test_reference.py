"""The real strategy (Lightning, 2 CPU processes, gloo) against the reference simulation of docs/algorithm.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.launch import run_ranks
from tests.models import build_net, make_batches
from tests.reference import plain_training, simulate

NUM_BATCHES = 7  # not a multiple of 3, so the final flush carries a partial round


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def final_net(result) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in result["final"].items()}


def assert_matches(result, model: nn.Module) -> None:
    expected = model.state_dict()
    got = final_net(result)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("sync_every", [1, 3])
@pytest.mark.parametrize("merge", ["replica", "stale"])
def test_strategy_matches_reference_simulation(tmp_path, merge, sync_every):
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "merge": merge, "sync_every": sync_every}
    results = run_ranks("fit", tmp_path, args)
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(2)]
    reference = simulate(build_net(), sgd, batches, sync_every, merge, mse)
    for r in results:
        assert_matches(r.result, reference)
        assert r.result["global_step"] == NUM_BATCHES
    # The ranks took different data, so the reference itself differs from plain training on either stream.
    plain = plain_training(build_net(), sgd, batches[0], mse)
    assert not torch.allclose(plain.state_dict()["0.weight"], reference.state_dict()["0.weight"], atol=1e-4)


@pytest.mark.parametrize(
    ("merge", "sync_every", "nesterov"),
    [("replica", 1, True), ("replica", 3, False), ("stale", 1, False), ("stale", 3, True)],
)
def test_outer_optimizer_matches_reference_simulation(tmp_path, merge, sync_every, nesterov):
    outer = {"outer_lr": 0.7, "outer_momentum": 0.8, "outer_nesterov": nesterov}
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "merge": merge, "sync_every": sync_every}
    results = run_ranks("fit", tmp_path, {**args, "strategy_args": outer})
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(2)]
    reference = simulate(build_net(), sgd, batches, sync_every, merge, mse, **outer)
    for r in results:
        assert_matches(r.result, reference)
    # The outer optimizer changed the result: plain HPSGD's reference differs.
    plain = simulate(build_net(), sgd, batches, sync_every, merge, mse)
    assert not torch.allclose(plain.state_dict()["0.weight"], reference.state_dict()["0.weight"], atol=1e-4)


def test_outer_optimizer_steps_parameters_and_batchnorm_statistics_take_the_plain_mean(tmp_path):
    """Momentum on a running variance can drive it negative (NaN losses): the outer step is for what the
    optimizers train; BatchNorm's statistics take the plain mean, as in the reference."""
    outer = {"outer_lr": 0.8, "outer_momentum": 0.6}
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 3, "model_args": {"batchnorm": True}}
    results = run_ranks("fit", tmp_path, {**args, "strategy_args": outer})
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(2)]
    reference = simulate(build_net(batchnorm=True), sgd, batches, 3, "replica", mse, **outer)
    for r in results:
        assert_matches(r.result, reference)
        assert (r.result["final"]["net.1.running_var"] > 0).all()


def test_identical_data_replica_matches_single_process_and_stale_does_not(tmp_path):
    batches = make_batches(NUM_BATCHES, 8, seed=100)
    plain = plain_training(build_net(), sgd, batches, mse)
    args = {"per_rank_data": True, "same_data": True, "num_batches": NUM_BATCHES, "sync_every": 2}
    for r in run_ranks("fit", tmp_path / "replica", dict(args, merge="replica")):
        assert_matches(r.result, plain)
    for r in run_ranks("fit", tmp_path / "stale", dict(args, merge="stale")):
        with pytest.raises(AssertionError):
            assert_matches(r.result, plain)


def test_one_worker_matches_plain_training(tmp_path):
    batches = make_batches(NUM_BATCHES, 8, seed=100)
    (result,) = run_ranks("fit", tmp_path, {"per_rank_data": True, "num_batches": NUM_BATCHES}, world_size=1)
    assert_matches(result.result, plain_training(build_net(), sgd, batches, mse))


def test_manual_optimization_and_gradient_accumulation_match_the_reference(tmp_path):
    """Sync points follow optimizer steps whatever drives them: manual optimization (H=3), and accumulation of two
    batches per step (H=2; a step on two batches of 8 is a step on their concatenation)."""
    batches = [make_batches(8, 8, seed=100 + r) for r in range(2)]
    base = {"per_rank_data": True, "num_batches": 8}
    manual = run_ranks("fit", tmp_path / "manual", {**base, "sync_every": 3, "model_args": {"manual": True}})
    reference = simulate(build_net(), sgd, batches, 3, "replica", mse)
    for r in manual:
        assert_matches(r.result, reference)
        assert r.result["rounds"] == 8 // 3 + 1
    accumulated = run_ranks("fit", tmp_path / "accumulated", {**base, "sync_every": 2, "accumulate": 2})
    paired = [[(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(bs[::2], bs[1::2])] for bs in batches]
    reference = simulate(build_net(), sgd, paired, 2, "replica", mse)
    for r in accumulated:
        assert_matches(r.result, reference)
        assert r.result["global_step"] == 4 and r.result["rounds"] == 4 // 2 + 1
