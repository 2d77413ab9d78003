"""Every rank ends with the same model, whatever the module does to its tensors (real Trainers, 2 gloo processes)."""

from __future__ import annotations

import torch

from tests.launch import run_ranks


def fit(tmp_path, **args):
    base = {"val": True, "max_epochs": 2, "num_batches": 6, "sync_every": 2}
    return [r.result for r in run_ranks("fit", tmp_path, {**base, **args})]


def assert_identical(results, key: str = "final") -> None:
    for r in results[1:]:
        assert r[key].keys() == results[0][key].keys()
        for name, value in r[key].items():
            assert torch.equal(value, results[0][key][name]), f"{name} differs between rank 0 and rank {r['rank']}"


def numel(state: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix) and v.is_floating_point())


def test_ema_teacher_is_averaged_and_a_frozen_backbone_costs_no_bytes(tmp_path):
    """A mean teacher updated from the student in on_train_batch_end (never by the optimizer): the students differ
    between flushes, so the teachers drift apart, until the first flush finds them changed and averages them from
    then on. The frozen first layer never changes, so it is never sent."""
    results = fit(tmp_path, model_args={"ema_teacher": 0.9, "frozen_first": True}, save_after_fit=True)
    assert_identical(results)
    first = results[0]
    assert not torch.equal(first["final"]["teacher.2.weight"], first["initial"]["teacher.2.weight"])
    assert torch.equal(first["final"]["net.0.weight"], first["initial"]["net.0.weight"])
    # The teachers were identical at every validation (each starts with a flush): averaged since the first one.
    for r in results:
        assert len(r["at_validation"]) == 2
        for name, value in r["at_validation"][1].items():
            assert torch.equal(value, first["at_validation"][1][name]), name
    stats = first["stats"]
    # teacher.2.weight and .bias; teacher.0 follows the frozen net.0, so neither ever changes nor costs a byte.
    assert stats["promoted"] == 2
    trainable = numel(first["final"], "net.") - numel(first["final"], "net.0.")
    assert stats["bytes_per_round"] == 4 * (trainable + numel(first["final"], "teacher.2."))
    ckpt = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)
    for name, value in first["final"].items():
        assert torch.equal(ckpt["state_dict"][name], value), name


def test_a_constant_float_buffer_costs_no_bytes_and_batchnorm_statistics_still_do(tmp_path):
    """A causal mask kept as a 64 x 64 float buffer (nanoGPT style) is 28 times the MLP's parameters: it never
    changes, so it is never sent; BatchNorm's running statistics change at every forward and are sent."""
    results = fit(tmp_path, model_args={"constant_buffer": 64, "batchnorm": True})
    assert_identical(results)
    final = results[0]["final"]
    trainable = sum(v.numel() for k, v in final.items() if k.startswith("net.") and "running" not in k
                    and v.is_floating_point())  # fmt: skip
    statistics = numel(final, "net.1.running_")
    assert results[0]["stats"]["bytes_per_round"] == 4 * (trainable + statistics)
    assert torch.equal(final["mask"], torch.tril(torch.ones(64, 64)))


def test_setup_starts_every_rank_from_rank_0_and_replaced_or_new_tensors_are_followed(tmp_path):
    """Ranks start from different weights, BatchNorm statistics and frozen weights (setup broadcasts rank 0's). At
    step 3 the module replaces a parameter by a new object (moving it into the optimizer) and registers a buffer,
    both with values that differ by rank: the strategy follows both before the batch trains and averages them."""
    args = {"rank_init": True, "model_args": {"batchnorm": True, "frozen_first": True, "replace_at_step": 3}}
    results = fit(tmp_path, **args, record_every_step=True)
    first = results[0]
    assert not torch.equal(first["pre_fit"]["net.0.weight"], results[1]["pre_fit"]["net.0.weight"])
    assert_identical(results, "initial")
    for name, value in first["initial"].items():
        assert torch.equal(value, first["pre_fit"][name]), f"{name}: rank 0's weights are not the starting point"
    assert_identical(results)
    # The new buffer held the rank (0 and 1) until averaged; nothing changes it afterwards.
    assert torch.equal(first["final"]["extra"], torch.full((3,), 0.5))
    # The replaced parameter kept training after the replacement, in every round (rounds: 6 sync points, 2
    # validation flushes, the end-of-fit flush and one flush when the structure changed).
    assert not torch.equal(first["final"]["net.3.weight"], first["by_step"][4]["net.3.weight"])
    assert first["rounds"] == 12 // 2 + 2 + 1 + 1


def test_swa_with_batchnorm_ends_identical_on_every_rank(tmp_path):
    """Lightning's StochasticWeightAveraging replaces BatchNorm's running statistics by new tensors and recomputes
    them in an extra epoch on each rank's own data; the end-of-fit flush runs after SWA's on_train_end."""
    results = fit(tmp_path, val=False, max_epochs=3, swa=True, model_args={"batchnorm": True}, save_after_fit=True)
    assert_identical(results)
    first = results[0]
    assert first["global_step"] > 3 * 6  # SWA's extra epoch ran
    assert not torch.equal(first["final"]["net.1.running_mean"], first["initial"]["net.1.running_mean"])
    ckpt = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)
    for name, value in first["final"].items():
        assert torch.equal(ckpt["state_dict"][name], value), name


def test_a_second_fit_starts_from_the_weights_the_user_set(tmp_path):
    """bf16-true keeps G in fp32 beside the bf16 weights. Set every weight to 0.5 after a fit and fit again with
    lr = 0 on the same Trainer: the weights stay 0.5 (the last fit's G must not come back)."""
    results = fit(tmp_path, precision="bf16-true", val=False, max_epochs=1, refit=True)
    for r in results:
        for name, value in r["refit_final"].items():
            if value.is_floating_point() and name.startswith("net."):
                assert torch.equal(value, torch.full_like(value, 0.5)), name
