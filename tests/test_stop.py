"""Stopping early: SIGTERM (preemption) and time limits stop every rank cleanly, and a preempted run resumes exactly."""

from __future__ import annotations

import re

import torch

from tests.launch import run_ranks

# Per-rank data through a StatefulDataLoader: Lightning saves its position, so a mid-epoch resume is exact.
RUN = {"num_batches": 8, "max_epochs": 2, "sync_every": 2, "per_rank_data": True, "stateful_loader": True}


def test_sigterm_on_a_single_process_stops_after_the_next_batch_and_checkpoints(tmp_path):
    """As under DDP: the signal arrives during step 4, fit stops before step 5 and OnExceptionCheckpoint writes."""
    args = {**RUN, "model_args": {"sigterm_at_step": 3, "sigterm_rank": 0}, "on_exception_checkpoint": True}
    (single,) = run_ranks("fit", tmp_path, args, world_size=1, check=False)
    # Lightning's SIGTERMException is a SystemExit: fit ends early, before the worker writes its results.
    assert single.result is None and single.seconds is not None, single.stderr[-3000:]
    ckpt = torch.load(tmp_path / "on_exception" / "on_exception.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4


def test_coordinated_sigterm_flushes_checkpoints_every_rank_and_resumes_exactly(tmp_path):
    """SIGTERM to rank 1 during step 4. Every rank learns it at the same merge and stops at the same batch boundary,
    flushes, and OnExceptionCheckpoint writes the shared model with both ranks' optimizer states. Resuming from it
    ends bit-identical to an uninterrupted run that flushed at the same step (a checkpoint at that step)."""
    stopped = run_ranks(
        "fit",
        tmp_path / "stopped",
        {**RUN, "model_args": {"sigterm_at_step": 3}, "on_exception_checkpoint": True},
        check=False,
    )
    steps = set()
    for r in stopped:
        assert r.result is None and "HPSGDCommunicationError" not in r.stderr, r.stderr[-3000:]
        assert "were not flushed" not in r.stderr, "an agreed stop must flush, not abandon"
        match = re.search(r"every rank stops after optimizer step (\d+)", r.stderr)
        assert match, r.stderr[-3000:]
        steps.add(int(match.group(1)))
    # Signalled during step 4: sent with the round launched at step 4 (H=2), merged at step 6, stop before step 7.
    assert steps == {6}
    stop_step = 6
    ckpt = torch.load(tmp_path / "stopped" / "on_exception" / "on_exception.ckpt", weights_only=False)
    assert ckpt["global_step"] == stop_step
    momentum = [s[0]["state"][0]["momentum_buffer"] for s in ckpt["hpsgd"]["optimizer_states"]]
    assert len(momentum) == 2 and not torch.equal(momentum[0], momentum[1]), "both ranks' optimizer states"

    every = {"checkpoint": {"every_n_train_steps": stop_step}}
    reference = run_ranks("fit", tmp_path / "reference", {**RUN, **every})
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(reference[0].result["at_checkpoint"][stop_step][name], value), name
    resume_from = str(tmp_path / "stopped" / "on_exception" / "on_exception.ckpt")
    resumed = run_ranks("fit", tmp_path / "resumed", {**RUN, **every, "resume_from": resume_from})
    for a, b in zip(reference, resumed):
        assert b.result["start_step"] == stop_step and b.result["global_step"] == a.result["global_step"] == 16
        for name, value in a.result["final"].items():
            assert torch.equal(b.result["final"][name], value), f"rank {a.rank}: {name} differs after the resume"


def test_epoch_timer_stops_at_the_same_epoch_as_ddp(tmp_path):
    """Timer(interval="epoch") with 1.2 s epochs and a 1.5 s limit: Lightning stops after the second epoch. The
    Timer's clock counts batches (0.1 s each, 12 per epoch), so the epoch does not depend on the machine's speed."""
    args = {"num_batches": 12, "max_epochs": 5, "timer_epoch_s": 1.5, "timer_s_per_batch": 0.1}
    steps = {}
    for strategy in ("ddp", "hpsgd"):
        results = run_ranks("fit", tmp_path / strategy, {**args, **({"strategy": "ddp"} if strategy == "ddp" else {})})
        steps[strategy] = {r.result["global_step"] for r in results}
    assert steps["hpsgd"] == steps["ddp"] == {24}
