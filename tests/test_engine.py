"""The engine alone, on real gloo process groups in separate processes (no Lightning)."""

from __future__ import annotations

import pytest
import torch

from tests.launch import run_ranks


def assert_conserved(results, atol: float, rtol: float = 0.0, global_atol: float = 1e-6) -> None:
    """After a flush, R on every rank = start model + mean over ranks of each rank's total local change.

    ``G`` must hold that sum to its own (fp32/fp64) precision; ``R`` may round it to its dtype (``atol``/``rtol``).
    """
    world = len(results)
    start = results[0].result["initial"]
    expected = [start[i].double() + sum(x.result["totals"][i] for x in results) / world for i in range(len(start))]
    for r in results:
        for final, exp in zip(r.result["final"], expected):
            torch.testing.assert_close(final.double(), exp, atol=atol, rtol=rtol)
        flat = torch.cat([e.flatten() for e in expected])
        torch.testing.assert_close(r.result["global_"].double(), flat, atol=global_atol, rtol=0)


@pytest.mark.parametrize("merge", ["replica", "stale"])
@pytest.mark.parametrize("sync_every", [1, 3])
def test_conservation_after_flush(tmp_path, merge, sync_every):
    results = run_ranks("engine", tmp_path, {"merge": merge, "sync_every": sync_every, "steps": 7}, world_size=3)
    assert all("error" not in r.result for r in results)
    # Setup broadcast rank 0's values (each rank drew different ones) and the integer extra tensor.
    for r in results[1:]:
        for a, b in zip(r.result["initial"], results[0].result["initial"]):
            assert torch.equal(a, b)
        assert r.result["counter"] == 3
    assert_conserved(results, atol=1e-6)
    assert results[0].result["rounds"] == 7 // sync_every + 1
    assert not any(r.result["pending"] for r in results)
    # A mixed fp32/fp64 replica keeps G in the widest dtype.
    assert results[0].result["global_dtype"] == torch.float64


def test_replica_keeps_own_progress_visible_and_stale_does_not(tmp_path):
    """Right after a sync point, merge='replica' gives R = G + Δ (own progress kept), 'stale' gives R = G."""
    replica = run_ranks("engine", tmp_path / "r", {"merge": "replica", "steps": 2})
    stale = run_ranks("engine", tmp_path / "s", {"merge": "stale", "steps": 2})
    for results in (replica, stale):
        # Ranks differ between flushes (each keeps its own Δ, or each waits for the same average).
        a, b = (r.result["history"][1][0] for r in results)
        assert (results is stale) == torch.equal(a, b)


def test_bf16_wire_accumulates_in_fp32(tmp_path):
    results = run_ranks("engine", tmp_path, {"comm_dtype": "bf16", "steps": 5})
    assert results[0].result["global_dtype"] == torch.float64  # widest replica dtype, never the wire's
    # bf16 has 8 bits of mantissa: each rank's change of ~0.01 per step rounds at ~1e-4 on the wire.
    assert_conserved(results, atol=2e-4, global_atol=2e-4)


def test_bf16_replica_is_conserved_up_to_bf16_rounding(tmp_path):
    results = run_ranks("engine", tmp_path, {"dtype": "bfloat16", "steps": 6, "sync_every": 2})
    # G (fp64 here) holds the exact sum; R rounds it to bf16 once, within half a bf16 ulp.
    assert_conserved(results, atol=1e-6, rtol=2**-8, global_atol=1e-9)


def test_non_finite_delta_raises_on_every_rank_before_the_merge(tmp_path):
    results = run_ranks("engine", tmp_path, {"nan_at_step": 3, "sync_every": 1, "steps": 6})
    for r in results:
        err = r.result["error"]
        assert err.startswith("NonFiniteUpdateError"), err
        assert "rank(s) [1]" in err and "optimizer step 3" in err and "'b'" in err
        # Raised at the merge of that round (step 4), so the global model never saw the NaN.
        assert torch.isfinite(r.result["global_"]).all()
        assert len(r.result["history"]) == 3


def test_deferred_checks_report_the_same_errors_one_round_later(tmp_path):
    """The CUDA mode that never stalls the host to read the side channel, run here on CPU: the NaN round is merged
    (the check reads its copy at the next merge), every rank raises naming the same step, rank and tensor, and
    says that the global model already holds it."""
    results = run_ranks("engine", tmp_path / "nan", {"nan_at_step": 3, "steps": 6, "defer_checks": True})
    for r in results:
        err = r.result["error"]
        assert err.startswith("NonFiniteUpdateError"), err
        assert "rank(s) [1]" in err and "optimizer step 3" in err and "'b'" in err
        assert "reached the global model before the check" in err, err
        assert len(r.result["history"]) == 4  # one step later than the immediate check
    results = run_ranks("engine", tmp_path / "step", {"extra_step_on_rank1": True, "steps": 4, "defer_checks": True})
    for r in results:
        assert r.result["error"].startswith("RanksOutOfStepError"), r.result["error"]
        assert "rank 1: sync point at step 99" in r.result["error"]


def test_ranks_that_differ_after_a_flush_raise_naming_the_tensor(tmp_path):
    """Without the setup broadcast, ranks start from different values: G differs, so the first flush cannot make the
    replicas equal, and the check at its end names the first tensor that differs instead of training on."""
    results = run_ranks("engine", tmp_path, {"broadcast": False, "steps": 3, "sync_every": 2})
    for r in results:
        err = r.result["error"]
        assert err.startswith("RanksDivergedError"), err
        assert "'w'" in err and "optimizer step 3" in err, err


def test_ranks_out_of_step_are_detected(tmp_path):
    results = run_ranks("engine", tmp_path, {"extra_step_on_rank1": True, "steps": 4})
    for r in results:
        assert r.result["error"].startswith("RanksOutOfStepError"), r.result["error"]
        assert "rank 1: sync point at step 99" in r.result["error"]


def test_overflow_of_the_sum_on_an_fp16_wire_is_caught_before_the_merge(tmp_path):
    results = run_ranks("engine", tmp_path, {"comm_dtype": "fp16", "big_change_at_step": 2, "steps": 5})
    for r in results:
        err = r.result["error"]
        assert err.startswith("NonFiniteUpdateError"), err
        assert "from the sum over ranks, which overflowed the torch.float16 wire" in err
        assert "optimizer step 2" in err and "'w'" in err
        assert torch.isfinite(r.result["global_"]).all()


def test_fp16_wire_divides_before_the_sum(tmp_path):
    """Each rank's change of 40000 fits fp16 after dividing by W; the mean (40000) reaches G intact."""
    results = run_ranks("engine", tmp_path, {"comm_dtype": "fp16", "big_change_at_step": 2, "steps": 3, "big": 4e4})
    assert all("error" not in r.result for r in results), results[0].result.get("error")
    assert_conserved(results, atol=0.5, global_atol=0.5)  # fp16 keeps ~11 bits: 40000 rounds by up to 16


def test_reentry_from_a_signal_handler_is_refused(tmp_path):
    results = run_ranks("engine", tmp_path, {"reenter_at_step": 2, "steps": 4}, world_size=1)
    err = results[0].result["error"]
    assert err.startswith("HPSGDReentryError") and "signal handler" in err
