"""Each part of the engine alone, in this one process (the multi-process tests are in test_engine.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_hpsgd import side_channel
from lightning_hpsgd.buffers import RuleBuffers
from lightning_hpsgd.errors import (
    HPSGDError,
    HPSGDReentryError,
    NonFiniteUpdateError,
    RanksOutOfStepError,
    SectionGuard,
)
from lightning_hpsgd.model_tensors import ModelWatcher, averaged_names, model_tensors, trained_names
from lightning_hpsgd.outer import OuterStep
from lightning_hpsgd.side_channel import StopRequest
from lightning_hpsgd.tensor_utils import FlatLayout
from lightning_hpsgd.tracked import TrackedTensors


def encode(meta, rank, step=7, is_flush=False, non_finite=False, stop=0, step_s=None, comm_s=None, wait_s=None):
    side_channel.encode(meta, rank, step=step, is_flush=is_flush, non_finite=torch.tensor(non_finite),
                        stop=StopRequest(stop), step_seconds=step_s, comm_seconds=comm_s,
                        wait_seconds=wait_s)  # fmt: skip


def test_side_channel_round_trips_every_field_exactly_in_fp32():
    world = 3
    total = torch.zeros(side_channel.size(world), dtype=torch.float32)
    big_step = (1 << 23) + 12345  # needs both halves of the step code
    for rank in range(world):
        one = torch.zeros_like(total)
        encode(one, rank, step=big_step, non_finite=rank == 2, stop=int(StopRequest.FINISH) * (rank == 1),
               step_s=0.0123 * (rank + 1), comm_s=0.5, wait_s=0.001 * rank)  # fmt: skip
        total += one
    slots = side_channel.decode([int(v) for v in total.tolist()])
    assert [s.step for s in slots] == [big_step] * 3
    assert [s.non_finite for s in slots] == [False, False, True]
    assert [s.stop for s in slots] == [StopRequest(0), StopRequest.FINISH, StopRequest(0)]
    assert [round(s.step_seconds, 5) for s in slots] == [0.0123, 0.0246, 0.0369]
    assert all(s.comm_seconds == pytest.approx(0.5) for s in slots)
    assert [round(s.wait_seconds, 5) for s in slots] == [0.0, 0.001, 0.002]
    side_channel.check_steps(slots)


def test_read_round_returns_the_slots_or_raises_the_same_error_from_any_rank():
    total = torch.zeros(side_channel.size(2), dtype=torch.int64)
    for rank in range(2):
        one = torch.zeros_like(total)
        encode(one, rank, non_finite=rank == 1)
        total += one
    values = total.tolist()
    with pytest.raises(NonFiniteUpdateError, match=r"from rank\(s\) \[1\].*first in parameter 'w'"):
        side_channel.read_round(values, True, where=lambda: "w", comm_dtype=torch.float32, merged=False)
    ok = torch.zeros_like(total)
    for rank in range(2):
        one = torch.zeros_like(total)
        encode(one, rank, stop=int(StopRequest.FINISH) * rank)
        ok += one
    slots = side_channel.read_round(ok.tolist(), True, where=lambda: "w", comm_dtype=torch.float32, merged=False)
    assert [s.stop for s in slots] == [StopRequest(0), StopRequest.FINISH]


def test_section_guard_refuses_reentry_and_everything_after_an_abort():
    guard = SectionGuard()
    with guard("flush"):
        with pytest.raises(HPSGDReentryError, match="a sync point was requested while another"):
            with guard("sync point"):
                pass
    assert guard.aborted
    with pytest.raises(HPSGDError, match="abandoned after an error"):
        with guard("flush"):
            pass


def test_rule_buffers_hold_delta_rebase_a_narrow_replica_and_keep_g_bits():
    """``S ← R − S`` gives Δ; ``R ← S`` into a bf16 replica rounds, and ``S`` re-reads it so the next Δ is only the
    optimizer's progress; ``G`` of a narrow tensor comes back from saved values only where they round to ``R``."""
    w = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([0.5], dtype=torch.float32)
    tracked = TrackedTensors({"w": w, "b": b})
    buffers = RuleBuffers(tracked)
    assert buffers.global_.dtype == torch.float32 and torch.equal(buffers.global_, buffers.start)
    w += 1.0
    b -= 0.25
    buffers.delta_into_start()
    assert buffers.start.tolist() == [1.0, 1.0, -0.25]
    buffers.start.copy_(torch.tensor([1.001, 2.0, 0.25]))  # G + Δ, finer than bf16
    buffers.write_replica()
    assert w.tolist() == [1.0, 2.0] and buffers.start.tolist() == [1.0, 2.0, 0.25]  # S = R as rounded
    saved = {"w": torch.tensor([1.001, 2.0]), "b": torch.tensor([9.0])}  # b: stale (does not round to R)
    assert buffers.restore_global(saved) == 1
    assert buffers.global_views[0].tolist() == pytest.approx([1.001, 2.0]) and buffers.global_views[1].item() != 9.0
    assert set(buffers.narrow_global()) == {"w"}
    assert float(buffers.drift()) > 0


def test_side_channel_names_every_rank_out_of_step_and_the_non_finite_source():
    total = torch.zeros(side_channel.size(2), dtype=torch.int64)
    for rank, (step, flush) in enumerate([(4, False), (3, True)]):
        one = torch.zeros_like(total)
        encode(one, rank, step=step, is_flush=flush, non_finite=rank == 1)
        total += one
    slots = side_channel.decode(total.tolist())
    with pytest.raises(RanksOutOfStepError, match="rank 0: sync point at step 4, rank 1: flush at step 3"):
        side_channel.check_steps(slots)
    error = side_channel.non_finite_error(slots, True, where=lambda: "w", comm_dtype=torch.float32, merged=False)
    assert error is not None and "rank(s) [1]" in str(error) and "'w'" in str(error)
    ok = side_channel.decode(torch.zeros(side_channel.size(2), dtype=torch.int64).tolist())
    assert side_channel.non_finite_error(ok, True, where=lambda: "", comm_dtype=torch.float32, merged=False) is None


def layout_of(*numels: int) -> FlatLayout:
    return FlatLayout([torch.zeros(n) for n in numels], torch.float32)


def test_outer_step_with_defaults_is_plain_averaging_bit_for_bit():
    g, payload = torch.randn(10), torch.randn(10)
    expected = g.clone().add_(payload, alpha=0.5)
    OuterStep(1.0, 0.0, True, layout_of(4, 6), trained=1).apply(g, payload, 0.5, outer=True)
    assert torch.equal(g, expected)


def test_outer_momentum_steps_only_the_trained_tensors_and_buffers_take_the_plain_mean():
    layout = layout_of(4, 6)  # 4 trained elements, then 6 of a buffer (a running variance, say)
    outer = OuterStep(0.8, 0.6, True, layout, trained=1)
    g = torch.zeros(10)
    for _ in range(3):
        outer.apply(g, torch.ones(10), 1.0, outer=True)
    assert torch.equal(g[4:], torch.full((6,), 3.0))  # the plain mean, three times
    m1, m2, m3 = 1.0, 1.6, 1.96  # M = 0.6 M + 1
    assert torch.allclose(g[:4], torch.full((4,), 0.8 * (3 + 0.6 * (m1 + m2 + m3))))
    assert outer.buffer is not None and outer.buffer.numel() == 4
    assert set(outer.state_dict(["a"])) == {"a"}
    # A round with no optimizer step adds its mean as it is and leaves M alone.
    before = outer.buffer.clone()
    outer.apply(g, torch.ones(10), 1.0, outer=False)
    assert torch.equal(outer.buffer, before)


def test_tracked_tensors_lay_trained_first_and_follow_replaced_objects():
    tensors = {
        "buf": torch.zeros(2),
        "w": torch.ones(3),
        "frozen": torch.ones(4),
        "count": torch.zeros(1, dtype=torch.int64),
    }
    tracked = TrackedTensors(tensors, averaged={"buf", "w"}, trained={"w"})
    assert tracked.names == ["w", "buf"] and tracked.num_trained == 1
    assert tracked.frozen_names == ["frozen"] and tracked.name_at(3) == "buf"
    replaced = dict(tensors, w=torch.full((3,), 2.0))
    tracked.repoint(replaced)
    assert tracked.replica[0] is not tensors["w"] and torch.equal(tracked.replica[0], replaced["w"])
    assert tracked.same_layout(replaced, {"buf", "w"}, {"w"})
    assert not tracked.same_layout(replaced, {"buf", "w", "frozen"}, {"w", "frozen"})
    with pytest.raises(ValueError, match="floating-point tensors only; 'count'"):
        TrackedTensors(tensors, averaged={"count"})


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)
        self.head.requires_grad_(False)
        self.register_buffer("mask", torch.tril(torch.ones(4, 4)))  # constant: a causal mask


def test_model_policy_averages_trained_parameters_and_norm_statistics_only():
    net = Net()
    assert trained_names(net) == {"body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias"}
    assert averaged_names(net) == trained_names(net) | {"body.1.running_mean", "body.1.running_var"}
    tracked = TrackedTensors(model_tensors(net), averaged_names(net), trained_names(net))
    assert set(tracked.frozen_names) == {"head.weight", "head.bias", "mask"}
    watcher = ModelWatcher(net)
    net.head.requires_grad_(True)
    assert watcher.changed(net) and watcher.trained_changed(net) and not watcher.parameters_replaced(net)
    watcher.accept(net)
    net.head.weight = nn.Parameter(torch.zeros(2, 4))
    assert watcher.changed(net) and watcher.parameters_replaced(net)


def test_engine_on_one_rank_in_this_process(one_rank_group):
    """The whole rule on a one-rank group: R keeps its progress (plain training), the counters count."""
    from lightning_hpsgd.engine import HPSGDEngine

    w = torch.zeros(3)
    engine = HPSGDEngine({"w": w}, sync_every=2)
    for step in range(1, 6):
        w.add_(1.0)
        engine.on_optimizer_step(step)
    engine.flush(5)
    assert torch.equal(w, torch.full((3,), 5.0)) and torch.equal(engine.global_, w)
    assert engine.stats.rounds == 3 and engine.stats.flushes == 1 and engine.pending is None
    assert engine.stats.bytes_per_round == 12


def test_wire_on_one_rank_carries_delta_and_slot(one_rank_group):
    import torch.distributed as dist

    from lightning_hpsgd.wire import Wire

    wire = Wire(5, torch.float32, torch.device("cpu"), comm_dtype=None, group=dist.group.WORLD, nodes=None,
                timeout=None)  # fmt: skip
    delta = torch.arange(5.0)
    rnd = wire.launch(delta, {"stop": StopRequest.ABORT, "step_seconds": 0.01, "comm_seconds": None}, step=3,
                      is_flush=False, steps=3)  # fmt: skip
    wire.finish(rnd)
    assert torch.equal(wire.payload, delta) and wire.merge_scale == 1.0
    (slot,) = side_channel.decode([int(v) for v in wire.meta.tolist()])
    assert (slot.step, slot.stop, slot.non_finite) == (3, StopRequest.ABORT, False)
    [(wait, comm)] = list(wire.times(rnd, 0.25))
    assert wait == 0.25 and comm >= 0.0
