"""What a user's unchanged module does under the strategy: precisions, optimization styles, layers, evaluation."""

from __future__ import annotations

import pytest
import torch

from tests.launch import run_ranks

BATCHES_PER_RANK = 6
EPOCHS = 2


def fit(tmp_path, **args):
    base = {"val": True, "after_fit": True, "max_epochs": EPOCHS, "num_batches": BATCHES_PER_RANK}
    return [r.result for r in run_ranks("fit", tmp_path, {**base, **args})]


def rounds_of(sync_every: int, steps: int = EPOCHS * BATCHES_PER_RANK, flushes: int = EPOCHS + 1) -> int:
    """Rounds merged by the end of fit: one per sync point, one per flush (each validation, and the end of fit)."""
    return steps // sync_every + flushes


def assert_flushed_and_trained(results, rounds: int) -> None:
    """Every rank ends with the same, changed, finite model after exactly ``rounds`` rounds; evaluation after fit
    sees that model (each rank's own output on the same inputs, no metric synchronisation)."""
    first = results[0]
    for r in results:
        assert not r["pending_at_end"]
        assert r["rounds"] == rounds, f"rank {r['rank']}: {r['rounds']} rounds, expected {rounds}"
        for name, value in r["final"].items():
            assert torch.equal(value, first["final"][name]), f"{name} differs between ranks after fit"
            assert torch.equal(r["after_test_params"][name], value), f"{name} changed during test/predict"
        assert torch.equal(r["eval_output"], first["eval_output"])
        assert all(torch.isfinite(p).all() for p in r["predict"])
        # Users' validation hooks already see the flushed model.
        for mine, theirs in zip(r.get("at_validation", []), first.get("at_validation", [])):
            for name, value in mine.items():
                assert torch.equal(value, theirs[name]), f"{name} differs between ranks at validation start"
    changed = [
        n for n, v in first["final"].items() if v.is_floating_point() and not torch.equal(v, first["initial"][n])
    ]
    assert changed, "training did not change the model"
    for value in first["final"].values():
        assert torch.isfinite(value.float()).all()


@pytest.mark.parametrize(
    ("precision", "param_dtype", "global_dtype"),
    [
        ("32-true", torch.float32, torch.float32),
        ("64-true", torch.float64, torch.float64),
        ("bf16-mixed", torch.float32, torch.float32),
        ("bf16-true", torch.bfloat16, torch.float32),
    ],
)
def test_precisions(tmp_path, precision, param_dtype, global_dtype):
    results = fit(tmp_path, precision=precision, sync_every=2)
    assert_flushed_and_trained(results, rounds_of(2))
    assert len(results[0]["at_validation"]) == EPOCHS
    for r in results:
        assert set(r["param_dtypes"].values()) == {param_dtype}
        assert r["global_dtype"] == global_dtype
    assert results[0]["losses"][-1] < results[0]["losses"][0]


def test_16_mixed_on_cpu_runs_as_bf16_mixed(tmp_path):
    results = fit(tmp_path, precision="16-mixed")
    assert_flushed_and_trained(results, rounds_of(1))
    assert results[0]["precision"] == "bf16-mixed"


def test_comm_dtype_bf16(tmp_path):
    results = fit(tmp_path, comm_dtype="bf16")
    assert_flushed_and_trained(results, rounds_of(1))
    assert results[0]["wire_dtype"] == torch.bfloat16 and results[0]["global_dtype"] == torch.float32


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    results = fit(tmp_path, accumulate=3, sync_every=1, val=False)
    assert_flushed_and_trained(results, rounds_of(1, steps=EPOCHS * BATCHES_PER_RANK // 3, flushes=1))
    steps = EPOCHS * BATCHES_PER_RANK // 3
    assert results[0]["global_step"] == steps
    # One round per optimizer step, plus the final flush.
    assert results[0]["rounds"] == steps + 1


def test_gradient_clipping_and_lr_scheduler(tmp_path):
    results = fit(tmp_path, clip=0.01, model_args={"scheduler": True, "lr": 0.2})
    assert_flushed_and_trained(results, rounds_of(1))


def test_manual_optimization_with_scheduler(tmp_path):
    results = fit(tmp_path, model_args={"manual": True, "scheduler": True}, sync_every=2)
    assert_flushed_and_trained(results, rounds_of(2))
    assert results[0]["global_step"] == EPOCHS * BATCHES_PER_RANK


def test_two_optimizers_gan_style(tmp_path):
    results = [r.result for r in run_ranks("fit", tmp_path, {"model": "gan", "max_epochs": 1, "sync_every": 3})]
    steps = 2 * BATCHES_PER_RANK  # a generator and a discriminator step per batch
    for r in results:
        assert r["global_step"] == steps
        # H counts batches that stepped, not optimizer calls: 6 batches, a round every 3, and the final flush.
        assert r["rounds"] == BATCHES_PER_RANK // 3 + 1
        for name, value in r["final"].items():
            assert torch.equal(value, results[0]["final"][name])
            assert not torch.equal(value, r["initial"][name])


@pytest.mark.parametrize("sync_every", [1, 2, 3])
def test_lightning_docs_gan_backpropagates_through_g_x_after_the_discriminator_step(tmp_path, sync_every):
    """Lightning's manual-optimization GAN: ``g_X = G(z)`` once, step D, then G's loss through ``g_X``. A round
    ending inside D's ``step()`` would rewrite G's weights that the graph of ``g_X`` saved ("modified by an inplace
    operation"): rounds end at the batch boundary, every ``sync_every`` batches."""
    args = {"model": "gan", "model_args": {"docs_order": True}, "max_epochs": 1, "sync_every": sync_every}
    results = [r.result for r in run_ranks("fit", tmp_path, args)]
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["global_step"] == 2 * BATCHES_PER_RANK
        assert r["rounds"] == BATCHES_PER_RANK // sync_every + 1
        for name, value in r["final"].items():
            assert torch.equal(value, results[0]["final"][name])
            assert not torch.equal(value, r["initial"][name])


def test_batchnorm_buffers_are_averaged(tmp_path):
    results = fit(tmp_path, model_args={"batchnorm": True})
    assert_flushed_and_trained(results, rounds_of(1))
    final = results[0]["final"]
    assert not torch.equal(final["net.1.running_mean"], results[0]["initial"]["net.1.running_mean"])
    # The integer counter stays local but equal on every rank: each rank counted its own batches.
    assert int(final["net.1.num_batches_tracked"]) == EPOCHS * BATCHES_PER_RANK


def test_frozen_parameters_stay_put(tmp_path):
    results = fit(tmp_path, model_args={"frozen_first": True})
    assert_flushed_and_trained(results, rounds_of(1))
    for r in results:
        assert torch.equal(r["final"]["net.0.weight"], r["initial"]["net.0.weight"])
        assert not torch.equal(r["final"]["net.2.weight"], r["initial"]["net.2.weight"])


def test_unfreezing_during_fit_brings_the_layer_into_the_average(tmp_path):
    results = fit(tmp_path, model_args={"frozen_first": True, "unfreeze_at_epoch": 1})
    # Ranks saw different data: without averaging, net.0 would differ. Unfreezing costs one flush (a rebuild).
    assert_flushed_and_trained(results, rounds_of(1, flushes=EPOCHS + 2))
    assert not torch.equal(results[0]["final"]["net.0.weight"], results[0]["initial"]["net.0.weight"])


def test_sync_points_follow_global_step_when_steps_are_skipped(tmp_path):
    """A module that steps every other batch: global_step counts every batch, and so do sync points."""
    results = fit(tmp_path, model_args={"step_every_other": True}, sync_every=2, val=False)
    assert_flushed_and_trained(results, rounds_of(2, flushes=1))
    taken = EPOCHS * BATCHES_PER_RANK // 2
    assert results[0]["global_step"] == EPOCHS * BATCHES_PER_RANK
    # Each real step lands on an even global step (2, 4, ...), so each one ends a round; plus the final flush.
    assert results[0]["rounds"] == taken + 1


def test_max_time_and_sigterm_need_no_collective_per_batch(tmp_path):
    """Lightning broadcasts a SIGTERM flag before every batch and Timer's verdict after it; HPSGD carries both in
    its rounds' side channel, so training runs without a per-batch collective and still stops on the same step."""
    # The Timer's clock counts batches (1 s each), so the 64 s limit is reached at step 64 on every rank, however
    # fast the machine. Each rank asks to stop in the next round it launches, and every rank stops at the sync
    # point that merges it: at most two rounds (2 H steps) past the limit, long before the epoch's 400 batches.
    # HPSGDMonitor is on and would log every step, but there is no logger to write to: no collective either.
    sync_every, limit = 2, 64
    args = {"max_time_s": limit, "timer_s_per_batch": 1, "num_batches": 400, "max_epochs": 1, "count_broadcasts": True,
            "sync_every": sync_every, "log_every_n_steps": 1, "model_args": {"log_sync_dist": False}}  # fmt: skip
    results = fit(tmp_path, **args)
    steps = {r["global_step"] for r in results}
    assert len(steps) == 1, steps  # the time limit ended fit on the same step everywhere
    (step,) = steps
    assert limit <= step <= limit + 2 * sync_every, step
    for r in results:
        assert r["broadcasts_during_training"] < 5, r["broadcasts_during_training"]
