"""``Fabric(strategy="hpsgd")`` in a plain loop (2 CPU processes, gloo) against the reference simulation, and its
checkpoints, multi-optimizer iterations, precision and faults."""

from __future__ import annotations

import re

import torch
from torch import nn

from tests.fabric_worker import LR, MOMENTUM
from tests.launch import run_ranks
from tests.models import build_net, make_batches
from tests.reference import simulate

NUM_BATCHES = 7  # not a multiple of 3: the final flush carries a partial round


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def reference(sync_every: int, merge: str, **outer) -> dict[str, torch.Tensor]:
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(2)]
    return simulate(build_net(), sgd, batches, sync_every, merge, mse, **outer).state_dict()


def assert_close_to(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-6, rtol=1e-5, msg=name)


# Each case: (strategy options, the reference's options). The split case steps two optimizers (one per layer) in
# every iteration: a round boundary between them would put the merges at other steps than the reference's.
CASES = {
    "h1_replica": ({"sync_every": 1}, {"sync_every": 1, "merge": "replica"}),
    "h3_replica": ({"sync_every": 3}, {"sync_every": 3, "merge": "replica"}),
    "h3_stale": ({"sync_every": 3, "merge": "stale"}, {"sync_every": 3, "merge": "stale"}),
    "h1_stale": ({"sync_every": 1, "merge": "stale"}, {"sync_every": 1, "merge": "stale"}),
    "h3_outer": (
        {"sync_every": 3, "strategy_args": {"outer_lr": 0.7, "outer_momentum": 0.8, "outer_nesterov": False}},
        {"sync_every": 3, "merge": "replica", "outer_lr": 0.7, "outer_momentum": 0.8, "outer_nesterov": False},
    ),
    "h3_two_optimizers": ({"sync_every": 3, "optimizers": "split"}, {"sync_every": 3, "merge": "replica"}),
}


def test_fabric_loops_match_the_reference_simulation_live_and_saved(tmp_path):
    """Every case in one pair of processes, one Fabric after another: the live model after the loop's flush and
    the model ``fabric.save`` wrote both equal the reference, on both ranks."""
    runs = [{**options, "num_batches": NUM_BATCHES, "save_at": [NUM_BATCHES]} for options, _ in CASES.values()]
    # And the loop as the function fabric.launch(fn) runs, with no flush of its own: the launcher's flush when it
    # returns merges the partial last round (7 iterations at H = 3).
    runs.append({"sync_every": 3, "num_batches": NUM_BATCHES, "launch_function": True})
    results = run_ranks("fabric", tmp_path, {"runs": runs})
    for r in results:
        launched = r.result["runs"][len(CASES)]
        assert not launched["needs_flush"]
        assert_close_to(launched["final"], reference(sync_every=3, merge="replica"))
    for i, (name, (_, ref_options)) in enumerate(CASES.items()):
        expected = reference(**ref_options)
        saved = torch.load(tmp_path / f"run{i}" / f"ckpt_{NUM_BATCHES}.pt", weights_only=False)
        assert_close_to(saved["model"], expected)
        assert saved["iteration"] == NUM_BATCHES and saved["hpsgd"]["steps"] == NUM_BATCHES, name
        for r in results:
            record = r.result["runs"][i]
            assert_close_to(record["final"], expected)
            assert record["steps"] == NUM_BATCHES, name
        # Each rank's own optimizer state is in the file; the ranks' momenta differ (different data).
        per_rank = saved["hpsgd"]["optimizer_states"]
        assert len(per_rank) == 2 and len(per_rank[0]) == (2 if "two" in name else 1)
        assert not torch.equal(
            per_rank[0][0]["state"][0]["momentum_buffer"], per_rank[1][0]["state"][0]["momentum_buffer"]
        )


def test_string_name_selects_the_fabric_strategy_and_metrics_are_logged(tmp_path):
    """``Fabric(strategy="hpsgd")`` after ``import lightning_hpsgd`` (nothing else changed in the loop)."""
    results = run_ranks("fabric", tmp_path, {"strategy_name": "hpsgd", "num_batches": 4})
    expected_rounds = 4 + 1  # one per iteration at H = 1, and the loop's flush
    for r in results:
        record = r.result["runs"][0]
        assert record["stats"]["rounds"] == expected_rounds and record["stats"]["flushes"] == 1
        metrics = record["metrics"]
        assert metrics["hpsgd/rounds"] == expected_rounds and metrics["hpsgd/sync_every"] == 1
        assert metrics["hpsgd/comm_ms"] > 0 and 0 <= metrics["hpsgd/hidden"] <= 1
    assert_close_to(results[0].result["runs"][0]["final"], results[1].result["runs"][0]["final"])


def test_gan_loop_steps_both_optimizers_before_a_round_ends(tmp_path):
    """Fabric's DCGAN order at H = 1: the generator's graph runs backward after the discriminator's step, and the
    round ends only after both steps. Ending it between them (the negative control) breaks that graph."""
    results = run_ranks("fabric", tmp_path, {"runs": [{"loop": "gan", "num_batches": 5}]})
    first, second = (r.result["runs"][0] for r in results)
    for key in ("generator", "discriminator"):
        for name in first[key]:
            assert torch.equal(first[key][name], second[key][name]), f"{key}.{name}"
    # One round per iteration, the flush when the discriminator joined the engine, and the loop's flush.
    assert first["steps"] == 5 and first["rounds"] == 5 + 2
    control = run_ranks("fabric", tmp_path / "control", {"loop": "gan", "iteration_end": "manual",
                                                         "end_between": True}, check=False)  # fmt: skip
    for r in control:
        assert r.returncode != 0 and "modified by an inplace operation" in r.stderr, r.stderr[-2000:]


def test_save_and_load_mid_round_resume_exactly(tmp_path):
    """Saved at iteration 4 of 7 (H = 3: mid-round), killed, resumed from the file: bit for bit the run that
    saved at 4 and went on; each rank got its own momentum back."""
    common = {"sync_every": 3, "num_batches": NUM_BATCHES, "save_at": [4]}
    whole = run_ranks("fabric", tmp_path / "whole", common)
    run_ranks("fabric", tmp_path / "first", {**common, "stop_after": 4})
    checkpoint = tmp_path / "first" / "run0" / "ckpt_4.pt"
    resumed = run_ranks("fabric", tmp_path / "resumed", {**common, "save_at": [], "resume": str(checkpoint)})
    saved = torch.load(checkpoint, weights_only=False)["hpsgd"]["optimizer_states"]
    for w, r in zip(whole, resumed):
        record = r.result["runs"][0]
        assert record["start"] == 4 and record["steps_after_load"] == 4 and record["steps"] == NUM_BATCHES
        momentum = record["momentum_at_start"][0]
        for index, buffer in momentum.items():
            assert torch.equal(buffer, saved[r.rank][0]["state"][index]["momentum_buffer"])
        final, expected = record["final"], w.result["runs"][0]["final"]
        for name in expected:
            assert torch.equal(final[name], expected[name]), name


def test_load_on_another_world_size_starts_from_the_mean_state(tmp_path):
    run_ranks("fabric", tmp_path / "first", {"sync_every": 3, "num_batches": 4, "save_at": [4]})
    checkpoint = tmp_path / "first" / "run0" / "ckpt_4.pt"
    (single,) = run_ranks("fabric", tmp_path / "one", {"sync_every": 3, "num_batches": 6, "resume": str(checkpoint)},
                          world_size=1)  # fmt: skip
    assert "written by 2 ranks and is resumed on 1" in single.stderr
    saved = torch.load(checkpoint, weights_only=False)["hpsgd"]["optimizer_states"]
    for index, buffer in single.result["runs"][0]["momentum_at_start"][0].items():
        mean = (saved[0][0]["state"][index]["momentum_buffer"] + saved[1][0]["state"][index]["momentum_buffer"]) / 2
        torch.testing.assert_close(buffer, mean)


def test_bf16_mixed_on_cpu_trains_identical_ranks(tmp_path):
    results = run_ranks("fabric", tmp_path, {"precision": "bf16-mixed", "sync_every": 2, "num_batches": 5})
    first, second = (r.result["runs"][0] for r in results)
    assert first["steps"] == 5 and first["stats"]["rounds"] == 2 + 1
    for name, value in first["final"].items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        assert torch.equal(value, second["final"][name]), name
    # autocast changed the numbers: not the fp32 reference
    assert not torch.allclose(first["final"]["0.weight"], build_net().state_dict()["0.weight"])


def failing(tmp_path, args, **kwargs):
    results = run_ranks("fabric", tmp_path, {"num_batches": 6, "timeout_s": 60, **args}, check=False, **kwargs)
    for r in results:
        assert r.returncode != 0, f"rank {r.rank} should have failed:\n{r.stderr[-2000:]}"
    return results


def test_models_that_differ_across_ranks_fail_at_setup(tmp_path):
    for r in failing(tmp_path, {"hidden_on_rank1": True}):
        assert "HPSGD: ranks hold different models" in r.stderr
        assert "rank 1 has '0.weight' shape=[8, 6]" in r.stderr


def test_a_sharded_optimizer_is_refused_at_setup_in_one_line(tmp_path):
    """HPSGD keeps each rank's whole optimizer state: ``ZeroRedundancyOptimizer`` is refused before any step."""
    for r in failing(tmp_path, {"zero_optimizer": True}):
        assert "HPSGD: optimizer ZeroRedundancyOptimizer shards or averages state across ranks" in r.stderr


def test_non_finite_update_stops_every_rank_in_one_line(tmp_path):
    for r in failing(tmp_path, {"nan_at": 3, "sync_every": 1}):
        assert "NonFiniteUpdateError: HPSGD:" in r.stderr and "first in parameter '0.weight'" in r.stderr
        assert "Traceback" not in r.stderr, r.stderr[-3000:]  # one message that says what to do


def test_ranks_out_of_step_fail_at_the_flush_naming_each_ranks_step(tmp_path):
    """Uneven data (no ``DistributedSampler``): rank 1 takes one iteration more, so the ranks' flushes fall at
    different iterations; both end in one line that names them, instead of merging models of different ages."""
    for r in failing(tmp_path, {"num_batches": 4, "extra_steps_on_rank1": 1, "sync_every": 2}):
        assert "RanksOutOfStepError: HPSGD:" in r.stderr, r.stderr[-2000:]
        assert "rank 0: flush at step 4" in r.stderr and "rank 1: flush at step 5" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_dead_peer_ends_the_survivor_with_a_communication_error(tmp_path):
    results = failing(tmp_path, {"exit_at": 3, "sync_every": 2, "timeout_s": 20})
    assert results[1].returncode == 17
    survivor = results[0]
    assert "HPSGDCommunicationError" in survivor.stderr and "failed on rank 0" in survivor.stderr
    assert survivor.seconds is not None and survivor.seconds < 20 + 30  # the timeout, not a hang


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_iteration_flushed(tmp_path):
    """SIGTERM to rank 1 during iteration 3: the request travels with that iteration's round, merged at the next
    sync point; every rank sees ``should_stop`` after iteration 4, saves and leaves the loop."""
    results = run_ranks("fabric", tmp_path, {"num_batches": 8, "sigterm_at": 3, "sync_every": 1})
    first, second = (r.result["runs"][0] for r in results)
    assert first["stopped_at"] == second["stopped_at"] == 4
    for name, value in first["final"].items():
        assert torch.equal(value, second["final"][name]), name
    assert torch.load(tmp_path / "run0" / "stopped.pt", weights_only=False)["iteration"] == 4
    ignored = failing(tmp_path / "ignored", {"num_batches": 8, "sigterm_at": 3, "sync_every": 1, "ignore_stop": True})
    for r in ignored:
        match = re.search(r"HPSGD: every rank stopped after iteration (\d+) on SIGTERM", r.stderr)
        assert match and match.group(1) == "4", r.stderr[-2000:]
