"""The merge delay ``τ`` (``sync_delay``) and fragments: against the reference simulation, bit for bit against the
rule before them at ``τ = H``, on two simulated nodes, through a checkpoint mid-round, and their checks."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.launch import run_ranks
from tests.models import build_net, make_batches
from tests.reference import simulate_delayed
from tests.test_engine import assert_conserved
from tests.test_hierarchy import assert_identical
from tests.test_reference import NUM_BATCHES, assert_matches, mse, sgd

OUTER = {"outer_lr": 0.8, "outer_momentum": 0.6}

# sha256 (16 hex digits) of every rank's R after each step, its final R and G, from the engine scenario (known
# per-rank changes, elementwise float operations only), recorded with the engine of commit 8607ed5, before
# `sync_delay` and `fragments` existed: (scenario args, world size, nodes, one digest per rank).
BEFORE_SYNC_DELAY = {
    "h3_replica": ({"sync_every": 3, "steps": 10}, 3, 1, ["a7f271783c4b704b", "be976d384e768807", "01c0568be8772ba9"]),
    "h3_stale": ({"sync_every": 3, "merge": "stale", "steps": 10}, 3, 1,
                 ["dc899327a0aeca32", "834ba62575655224", "295ee12614d7fdfc"]),
    "h4_outer": ({"sync_every": 4, "steps": 11, "engine_args": {"outer_lr": 0.7, "outer_momentum": 0.8}}, 3, 1,
                 ["6d3c0c1f0681b951", "bffb83de7cb146ec", "b188e72c214434c8"]),
    "h2_bf16_wire_plain_momentum": (
        {"sync_every": 2, "steps": 9, "comm_dtype": "bf16",
         "engine_args": {"outer_lr": 0.9, "outer_momentum": 0.5, "outer_nesterov": False}}, 2, 1,
        ["45a221389891572a", "18de406e1da1b017"]),
    "h3_two_nodes": ({"sync_every": 3, "steps": 10, "hierarchy": True}, 4, 2,
                     ["a78958b3823e2309", "a78958b3823e2309", "ecb0c002b68769b8", "ecb0c002b68769b8"]),
    "h2_mid_flush": ({"sync_every": 2, "steps": 9, "mid_flush_at": 5}, 2, 1, ["de75fe60f945f33a", "1f5f6269ef7aaad3"]),
}  # fmt: skip


def digest(result: dict) -> str:
    h = hashlib.sha256()
    for t in [*result["final"], result["global_"], *(t for state in result["history"] for t in state)]:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("case", sorted(BEFORE_SYNC_DELAY))
def test_sync_delay_equal_to_h_is_the_rule_before_it_bit_for_bit(tmp_path, case):
    """``sync_delay=H`` in every case; left out (the default, which follows ``H``) in one."""
    args, world, nodes, expected = BEFORE_SYNC_DELAY[case]
    explicit = {**args, "engine_args": {**args.get("engine_args", {}), "sync_delay": args["sync_every"]}}
    runs = [("explicit", explicit)] + ([("default", args)] if case == "h4_outer" else [])
    for name, run_args in runs:
        results = run_ranks("engine", tmp_path / name, run_args, world_size=world, num_nodes=nodes)
        assert [digest(r.result) for r in results] == expected, name


def reference(batches, tau, fragments, outer, merge="replica", node_size=1, sync_every=3):
    return simulate_delayed(build_net(), sgd, batches, sync_every, mse, sync_delay=tau, fragments=fragments,
                            merge=merge, node_size=node_size, **outer)  # fmt: skip


@pytest.mark.parametrize(
    ("tau", "fragments", "outer"),
    [(0, 1, OUTER), (1, 1, {}), (2, 1, OUTER), (3, 1, OUTER), (1, 3, OUTER), (0, 2, OUTER)],
    ids=["tau0-diloco", "tau1", "tau2-outer", "tau3=H-outer", "tau1-F3-outer", "tau0-F2-outer"],
)
def test_delay_and_fragments_match_the_reference(tmp_path, tau, fragments, outer):
    strategy = {"sync_delay": tau, "fragments": fragments, **outer}
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 3, "strategy_args": strategy}
    results = run_ranks("fit", tmp_path, args)
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(2)]
    expected = reference(batches, tau, fragments, outer)
    for r in results:
        assert_matches(r.result, expected)
        stats = r.result["stats"]
        assert stats["sync_delay"] == tau and stats["fragments"] == fragments
        assert stats["last_staleness_steps"] == tau  # every round merged tau steps after its launch
        assert not r.result["pending_at_end"]
    # The delay changed the result: the rule at tau = H (and F = 1) gives another model.
    if (tau, fragments) != (3, 1):
        other = reference(batches, 3, 1, outer).state_dict()["0.weight"]
        assert not torch.allclose(other, expected.state_dict()["0.weight"], atol=1e-4)


def test_stale_merge_with_fragments_matches_the_reference(tmp_path):
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 3, "merge": "stale",
            "strategy_args": {"fragments": 2}}  # fmt: skip
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(2)]
    expected = reference(batches, None, 2, {}, merge="stale")
    for r in run_ranks("fit", tmp_path, args):
        assert_matches(r.result, expected)


@pytest.mark.parametrize(("tau", "fragments"), [(1, 3), (2, 2)])
def test_the_engine_conserves_every_change_with_a_delay_and_fragments(tmp_path, tau, fragments):
    args = {"sync_every": 3, "steps": 10, "engine_args": {"sync_delay": tau, "fragments": fragments}}
    results = run_ranks("engine", tmp_path, args, world_size=3)
    assert all("error" not in r.result for r in results), results[0].result.get("error")
    assert_conserved(results, atol=1e-6)
    assert not any(r.result["pending"] for r in results)
    # Launches of fragment f at steps = floor(f H / F) mod H, merges tau steps later (the same step when tau = 0).
    offsets = [(f * 3) // fragments for f in range(fragments)]
    launches = {s for s in range(1, 11) for o in offsets if s % 3 == o}
    merges = {s + tau for s in launches if s + tau <= 10}
    assert results[0].result["sync_steps"] == sorted(launches | merges)


def test_a_non_finite_change_in_a_fragment_names_its_tensor_on_every_rank(tmp_path):
    """Tensors w (15 values), b (7), fp64_buffer (2): with F = 2, b lies in the second fragment (from 12)."""
    args = {"sync_every": 2, "steps": 6, "nan_at_step": 3, "engine_args": {"sync_delay": 1, "fragments": 2}}
    for r in run_ranks("engine", tmp_path, args):
        assert r.result["error"].startswith("NonFiniteUpdateError"), r.result["error"]
        assert "'b'" in r.result["error"] and "[1]" in r.result["error"]


def test_a_stop_reaches_every_rank_through_a_fragment_round(tmp_path):
    args = {"sync_every": 4, "steps": 9, "stop_from_rank": 1, "engine_args": {"sync_delay": 1, "fragments": 4}}
    for r in run_ranks("engine", tmp_path, args):
        assert "error" not in r.result and r.result["stop_requested"] != 0


def test_two_nodes_of_two_with_a_delay_and_fragments_match_the_reference(tmp_path):
    strategy = {"hierarchy": "node", "sync_delay": 1, "fragments": 2, **OUTER}
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 3, "record_every_step": True,
            "strategy_args": strategy}  # fmt: skip
    results = run_ranks("fit", tmp_path, args, world_size=4, num_nodes=2, timeout=300)
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(4)]
    expected = reference(batches, 1, 2, OUTER, node_size=2)
    for r in results:
        assert_matches(r.result, expected)
    for step, state in results[0].result["by_step"].items():  # node-mates hold one replica at every step
        assert_identical(state, results[1].result["by_step"][step], f"step {step}")
        assert_identical(results[2].result["by_step"][step], results[3].result["by_step"][step], f"step {step}")


def test_engine_on_two_nodes_with_fragments_equals_two_flat_workers_bit_for_bit(tmp_path):
    args = {"sync_every": 4, "steps": 11, "engine_args": {"sync_delay": 2, "fragments": 3, **OUTER}}
    node = run_ranks("engine", tmp_path / "node", {**args, "hierarchy": True}, world_size=4, num_nodes=2)
    flat = run_ranks("engine", tmp_path / "flat", args, world_size=2, num_nodes=2)
    for r in node:
        f = flat[r.rank // 2].result
        assert "error" not in r.result, r.result["error"]
        assert all(torch.equal(a, b) for a, b in zip(r.result["final"], f["final"]))
        assert torch.equal(r.result["global_"], f["global_"])


def test_auto_delay_on_two_nodes_of_two_agrees_on_every_rank_and_conserves_every_change(tmp_path):
    """``sync_delay="auto"`` follows measured times, so no fixed reference reproduces it: every rank of both nodes
    must merge at the same steps, with the same delay, and lose nothing. On loopback the link hides in one step."""
    args = {"sync_every": 8, "steps": 32, "hierarchy": True, "step_sleep_s": [0.02] * 4,
            "engine_args": {"sync_delay": "auto", "fragments": 2}}  # fmt: skip
    results = run_ranks("engine", tmp_path, args, world_size=4, num_nodes=2)
    assert all("error" not in r.result for r in results), results[0].result.get("error")
    for r in results[1:]:
        assert r.result["sync_steps"] == results[0].result["sync_steps"]
        assert r.result["sync_delays"] == results[0].result["sync_delays"]
    delays = results[0].result["sync_delays"]
    assert delays[0] == 8 and delays[-1] < 8, delays  # from H down to what the fast link needs
    assert_conserved(results, atol=1e-6)


CHECKPOINTED = {"val": True, "max_epochs": 3, "num_batches": 6, "sync_every": 4}


def test_a_checkpoint_written_mid_round_resumes_exactly(tmp_path):
    """H = 4, 6 batches per epoch: at the checkpoint of step 6 fragment 0's round of step 4 is still in flight
    (merged at step 7), so the flush that writes the checkpoint merges it early, in both runs."""
    base = {**CHECKPOINTED, "strategy_args": {"sync_delay": 3, "fragments": 2, **OUTER}}
    first = run_ranks("fit", tmp_path / "a", {**base, "checkpoint": {"every_n_epochs": 1}})
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=6.ckpt"
    resumed = run_ranks("fit", tmp_path / "b", {**base, "checkpoint": {"every_n_epochs": 1, "dir": "ckpt_b"},
                                                 "resume_from": str(ckpt)})  # fmt: skip
    for a, b in zip(first, resumed):
        assert b.result["start_step"] == 6
        for name, value in a.result["final"].items():
            assert torch.equal(b.result["final"][name], value), f"{name} differs after resume"


def test_a_resume_with_auto_delay_starts_from_the_saved_delay(tmp_path):
    """``sync_delay="auto"`` follows measured times, so runs differ from run to run (as with ``sync_every="auto"``);
    what a resume must keep is the agreed delay."""
    base = {**CHECKPOINTED, "val": False, "strategy_args": {"sync_delay": "auto", "fragments": 2}}
    run_ranks("fit", tmp_path / "a", {**base, "checkpoint": {"every_n_epochs": 1}})
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=6.ckpt"
    saved = torch.load(ckpt, weights_only=False)["hpsgd"]["engine"]["sync_every"]
    resumed = run_ranks("fit", tmp_path / "b", {**base, "max_epochs": 2, "resume_from": str(ckpt),
                                                 "checkpoint": {"every_n_epochs": 1, "dir": "c"},
                                                 "record_engine_at_start": True})  # fmt: skip
    assert saved["sync_delay"] is not None
    for r in resumed:
        assert r.result["engine_at_start"]["sync_delay"] == min(saved["sync_delay"], 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sync_every": 4, "sync_delay": 5}, r"sync_delay must be an integer from 0 to sync_every \(H = 4\)"),
        ({"sync_every": 4, "sync_delay": -1}, r"sync_delay must be an integer from 0 to sync_every"),
        ({"sync_every": 4, "sync_delay": "soon"}, r"sync_delay must be .* received 'soon'"),
        ({"sync_every": 4, "sync_delay": 2, "merge": "stale"}, r"merge='stale' merges at the next sync point only"),
        ({"sync_every": 4, "sync_delay": "auto", "merge": "stale"}, r"merge='stale'"),
        ({"sync_every": 4, "fragments": 0}, r"fragments must be an integer from 1 to sync_every \(H = 4\)"),
        ({"sync_every": 4, "fragments": 5}, r"fragments must be an integer from 1 to sync_every \(H = 4\)"),
        ({"sync_every": "auto", "fragments": 2}, r"fragments=2 needs a fixed sync_every"),
    ],
)
def test_bad_delays_and_fragments_are_refused_in_one_line(options, message):
    from lightning_hpsgd import HPSGDStrategy

    with pytest.raises(ValueError, match=message) as info:
        HPSGDStrategy(**options)
    assert "\n" not in str(info.value)


def test_the_delay_and_fragments_are_in_the_run_config():
    from lightning_hpsgd import HPSGDStrategy

    config = HPSGDStrategy(sync_every=8, sync_delay="auto", fragments=4).hyperparameters
    assert (config["sync_every"], config["sync_delay"], config["fragments"]) == (8, "auto", 4)
