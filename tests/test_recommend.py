"""The end-of-fit recommendation: the sync_every that hides the measured link, by the rule "auto" follows."""

from __future__ import annotations

import re

import pytest

from lightning_hpsgd.recommend import recommendation
from lightning_hpsgd.schedule import hiding_sync_every
from tests.launch import run_ranks

RATIO = re.compile(r"ratio (\d+\.\d+)")
SYNC_EVERY = re.compile(r"sync_every=(\d+)")
MS = re.compile(r"([\d.]+) ms of compute per step .* and ([\d.]+) ms to all-reduce")


def test_a_link_faster_than_a_step_is_not_the_bottleneck():
    text = recommendation(0.040, 0.020, wait_fraction=0.01)
    measured, advice = text.splitlines()
    assert "40 ms of compute" in measured and "20 ms to all-reduce the model" in measured
    assert "ratio 0.50" in measured and "rank 0 waited 1.0 %" in measured
    assert "the link is not the bottleneck" in advice and "DDP, or sync_every=1" in advice
    assert "fragments" not in advice and "bf16" not in advice


def test_a_ratio_of_three_needs_four_steps_and_suggests_fragments():
    text = recommendation(0.040, 0.120, wait_fraction=0.3)
    assert "ratio 3.00" in text and "waited 30.0 %" in text
    advice = text.splitlines()[1]
    assert "sync_every=4 hides this link" in advice  # ⌈1.25 · 3⌉
    assert "fragments=3 and sync_delay='auto'" in advice and "bf16" not in advice


def test_a_ratio_of_twelve_also_suggests_a_bf16_wire_unless_it_is_one():
    advice = recommendation(0.040, 0.480).splitlines()[1]
    assert "sync_every=15 hides this link" in advice and "fragments=12" in advice  # ⌈1.25 · 12⌉ = 15
    assert "comm_dtype='bf16'" in advice
    assert "bf16" not in recommendation(0.040, 0.480, compressed=True)


def test_fragments_times_are_scaled_to_the_whole_model():
    """A run with 8 fragments timed one fragment's all-reduce (1/8 of the bytes): the advice is for the model."""
    text = recommendation(0.040, 0.060, fragments=8)
    assert "480 ms to all-reduce the model (its 8 fragments together)" in text and "ratio 12.00" in text
    assert "sync_every=15" in text


def test_a_link_beyond_max_sync_every_says_where_auto_stops():
    advice = recommendation(0.001, 0.050, max_sync_every=32).splitlines()[1]
    assert "sync_every=63 would hide this link, above max_sync_every=32" in advice and "bf16" in advice
    assert "waited" not in recommendation(0.001, 0.050)  # no wait figure given: none printed


@pytest.mark.parametrize("step_s, comm_s", [(0.0123, 0.0077), (0.05, 0.0501), (0.002, 0.0191), (0.3, 1.2345)])
def test_the_printed_ratio_gives_the_printed_sync_every(step_s, comm_s):
    text = recommendation(step_s, comm_s)
    ratio = float(RATIO.search(text).group(1))
    assert int(SYNC_EVERY.search(text).group(1)) == hiding_sync_every(ratio)
    assert ratio == pytest.approx(comm_s / step_s, abs=0.005)


def test_fit_prints_the_recommendation_once_on_rank_0(tmp_path):
    """Two real ranks with sync_every="auto": rank 0 prints both lines once at the end of fit, rank 1 never, and the
    sync_every it names is the schedule's rule applied to the ratio it prints, which matches the printed times."""
    results = run_ranks("fit", tmp_path, {"sync_every": "auto", "max_epochs": 2, "num_batches": 8})
    rank0, rank1 = results
    output = rank0.stdout + rank0.stderr
    assert output.count("HPSGD: measured") == 1, output[-3000:]
    assert "HPSGD: measured" not in rank1.stdout + rank1.stderr
    (measured,) = [line for line in output.splitlines() if line.startswith("HPSGD: measured")]
    advice = output.splitlines()[output.splitlines().index(measured) + 1]
    ratio = float(RATIO.search(measured).group(1))
    step_ms, comm_ms = (float(v) for v in MS.search(measured).groups())
    assert ratio == pytest.approx(comm_ms / step_ms, rel=0.02, abs=0.01)  # both times printed to 3 digits
    assert re.search(r"rank 0 waited \d+\.\d %", measured)
    assert int(SYNC_EVERY.search(advice).group(1)) == hiding_sync_every(ratio), advice
    assert ("not the bottleneck" in advice) == (ratio < 1)
