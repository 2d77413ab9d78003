"""HPSGDMonitor: the hpsgd/* metrics reach Lightning's loggers with plausible values."""

from __future__ import annotations

import csv
import math

import pytest

from tests.launch import run_ranks


def read_metrics(tmp_path) -> list[dict[str, str]]:
    (path,) = (tmp_path / "logs" / "csv").glob("version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def column(rows, key) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_monitor_writes_hpsgd_metrics_to_the_csv_logger(tmp_path):
    """Rank 1 sleeps 100 ms per step, so rank 0 waits for rank 1's rounds (H=2): the logged wait (the worst rank's)
    must show it, at 20 ms ten times below the 200 ms rank 1 adds per round, so that a rank 0 slowed by a busy
    machine still waits. (The monitor's own all-reduce lines the ranks up at each logging step, every 3 rounds.)"""
    args = {"csv_logger": True, "log_every_n_steps": 6, "sync_every": 2, "max_epochs": 4,
            "model_args": {"step_sleep_s": 0.1, "sleep_rank": 1, "log_sync_dist": False}}  # fmt: skip
    run_ranks("fit", tmp_path, args)
    rows = read_metrics(tmp_path)
    assert column(rows, "hpsgd/comm_ms"), f"no hpsgd metrics in {list(rows[0])}"
    assert all(v > 0 for v in column(rows, "hpsgd/comm_ms"))
    wait = column(rows, "hpsgd/wait_ms")
    assert len(wait) >= 4 and all(v > 20 for v in wait), wait
    assert all(-0.05 <= v <= 1.0 for v in column(rows, "hpsgd/hidden"))
    assert set(column(rows, "hpsgd/staleness")) == {2.0}  # launched at one sync point, merged at the next (H=2)
    # The Regressor's MLP: 6*16 + 16 + 16*2 + 2 = 146 fp32 values per round.
    assert set(column(rows, "hpsgd/bytes")) == {146 * 4}
    rounds, wall = column(rows, "hpsgd/rounds"), column(rows, "time/wall_s")
    assert rounds == sorted(rounds) and wall == sorted(wall) and wall[0] > 0
    drift = column(rows, "hpsgd/drift")
    assert drift and all(0 < v < 1 and math.isfinite(v) for v in drift)
    assert all(v > 0 for v in column(rows, "hpsgd/step_ms")) and all(v > 0 for v in column(rows, "hpsgd/samples_per_s"))


def test_monitor_logs_the_delay_and_each_fragments_comm_and_wait(tmp_path):
    args = {"csv_logger": True, "log_every_n_steps": 4, "sync_every": 4, "max_epochs": 3,
            "strategy_args": {"sync_delay": 1, "fragments": 2}}  # fmt: skip
    run_ranks("fit", tmp_path, args)
    rows = read_metrics(tmp_path)
    assert set(column(rows, "hpsgd/sync_delay")) == {1.0}
    assert set(column(rows, "hpsgd/staleness")) == {1.0}  # every round merged one step after its launch
    for f in (0, 1):
        comm = column(rows, f"hpsgd/comm_ms/f{f}")
        assert comm and all(v > 0 for v in comm), f"fragment {f}: {comm}"
        assert all(v >= 0 for v in column(rows, f"hpsgd/wait_ms/f{f}"))
    assert "hpsgd/comm_ms/f2" not in rows[0]


def test_monitor_can_be_turned_off(tmp_path):
    results = run_ranks("fit", tmp_path, {"csv_logger": True, "log_every_n_steps": 2, "monitor": False,
                                           "max_epochs": 1})  # fmt: skip
    rows = read_metrics(tmp_path)
    assert rows and not any(key.startswith("hpsgd/") for key in rows[0])
    assert not any("HPSGD: measured" in r.stdout + r.stderr for r in results)  # no end-of-fit recommendation


def test_plot_command_charts_two_runs(tmp_path):
    """`hpsgd plot` on two real CSV runs (replica and stale) writes three non-empty PNGs."""
    import subprocess
    import sys

    from lightning_hpsgd.plot import load_run, wall_time_of
    from tests.launch import ROOT, base_env

    args = {"csv_logger": True, "log_every_n_steps": 2, "val": True, "max_epochs": 3}
    for merge in ("replica", "stale"):
        run_ranks("fit", tmp_path / merge, {**args, "merge": merge})
    runs = [str(tmp_path / merge / "logs") for merge in ("replica", "stale")]
    label, series = load_run(tmp_path / "replica" / "logs")
    assert series["hpsgd/hidden"], "the hidden fraction is in the CSV, so hpsgd plot can chart it"
    val_steps = [s for s, _ in series["val_loss"]]
    assert len(val_steps) == 3 and all(t > 0 for t in wall_time_of(series, val_steps))

    done = subprocess.run(
        [sys.executable, "-m", "lightning_hpsgd", "plot", *runs, "--out", str(tmp_path / "plots"),
         "--metric", "val_loss", "--loss", "train_loss"],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("accuracy_vs_wall_time.png", "loss_vs_step.png", "wait_vs_comm.png", "hidden_vs_step.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name


def test_monitor_writes_hpsgd_scalars_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_ranks("fit", tmp_path, {"tb_logger": True, "log_every_n_steps": 2, "sync_every": 2, "max_epochs": 1})
    (events,) = (tmp_path / "logs" / "tb").glob("version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"hpsgd/comm_ms", "hpsgd/wait_ms", "hpsgd/hidden", "hpsgd/drift", "time/wall_s"} <= tags, tags
    comm = [e.value for e in accumulator.Scalars("hpsgd/comm_ms")]
    assert comm and all(v > 0 for v in comm)
    assert {e.value for e in accumulator.Scalars("hpsgd/staleness")} == {2.0}


def test_plot_command_help_and_a_folder_without_logs(tmp_path, capsys):
    """`hpsgd plot --help` is plain text with an example (the command's entry point, in this process); a folder
    without logs is one line, not a traceback (a real command)."""
    import subprocess
    import sys

    from lightning_hpsgd.cli import main
    from tests.launch import ROOT, base_env

    def plot(*args):
        return subprocess.run([sys.executable, "-m", "lightning_hpsgd", "plot", *args], cwd=ROOT, env=base_env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and "``" not in shown and "example: hpsgd plot" in shown
    assert "hidden fraction" in shown
    (tmp_path / "empty").mkdir()
    failed = plot(str(tmp_path / "empty"))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [
        f"hpsgd plot: error: No metrics.csv in {tmp_path / 'empty'} or below it. Pass a CSVLogger folder, e.g."
        " lightning_logs/mnist1d_hpsgd."
    ]
