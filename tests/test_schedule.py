"""The schedule of rounds, with a fake clock: fixed H, and "auto" deciding from every rank's figures."""

from __future__ import annotations

import torch

from lightning_hpsgd import side_channel
from lightning_hpsgd.schedule import Schedule, agreed_sync_delay, agreed_sync_every


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def slots_of(figures: list[tuple[float | None, ...]]) -> list[side_channel.Slot]:
    """Every rank's (step, comm[, wait]) seconds through a real side channel: encoded per rank, summed, decoded."""
    total = torch.zeros(side_channel.size(len(figures)), dtype=torch.int64)
    for rank, (step_s, comm_s, *wait_s) in enumerate(figures):
        one = torch.zeros_like(total)
        side_channel.encode(one, rank, step=5, is_flush=False, non_finite=torch.tensor(False),
                            stop=side_channel.StopRequest(0), step_seconds=step_s, comm_seconds=comm_s,
                            wait_seconds=wait_s[0] if wait_s else None)  # fmt: skip
        total += one
    return side_channel.decode(total.tolist())


def simulate_auto(step_seconds: list[float], link_seconds: float, rounds: int = 60, max_sync_every: int = 32):
    """Ranks of different speeds, one all-reduce per round that completes ``link_seconds`` after the *last* rank
    launched it (as a real one does), each rank waiting at its next sync point for the pending one. Every rank
    measures its own step and comm times on its own fake clock, and all decide from the same summed slots.
    Returns the agreed H after each round."""
    clocks = [FakeClock() for _ in step_seconds]
    schedules = [Schedule("auto", max_sync_every, clock=c) for c in clocks]
    history = []
    pending_done: float | None = None
    launches: list[float] = [0.0] * len(step_seconds)
    for s in schedules:
        s.start_round(0)
    for _ in range(rounds):
        h = schedules[0].sync_every
        for rank, (schedule, clock) in enumerate(zip(schedules, clocks)):
            for _ in range(h):
                schedule.count(1)  # the step number does not matter here
            clock.now += h * step_seconds[rank]
            schedule.end_round()
            if pending_done is not None:  # wait for the pending all-reduce, then measure its comm time
                wait = max(0.0, pending_done - clock.now)
                clock.now += wait
                schedule.record_comm(pending_done - launches[rank], wait)
            launches[rank] = clock.now
        pending_done = max(launches) + link_seconds
        slots = slots_of([(s.step_seconds, s.comm_seconds, s.wait_seconds) for s in schedules])
        agreed = {s.agree(slots) for s in schedules}
        assert len(agreed) == 1, agreed
        history.append(agreed.pop())
        for schedule in schedules:
            schedule.start_round(0)
    return history


def test_fixed_sync_every_ends_rounds_at_every_multiple_also_when_steps_jump():
    schedule = Schedule(3, 32)
    assert [step for step in range(1, 13) if schedule.count(step)] == [3, 6, 9, 12]
    jumping = Schedule(3, 32)
    assert [step for step in (2, 4, 5, 8, 9) if jumping.count(step)] == [4, 8, 9]


def test_heterogeneous_ranks_on_a_fast_link_keep_sync_every_at_one():
    """20 % and 2x speed gaps on a 1 ms link: a fast rank measures its wait for the slow one as comm; the old rule
    (the largest proposal wins) climbed to H = 11 and 26 here. The link itself needs no more than H = 1."""
    assert simulate_auto([0.010, 0.012], 0.001) == [1] * 60
    assert simulate_auto([0.010, 0.020], 0.001) == [1] * 60
    assert simulate_auto([0.005, 0.010, 0.020, 0.020], 0.001) == [1] * 60


def test_a_slow_link_gives_the_sync_every_that_hides_it():
    """A 50 ms all-reduce over steps of 10 and 12 ms: H = ceil(1.25 x 50 / 12) = 6, whichever rank is faster."""
    history = simulate_auto([0.010, 0.012], 0.050)
    assert history[0] == 1 and history[-10:] == [6] * 10, history
    assert simulate_auto([0.010, 0.010], 0.100, max_sync_every=8)[-1] == 8  # capped at max_sync_every


def test_agreement_waits_until_every_rank_measured_both_times():
    assert agreed_sync_every(slots_of([(0.01, None), (0.01, 0.05)]), 3, 32) == 3
    # ceil(1.25 * 0.05 / 0.02) = 4, once the slowest rank (0.02 s a step) waits at its merges
    assert agreed_sync_every(slots_of([(0.01, 0.05, 0.01), (0.02, 0.07, 0.01)]), 3, 32) == 4


def test_sync_every_grows_only_while_the_slowest_rank_waits():
    """A completion read late on the host (the callback waits for Python's lock) inflates comm: with no wait at
    the merges the all-reduce is hidden already, and H stays; shrinking needs no wait."""
    assert agreed_sync_every(slots_of([(0.01, 0.05, 0.0), (0.02, 0.07, 0.001)]), 1, 32) == 1
    assert agreed_sync_every(slots_of([(0.01, 0.05, 0.0), (0.02, 0.07, 0.005)]), 1, 32) == 4
    assert agreed_sync_every(slots_of([(0.01, 0.01, 0.0), (0.02, 0.01, 0.0)]), 4, 32) == 1


def test_auto_state_round_trips_and_a_fixed_h_has_none():
    schedule = Schedule("auto", 16)
    schedule.sync_every, schedule.next_sync = 5, 40
    restored = Schedule("auto", 4)
    restored.load_state_dict(schedule.state_dict())
    assert (restored.sync_every, restored.next_sync) == (4, 40)  # never above the new max
    assert Schedule(2, 32).state_dict() == {}


def test_fragments_end_their_rounds_at_steps_spread_over_h():
    schedule = Schedule(16, 32, fragments=4)
    ends = {f: [s for s in range(1, 33) if f in schedule.count(s)] for f in range(4)}
    assert ends == {0: [16, 32], 1: [4, 20], 2: [8, 24], 3: [12, 28]}
    jumping = Schedule(4, 32, fragments=2)  # steps may jump: a round ends at the first step at or past its boundary
    assert [(s, jumping.count(s)) for s in (1, 3, 5, 8)] == [(1, ()), (3, (1,)), (5, (0,)), (8, (0, 1))]


def test_auto_delay_shrinks_with_a_margin_while_hidden_and_grows_while_the_slowest_rank_waits():
    # A 50 ms all-reduce over steps of 10 and 12 ms.
    hidden = slots_of([(0.010, 0.050, 0.0), (0.012, 0.060, 0.0)])
    assert agreed_sync_delay(hidden, 16, 16) == 7  # from H down to ceil(1.5 x 50 / 12) at once
    assert agreed_sync_delay(hidden, 3, 16) == 3  # no rank waits: it never grows
    slowest_waits = slots_of([(0.010, 0.050, 0.0), (0.012, 0.060, 0.005)])
    assert agreed_sync_delay(slowest_waits, 3, 16) == 6  # to ceil(1.25 x 50 / 12)
    assert agreed_sync_delay(slowest_waits, 7, 16) == 8  # the estimate is already met: one step more
    assert agreed_sync_delay(slowest_waits, 8, 16) == 8  # but no more than ceil(1.5 x 50 / 12) + 1
    assert agreed_sync_delay(slowest_waits, 7, 4) == 4  # never above H
    fast_rank_waits = slots_of([(0.010, 0.050, 0.009), (0.012, 0.060, 0.0)])
    assert agreed_sync_delay(fast_rank_waits, 5, 16) == 5  # a fast rank waiting for a slow one is not the link
    assert agreed_sync_delay(slots_of([(0.01, None), (0.01, 0.05)]), 16, 16) == 16  # until every rank measured


def test_auto_delay_follows_h_until_agreed_then_round_trips_through_its_state():
    schedule = Schedule(8, 32, sync_delay="auto")
    assert schedule.delay == 8
    schedule.agree(slots_of([(0.010, 0.020, 0.0), (0.010, 0.020, 0.0)]))
    assert schedule.delay == 3  # ceil(1.5 x 20 / 10)
    restored = Schedule(8, 32, sync_delay="auto")
    restored.load_state_dict(schedule.state_dict())
    assert restored.delay == 3
    assert Schedule(8, 32, sync_delay=2).state_dict() == {}  # a fixed delay has no state
    assert Schedule(8, 32, sync_delay=2).delay == 2 and Schedule("auto", 32, sync_delay=5).delay == 1  # at most H
