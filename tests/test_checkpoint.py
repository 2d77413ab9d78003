"""Checkpoints hold the flushed model and every rank's optimizer state; resuming continues the run."""

from __future__ import annotations

import pytest
import torch

from tests.launch import run_ranks

BASE = {"val": True, "max_epochs": 3, "num_batches": 6, "sync_every": 2}


OUTER = {"outer_lr": 0.8, "outer_momentum": 0.9}


@pytest.mark.parametrize(
    ("precision", "outer"),
    [("32-true", {}), ("bf16-true", {}), ("32-true", OUTER)],
    ids=["32-true", "bf16-true", "outer"],
)
def test_epoch_end_checkpoint_resumes_exactly(tmp_path, precision, outer):
    base = {**BASE, "precision": precision, "strategy_args": outer}
    first = run_ranks("fit", tmp_path / "a", {**base, "checkpoint": {"every_n_epochs": 1}})
    ckpts = sorted((tmp_path / "a" / "ckpt").glob("*.ckpt"))
    assert [c.name for c in ckpts] == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt", "epoch=2-step=18.ckpt"]

    ckpt = torch.load(ckpts[0], weights_only=False)
    per_rank = ckpt["hpsgd"]["optimizer_states"]
    assert ckpt["hpsgd"]["world_size"] == 2 and len(per_rank) == 2
    momentum = [s[0]["state"][0]["momentum_buffer"] for s in per_rank]
    assert not torch.equal(momentum[0], momentum[1]), "ranks saw different data, so momentum must differ"
    assert torch.equal(ckpt["optimizer_states"][0]["state"][0]["momentum_buffer"], momentum[0])
    # A bf16 replica cannot hold G's fp32 bits, so the checkpoint carries G itself.
    assert bool(ckpt["hpsgd"]["engine"]["global"]) == (precision == "bf16-true")
    # The outer momentum is the same on every rank: saved once, with the engine.
    saved_momentum = ckpt["hpsgd"]["engine"].get("outer_momentum")
    assert (saved_momentum is not None) == bool(outer)
    if outer:
        assert saved_momentum.keys() == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
        assert all(v.abs().sum() > 0 for v in saved_momentum.values())

    last = torch.load(ckpts[-1], weights_only=False)
    for name, value in first[0].result["final"].items():
        assert torch.equal(last["state_dict"][name], value), f"checkpoint {name} is not the flushed model"

    resumed = run_ranks(
        "fit",
        tmp_path / "b",
        {**base, "checkpoint": {"every_n_epochs": 1, "dir": "ckpt_b"}, "resume_from": str(ckpts[0])},
    )
    for a, b in zip(first, resumed):
        assert b.result["start_step"] == 6
        for name, value in a.result["final"].items():
            assert torch.equal(b.result["final"][name], value), f"{name} differs after resume"


def test_mid_epoch_checkpoint_resume(tmp_path):
    """Lightning restarts a plain DataLoader's epoch from its first batch, so a mid-epoch resume is not exact.

    What holds: the resumed run starts at the saved step, from the saved model and per-rank optimizer state,
    ends at the same global step, and its model is flushed and close to the uninterrupted one.
    """
    args = {**BASE, "val": False, "max_epochs": 2, "checkpoint": {"every_n_train_steps": 4}}
    first = run_ranks("fit", tmp_path / "a", args)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=4.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "a" / "ckpt").iterdir())
    resumed = run_ranks(
        "fit", tmp_path / "b", {**args, "checkpoint": {"every_n_train_steps": 4, "dir": "c"}, "resume_from": str(ckpt)}
    )
    # Every checkpoint holds the flushed model: all ranks hold exactly what was written.
    for step in (4, 8, 12):
        written = torch.load(next((tmp_path / "a" / "ckpt").glob(f"*step={step}.ckpt")), weights_only=False)
        for r in first:
            for name, value in r.result["at_checkpoint"][step].items():
                assert torch.equal(value, written["state_dict"][name]), f"rank {r.rank} {name} at step {step}"
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    for a, b in zip(first, resumed):
        assert b.result["start_step"] == 4
        assert b.result["global_step"] == a.result["global_step"]
        for name, value in saved.items():
            assert torch.equal(b.result["initial"][name], value)
        for name, value in b.result["final"].items():
            assert torch.equal(value, resumed[0].result["final"][name])
            torch.testing.assert_close(value, a.result["final"][name], atol=0.1, rtol=0.1)


def test_resume_on_a_different_number_of_workers_starts_from_the_mean_optimizer_state(tmp_path):
    """Saved by 2 ranks, resumed on 1 and on 3: every rank starts from the mean of the saved per-rank states. A
    branch that only rank 1's data reaches has momentum on rank 1 only: its mean is over the states that have it."""
    args = {**BASE, "model_args": {"unused_branch_rank": 1}}
    run_ranks("fit", tmp_path / "a", {**args, "max_epochs": 1, "checkpoint": {"every_n_epochs": 1}})
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=6.ckpt"
    saved = [s[0]["state"] for s in torch.load(ckpt, weights_only=False)["hpsgd"]["optimizer_states"]]
    branch = max(saved[1])  # the branch's parameters come last in the optimizer
    assert branch in saved[1] and branch not in saved[0]
    expected = {
        index: sum(s[index]["momentum_buffer"] for s in saved if index in s) / sum(index in s for s in saved)
        for index in set(saved[0]) | set(saved[1])
    }
    (single,) = run_ranks("fit", tmp_path / "b", {**args, "max_epochs": 2, "resume_from": str(ckpt)}, world_size=1)
    assert single.result["start_step"] == 6 and single.result["global_step"] == 12
    assert any("written by 2 ranks and is resumed on 1" in w for w in single.result["warnings"]), single.stderr
    triple = run_ranks("fit", tmp_path / "c", {**args, "max_epochs": 2, "resume_from": str(ckpt)}, world_size=3)
    assert any("resumed on 3" in w for w in triple[0].result["warnings"])
    for r in [single, *triple]:
        restored = r.result["optimizer_state_at_start"]
        assert restored.keys() == expected.keys()
        for index, value in expected.items():
            torch.testing.assert_close(restored[index]["momentum_buffer"], value, rtol=0, atol=1e-7)


def test_save_checkpoint_after_fit_keeps_every_ranks_optimizer_state(tmp_path):
    results = run_ranks("fit", tmp_path, {**BASE, "max_epochs": 1, "save_after_fit": True})
    ckpt = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)
    assert ckpt["hpsgd"]["world_size"] == 2
    momentum = [s[0]["state"][0]["momentum_buffer"] for s in ckpt["hpsgd"]["optimizer_states"]]
    assert not torch.equal(momentum[0], momentum[1])
    for name, value in results[1].result["final"].items():
        assert torch.equal(ckpt["state_dict"][name], value)


def test_grad_scaler_state_is_checkpointed_and_restored_per_rank(tmp_path):
    """fp16 autocast with a GradScaler (16-mixed; here on CPU): every rank's scale is saved and restored as its own,
    and the resumed run ends bit-identical to the uninterrupted one."""
    args = {**BASE, "val": False, "cpu_grad_scaler": True, "max_epochs": 2}
    first = run_ranks("fit", tmp_path / "a", {**args, "checkpoint": {"every_n_epochs": 1}})
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=6.ckpt"
    saved = torch.load(ckpt, weights_only=False)["hpsgd"]["precision_states"]
    assert len(saved) == 2 and saved[0]["scale"] != saved[1]["scale"]
    resumed = run_ranks("fit", tmp_path / "b", {**args, "checkpoint": {"every_n_epochs": 1, "dir": "c"},
                                                 "resume_from": str(ckpt)})  # fmt: skip
    for a, b in zip(first, resumed):
        assert b.result["scaler_state_at_start"]["scale"] == saved[b.rank]["scale"]
        for name, value in a.result["final"].items():
            assert torch.equal(b.result["final"][name], value), f"{name} differs after the resume"


def test_validate_from_a_checkpoint_leaves_no_engine_state_for_the_next_fit(tmp_path):
    """`trainer.validate(ckpt_path=...)` reads engine state (H, next boundary, outer momentum); the next `fit`
    without a checkpoint must start from a fresh engine, as it would in a new process."""
    args = {**BASE, "max_epochs": 2, "checkpoint": {"every_n_epochs": 1}, "validate_then_refit": True,
            "strategy_args": {"sync_every": "auto", **OUTER}}  # fmt: skip
    for r in run_ranks("fit", tmp_path, args):
        start = r.result["refit_engine_at_start"]
        assert start["rounds"] == 0 and start["sync_every"] == 1 and start["next_sync"] is None, start
        assert all(float(v.abs().sum()) == 0 for v in start["outer_momentum"].values())


def test_mid_epoch_resume_with_auto_restores_sync_every_and_the_next_boundary(tmp_path):
    args = {**BASE, "val": False, "max_epochs": 2, "stateful_loader": True, "checkpoint": {"every_n_train_steps": 4},
            "strategy_args": {"sync_every": "auto"}}  # fmt: skip
    run_ranks("fit", tmp_path / "a", args)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=False)["hpsgd"]
    resumed = run_ranks("fit", tmp_path / "b", {**args, "checkpoint": {"every_n_train_steps": 4, "dir": "c"},
                                                 "resume_from": str(ckpt), "record_engine_at_start": True})  # fmt: skip
    for r in resumed:
        start = r.result["engine_at_start"]
        assert start["sync_every"] == saved["engine"]["sync_every"]["current"]
        assert start["next_sync"] == saved["engine"]["sync_every"]["next_sync"] is not None
        assert saved["steps"] == 4 and r.result["start_step"] == 4


def test_resume_after_an_ema_teacher_was_promoted_is_exact(tmp_path):
    """The teacher is promoted at the first flush (epoch 0's validation): the checkpoint after it must bring the
    promotion back, or the resumed run averages the teacher differently from the uninterrupted one."""
    args = {**BASE, "model_args": {"ema_teacher": 0.9}, "checkpoint": {"every_n_epochs": 1}}
    first = run_ranks("fit", tmp_path / "a", args)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=6.ckpt"
    assert torch.load(ckpt, weights_only=False)["hpsgd"]["engine"]["promoted"]
    resumed = run_ranks("fit", tmp_path / "b", {**args, "checkpoint": {"every_n_epochs": 1, "dir": "c"},
                                                 "resume_from": str(ckpt)})  # fmt: skip
    for a, b in zip(first, resumed):
        for name, value in a.result["final"].items():
            assert torch.equal(b.result["final"][name], value), f"{name} differs after the resume"


def test_a_checkpoint_written_after_an_error_is_marked_and_a_fit_refuses_to_resume_from_it(tmp_path):
    """An exception on every rank: OnExceptionCheckpoint writes rank 0's unflushed replica. It is marked, and
    resuming a fit from it is refused with one line, rather than silently resuming an inexact run."""
    args = {
        **BASE,
        "val": False,
        "on_exception_checkpoint": True,
        "model_args": {"raise_at_step": 3, "raise_rank": None},
    }
    results = run_ranks("fit", tmp_path / "a", args, check=False)
    assert all(r.returncode != 0 for r in results)
    (written,) = (tmp_path / "a" / "on_exception").glob("*.ckpt")
    assert "abandoned" in torch.load(written, weights_only=False)["hpsgd"]
    resumed = run_ranks("fit", tmp_path / "b", {**BASE, "resume_from": str(written)}, check=False)
    for r in resumed:
        assert r.returncode != 0
        assert "was written after an error without a flush" in r.stderr, r.stderr[-2000:]


def test_a_resume_on_another_world_size_carries_the_mean_grad_scaler_scale(tmp_path):
    args = {**BASE, "val": False, "cpu_grad_scaler": True, "max_epochs": 1, "checkpoint": {"every_n_epochs": 1}}
    run_ranks("fit", tmp_path / "a", args)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=6.ckpt"
    saved = [s["scale"] for s in torch.load(ckpt, weights_only=False)["hpsgd"]["precision_states"]]
    assert saved[0] != saved[1]
    (single,) = run_ranks("fit", tmp_path / "b", {**args, "max_epochs": 2, "resume_from": str(ckpt)}, world_size=1)
    assert single.result["scaler_state_at_start"]["scale"] == sum(saved) / 2
