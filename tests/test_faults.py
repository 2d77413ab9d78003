"""Bad configurations and faults end with a clear error on every rank, never a hang or silent damage."""

from __future__ import annotations

import re
import time

import pytest

from tests.launch import run_ranks


def failing_ranks(tmp_path, args, **kwargs):
    results = run_ranks("fit", tmp_path, {"num_batches": 6, **args}, check=False, **kwargs)
    for r in results:
        assert r.returncode != 0, f"rank {r.rank} should have failed:\n{r.stderr[-2000:]}"
    return results


def test_models_that_differ_across_ranks_fail_at_setup(tmp_path):
    for r in failing_ranks(tmp_path, {"hidden_on_rank1": 8}):
        assert "HPSGD: ranks hold different models" in r.stderr
        assert (
            "rank 0 has 'net.0.weight' shape=[16, 6]" in r.stderr
            and "rank 1 has 'net.0.weight' shape=[8, 6]" in r.stderr
        )


def test_non_finite_update_stops_every_rank_with_step_and_parameter(tmp_path):
    # global_step == 2 inside training_step is the third optimizer step.
    for r in failing_ranks(tmp_path, {"model_args": {"nan_at_step": 2}}):
        assert "NonFiniteUpdateError" in r.stderr
        assert (
            "from rank(s) [1] in the round that ended at optimizer step 3, first in parameter 'net.0.weight'"
            in r.stderr
        )


def test_ddp_wrapped_module_is_rejected(tmp_path):
    for r in failing_ranks(tmp_path, {"wrap_ddp": True}):
        assert "submodule 'net' is already wrapped in DistributedDataParallel" in r.stderr


def test_sharded_optimizer_is_rejected(tmp_path):
    for r in failing_ranks(tmp_path, {"model_args": {"optimizer": "zero"}}):
        assert "optimizer ZeroRedundancyOptimizer shards or averages state" in r.stderr


@pytest.mark.parametrize("sync_every", [1, 4])
def test_dead_peer_makes_survivors_exit_within_timeout(tmp_path, sync_every):
    # No `sync_dist` logging here, so the first collective to meet the dead peer is an HPSGD round.
    timeout_s = 20
    started = time.monotonic()
    results = failing_ranks(
        tmp_path,
        {
            "model_args": {"exit_at_step": 3, "log_sync_dist": False},
            "timeout_s": timeout_s,
            "sync_every": sync_every,
            "max_epochs": 3,
        },
    )
    elapsed = time.monotonic() - started
    assert results[1].returncode == 17  # the rank that died
    survivor = results[0].stderr
    assert "HPSGDCommunicationError" in survivor and "failed on rank 0" in survivor, survivor[-3000:]
    # Process start-up and imports take a few seconds on top of the collective timeout.
    assert elapsed < timeout_s + 30


def test_hung_peer_makes_survivors_exit_within_timeout(tmp_path):
    timeout_s = 10
    results = run_ranks(
        "fit",
        tmp_path,
        {"num_batches": 6, "model_args": {"hang_at_step": 2, "log_sync_dist": False}, "timeout_s": timeout_s},
        check=False,
        timeout=90,
        stop_after_rank=0,
    )
    survivor = results[0]
    assert survivor.returncode != 0 and survivor.seconds is not None
    assert "HPSGDCommunicationError" in survivor.stderr, survivor.stderr[-3000:]
    # Start-up (imports, process group) takes a few seconds before training reaches the hang.
    assert survivor.seconds < timeout_s + 30, survivor.seconds
    assert results[1].seconds is None  # still asleep, killed by the test


def test_exception_on_one_rank_ends_every_rank_without_a_collective(tmp_path):
    """No flush after an exception (it could pair with another rank's round); survivors fail fast, not at timeout."""
    results = failing_ranks(tmp_path, {"model_args": {"raise_at_step": 3}, "timeout_s": 60, "max_epochs": 3})
    raiser, survivor = results[1], results[0]
    assert "a bug in the user's training_step, on rank 1 only" in raiser.stderr
    assert "HPSGD (rank 1): training stopped with RuntimeError after optimizer step 3" in raiser.stderr
    # The survivor fails in whichever collective meets the closed connection first: an HPSGD round, or the
    # `self.log(..., sync_dist=True)` all-reduce of the next step.
    assert "HPSGDCommunicationError" in survivor.stderr or "Connection closed by peer" in survivor.stderr
    assert survivor.seconds is not None and survivor.seconds < 40  # well inside the 60 s timeout


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM to one rank travels in HPSGD's side channel (no per-batch broadcast): all stop together, quickly."""
    args = {"num_batches": 6, "model_args": {"sigterm_at_step": 3}, "timeout_s": 60, "max_epochs": 3}
    results = run_ranks("fit", tmp_path, args, check=False)
    steps = set()
    for r in results:
        # Lightning's SIGTERMException is a SystemExit: fit ends early on every rank, before the worker's results.
        assert r.result is None and "HPSGDCommunicationError" not in r.stderr, r.stderr[-3000:]
        match = re.search(r"a rank received SIGTERM; every rank stops after optimizer step (\d+)", r.stderr)
        assert match, r.stderr[-3000:]
        steps.add(int(match.group(1)))
        assert r.seconds is not None and r.seconds < 40  # not a timeout
    # Signalled during step 4 (global_step 3): sent with that step's round, merged at step 5, stop before step 6.
    assert steps == {5}


def test_on_exception_checkpoint_after_an_error_on_one_rank_never_waits_for_the_timeout(tmp_path):
    """OnExceptionCheckpoint calls Lightning's barrier after writing; the other rank never reaches it. Once the
    engine is abandoned the barrier must not block, so every rank ends long before the 300 s process group
    timeout, and the file written is marked as not a flush point."""
    args = {"model_args": {"raise_at_step": 3, "log_sync_dist": False}, "timeout_s": 300, "max_epochs": 3,
            "on_exception_checkpoint": True}  # fmt: skip
    results = failing_ranks(tmp_path, args, timeout=200)
    for r in results:
        assert r.seconds is not None and r.seconds < 100, (r.rank, r.seconds, r.stderr[-2000:])
    written = list((tmp_path / "on_exception").glob("*.ckpt"))
    assert written, "rank 0 writes the checkpoint when its own error arrives"
    import torch

    assert "abandoned" in torch.load(written[0], weights_only=False)["hpsgd"]
