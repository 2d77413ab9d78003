"""``hierarchy="node"``: synchronous inside a node, HPSGD across nodes (simulated nodes: processes on gloo).

Ranks ``n L .. n L + L - 1`` form node ``n`` (``tests.launch`` sets ``NODE_RANK`` and ``LOCAL_RANK``, as torchrun
does on each machine).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.launch import run_ranks
from tests.models import build_net, make_batches
from tests.reference import simulate
from tests.test_reference import NUM_BATCHES, assert_matches, mse, sgd

NODE = {"hierarchy": "node"}
PARAMS = sum(p.numel() for p in build_net().parameters())  # the Regressor's net: 146 fp32 values


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


def test_two_nodes_of_two_match_the_reference_node_mates_agree_at_every_step_and_send_half(tmp_path):
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 3, "record_every_step": True}
    results = run_ranks("fit", tmp_path, {**args, "strategy_args": NODE}, world_size=4, num_nodes=2, timeout=300)
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(4)]
    reference = simulate(build_net(), sgd, batches, 3, "replica", mse, node_size=2)
    for r in results:
        assert_matches(r.result, reference)
        assert_identical(r.result["final"], results[0].result["final"], f"rank {r.rank} after the last flush")
    # Node-mates hold one replica at every step; the two nodes differ between flushes (their data differ).
    steps = results[0].result["by_step"]
    assert sorted(steps) == list(range(1, NUM_BATCHES + 1))
    for step in steps:
        for a, b in ((0, 1), (2, 3)):
            assert_identical(results[a].result["by_step"][step], results[b].result["by_step"][step], f"step {step}")
    node0, node1 = results[0].result["by_step"][2], results[2].result["by_step"][2]
    assert not torch.equal(node0["net.0.weight"], node1["net.0.weight"])
    # Each rank put half of the model on the group across nodes, in every round (2 sync points and the flush).
    for r in results:
        stats = r.result["stats"]
        assert stats["bytes_per_round"] == math.ceil(PARAMS / 2) * 4
        assert stats["bytes_sent"] == 3 * stats["bytes_per_round"] and r.result["rounds"] == 3
    # Nodes are not workers: 4 flat workers give another model.
    flat = simulate(build_net(), sgd, batches, 3, "replica", mse)
    assert not torch.allclose(flat.state_dict()["0.weight"], reference.state_dict()["0.weight"], atol=1e-4)


def test_manual_optimization_and_accumulation_on_two_nodes_of_two_match_the_reference(tmp_path):
    """DDP inside the node must average the gradients of a manual `manual_backward` and of accumulated batches
    (Lightning's `no_sync` until the step), and sync points still follow optimizer steps."""
    batches = [make_batches(8, 8, seed=100 + r) for r in range(4)]
    base = {"per_rank_data": True, "num_batches": 8, "strategy_args": NODE}
    manual = run_ranks("fit", tmp_path / "manual", {**base, "sync_every": 3, "model_args": {"manual": True}},
                       world_size=4, num_nodes=2)  # fmt: skip
    reference = simulate(build_net(), sgd, batches, 3, "replica", mse, node_size=2)
    for r in manual:
        assert_matches(r.result, reference)
        assert r.result["rounds"] == 8 // 3 + 1
    accumulated = run_ranks("fit", tmp_path / "accumulated", {**base, "sync_every": 2, "accumulate": 2},
                            world_size=4, num_nodes=2)  # fmt: skip
    paired = [[(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(bs[::2], bs[1::2])] for bs in batches]
    reference = simulate(build_net(), sgd, paired, 2, "replica", mse, node_size=2)
    for r in accumulated:
        assert_matches(r.result, reference)
        assert r.result["global_step"] == 4 and r.result["rounds"] == 4 // 2 + 1


def test_one_node_equals_ddp(tmp_path):
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 2}
    hpsgd = run_ranks("fit", tmp_path / "node", {**args, "strategy_args": NODE}, world_size=2, num_nodes=1)
    ddp = run_ranks("fit", tmp_path / "ddp", {**args, "strategy": "ddp"}, world_size=2, num_nodes=1)
    for h, d in zip(hpsgd, ddp):
        for name, value in d.result["final"].items():
            torch.testing.assert_close(h.result["final"][name], value, atol=1e-6, rtol=1e-6, msg=name)
    # Not vacuous: the ranks trained on different data, so DDP differs from either rank alone.
    alone = simulate(build_net(), sgd, [make_batches(NUM_BATCHES, 8, seed=100)], 2, "replica", mse)
    assert not torch.allclose(alone.state_dict()["0.weight"], ddp[0].result["final"]["net.0.weight"], atol=1e-4)


def test_one_device_per_node_is_flat_hpsgd_bit_for_bit(tmp_path):
    args = {"per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 3, "record_every_step": True}
    node = run_ranks("fit", tmp_path / "node", {**args, "strategy_args": NODE}, world_size=2, num_nodes=2)
    flat = run_ranks("fit", tmp_path / "flat", args, world_size=2, num_nodes=2)
    for n, f in zip(node, flat):
        assert_identical(n.result["final"], f.result["final"], f"rank {n.rank}")
        for step, state in f.result["by_step"].items():
            assert_identical(n.result["by_step"][step], state, f"rank {n.rank} step {step}")
        assert n.result["stats"]["bytes_per_round"] == f.result["stats"]["bytes_per_round"] == PARAMS * 4


def test_a_two_by_two_checkpoint_resumes_exactly(tmp_path):
    base = {"val": True, "max_epochs": 2, "num_batches": 4, "sync_every": 3, "strategy_args": NODE}
    first = run_ranks("fit", tmp_path / "a", {**base, "checkpoint": {"every_n_epochs": 1}}, world_size=4,
                      num_nodes=2, timeout=300)  # fmt: skip
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    # Node-mates hold one optimizer state (their gradients are averaged at every step): stored once per node.
    assert saved["hpsgd"]["world_size"] == 4 and saved["hpsgd"]["local_size"] == 2
    assert len(saved["hpsgd"]["optimizer_states"]) == 2
    resumed = run_ranks("fit", tmp_path / "b", {**base, "checkpoint": {"every_n_epochs": 1, "dir": "ckpt_b"},
                        "resume_from": str(ckpt)}, world_size=4, num_nodes=2, timeout=300)  # fmt: skip
    for a, b in zip(first, resumed):
        assert b.result["start_step"] == 4
        assert_identical(b.result["final"], a.result["final"], f"rank {a.rank} after resume")
        assert_identical(a.result["final"], first[0].result["final"], f"rank {a.rank}")


def test_unfreezing_a_layer_mid_fit_rebuilds_the_node_wrapper_so_node_mates_stay_identical(tmp_path):
    """BackboneFinetuning-style: the first layer is frozen when the node's DDP is built and unfrozen at epoch 1.
    DDP averages only the parameters that trained when it was built, so the node wrapper is built again at the
    flush that follows the change: node-mates hold one replica at every step of both epochs."""
    args = {"per_rank_data": True, "num_batches": 4, "max_epochs": 2, "sync_every": 3, "record_every_step": True,
            "model_args": {"frozen_first": True, "unfreeze_at_epoch": 1}, "strategy_args": NODE}  # fmt: skip
    results = run_ranks("fit", tmp_path, args, world_size=4, num_nodes=2, timeout=300)
    steps = results[0].result["by_step"]
    assert sorted(steps) == list(range(1, 9))
    for step in steps:
        for a, b in ((0, 1), (2, 3)):
            assert_identical(results[a].result["by_step"][step], results[b].result["by_step"][step], f"step {step}")
    assert not torch.equal(steps[8]["net.0.weight"], results[0].result["initial"]["net.0.weight"])
    for r in results:
        assert_identical(r.result["final"], results[0].result["final"], f"rank {r.rank}")


def test_ddp_options_reach_the_node_wrapper(tmp_path):
    """A branch only rank 0's data reaches: inside the node DDP needs find_unused_parameters=True, passed as
    DDPStrategy takes it."""
    args = {"per_rank_data": True, "num_batches": 4, "sync_every": 2, "model_args": {"unused_branch_rank": 0},
            "strategy_args": {**NODE, "find_unused_parameters": True}}  # fmt: skip
    results = run_ranks("fit", tmp_path, args, world_size=2, num_nodes=1)
    for r in results:
        assert_identical(r.result["final"], results[0].result["final"], f"rank {r.rank}")
    assert not torch.equal(results[0].result["final"]["branch.weight"], results[0].result["initial"]["branch.weight"])


def test_sync_batchnorm_under_hierarchy_converts_to_the_node_group(one_rank_group):
    """``sync_batchnorm=True`` with ``hierarchy="node"``: the ranks of a node are synchronous anyway, so BatchNorm
    syncs on the node's group, never across the slow link (SyncBatchNorm's forward needs a GPU; this checks the
    conversion the strategy makes at setup)."""
    import torch.distributed as dist
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from lightning_hpsgd.process_groups import RunGroups
    from lightning_hpsgd.strategy import _sync_batchnorm

    groups = RunGroups("gloo", None, node_rank=0)
    node = dist.new_group([0])  # stands in for a node of several ranks (a one-rank node has no node group)
    nodes = type(groups.nodes)(node, groups.nodes.across, 0, 1, 1)
    model = _sync_batchnorm(build_net(batchnorm=True), TorchSyncBatchNorm(), nodes)
    (converted,) = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert converted.process_group is node


ENGINE = {"steps": 7, "sync_every": 2, "engine_args": {"outer_lr": 0.8, "outer_momentum": 0.5}}


@pytest.mark.parametrize("comm_dtype", [None, "bfloat16"])
def test_engine_on_two_nodes_of_two_equals_two_flat_workers_bit_for_bit(tmp_path, comm_dtype):
    """Node-mates make the same changes (as after a gradient all-reduce): each node is then exactly one flat
    worker, with the outer optimizer on, a compressed wire or not; a stop asked by one rank reaches all four."""
    args = {**ENGINE, "comm_dtype": comm_dtype, "stop_from_rank": 3}
    node = run_ranks("engine", tmp_path / "node", {**args, "hierarchy": True}, world_size=4, num_nodes=2)
    flat = run_ranks("engine", tmp_path / "flat", {**args, "stop_from_rank": 1}, world_size=2, num_nodes=2)
    for r in node:
        f = flat[r.rank // 2].result
        assert "error" not in r.result, r.result["error"]
        for got, want in zip(r.result["final"], f["final"]):
            assert torch.equal(got, want)
        assert torch.equal(r.result["global_"], f["global_"])
        assert r.result["stop_requested"] == f["stop_requested"] != 0
        numel = r.result["global_"].numel()
        size = torch.empty((), dtype=getattr(torch, comm_dtype) if comm_dtype else r.result["global_dtype"])
        assert r.result["stats"]["bytes_per_round"] == math.ceil(numel / 2) * size.element_size()
        assert f["stats"]["bytes_per_round"] == numel * size.element_size()


def test_a_non_finite_share_stops_every_rank_naming_the_rank(tmp_path):
    results = run_ranks("engine", tmp_path, {**ENGINE, "hierarchy": True, "nan_at_step": 3}, world_size=4,
                        num_nodes=2)  # fmt: skip
    for r in results:
        assert r.result["error"].startswith("NonFiniteUpdateError: HPSGD: a non-finite update (NaN or inf) from"
                                            " rank(s) [1]"), r.result["error"]  # fmt: skip
        assert "'b'" in r.result["error"]


def test_bad_hierarchy_is_refused():
    from lightning_hpsgd import HPSGDStrategy

    with pytest.raises(ValueError, match="hierarchy must be None .* or 'node'"):
        HPSGDStrategy(hierarchy="rack")
