"""W&B: offline runs of a real 2-process fit, read back from the run file; the offline default; the dashboard."""

from __future__ import annotations

import fnmatch
import math
import subprocess
import sys

import pytest

from lightning_hpsgd.wandb import (
    DASHBOARD,
    HPSGD_METRICS,
    STEP,
    WALL_TIME,
    build_workspace,
    find_run_files,
    iter_records,
    offline_unless_logged_in,
    read_run,
)
from tests.launch import ROOT, base_env, run_ranks


def no_wandb_credentials(tmp_path) -> dict[str, str]:
    """The environment of a machine where nobody ran ``wandb login``."""
    env = {k: v for k, v in base_env().items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    return env


def test_two_process_fit_writes_an_offline_run_with_hpsgd_metrics_config_and_wall_time(tmp_path):
    args = {"wandb_logger": True, "log_every_n_steps": 2, "sync_every": 2, "max_epochs": 3, "val": True}
    run_ranks("fit", tmp_path, args, extra_env=no_wandb_credentials(tmp_path))
    (path,) = find_run_files(tmp_path / "logs" / "wandb")  # one run, written by rank 0 only
    assert path.parent.name.startswith("offline-run-")  # no API key: offline by default
    run = read_run(path)
    assert (run.project, run.group, run.job_type) == ("tests", "regressor", "hpsgd")

    strategy = run.config["strategy"]
    assert strategy["name"] == "hpsgd" and strategy["sync_every"] == 2 and strategy["merge"] == "replica"
    assert strategy["world_size"] == 2 and strategy["comm_dtype"] is None

    rounds = [row for row in run.history if "hpsgd/comm_ms" in row]
    assert rounds, f"no hpsgd/* row in {run.history[:3]}"
    for row in rounds:
        assert row["hpsgd/comm_ms"] > 0 and row["hpsgd/wait_ms"] >= 0
        assert -0.05 <= row["hpsgd/hidden"] <= 1.0
        assert row["hpsgd/staleness"] == 2  # launched at one sync point, merged at the next (H=2)
        assert row["hpsgd/bytes"] == 146 * 4  # the Regressor's 146 fp32 parameters
        assert math.isfinite(row["hpsgd/drift"]) and row["hpsgd/drift"] >= 0
        assert row["hpsgd/step_ms"] > 0 and row["hpsgd/samples_per_s"] > 0
    assert [row["hpsgd/rounds"] for row in rounds] == sorted(row["hpsgd/rounds"] for row in rounds)

    # The wall-time axis is only the monitor's: hpsgd/* against time/wall_s. The "*" glob is Lightning's WandbLogger's
    # own (the last definition of a name is the one W&B applies), so the user's val_loss and train_loss keep the step.
    assert run.metrics[HPSGD_METRICS] == {"step_metric": WALL_TIME, "step_sync": True}
    assert run.metrics["*"] == {"step_metric": STEP, "step_sync": True}
    assert [name for name, m in run.metrics.items() if m["step_metric"] == WALL_TIME] == [HPSGD_METRICS]
    assert not any(fnmatch.fnmatchcase(key, HPSGD_METRICS) for key in ("val_loss", "train_loss", "epoch"))
    # Yet the user's rows carry the wall time, for a panel that charts them against it (the dashboard's).
    training = [row for row in run.history if "train_loss" in row]
    assert training and all(WALL_TIME in row and STEP in row for row in training)
    assert all(0 < row[WALL_TIME] for row in training)
    validation = [row for row in run.history if "val_loss" in row]
    assert len(validation) == 3  # one per epoch
    for row in validation:
        assert WALL_TIME in row and STEP in row
    walls = [row[WALL_TIME] for row in validation]
    assert all(0 < a < b for a, b in zip(walls, walls[1:])), walls
    # Each validation row carries the wall time logged for it (after validation ran), not the last training log's.
    for row in validation:
        earlier = [r[WALL_TIME] for r in rounds if r[STEP] <= row[STEP]]
        assert row[WALL_TIME] > max(earlier)
    assert run.summary[WALL_TIME]["max"] == pytest.approx(max(r[WALL_TIME] for r in run.history if WALL_TIME in r))


def wait_until_written(path, rows: int, limit_s: float = 300.0) -> None:
    """wandb's service process can still be writing the run file when `run.finish()` returns on a busy machine (the
    suite saw the last rows arrive late): wait until the file holds all ``rows`` history rows. ``limit_s`` guards
    against a run that never writes them: the rows take well under a second on an idle machine."""
    import time

    deadline = time.monotonic() + limit_s
    while len(read_run(path).history) < rows and time.monotonic() < deadline:
        time.sleep(0.1)


def test_reader_joins_records_that_span_blocks(tmp_path):
    """A config value longer than wandb's 32 KiB blocks, and enough rows to fill several blocks, read back whole."""
    import wandb

    big = "x" * 100_000
    run = wandb.init(mode="offline", dir=tmp_path, project="reader", config={"big": big, "n": 3})
    for step in range(2000):
        run.log({"value": step * 0.5, WALL_TIME: step / 10})
    run.finish()
    (path,) = find_run_files(tmp_path)
    wait_until_written(path, rows=2000)
    assert path.stat().st_size > 4 * 32768
    back = read_run(path)
    assert back.config["big"] == big and back.config["n"] == 3
    assert [row["value"] for row in back.history] == [step * 0.5 for step in range(2000)]
    # A truncated file (a run still being written) ends cleanly at its last whole record.
    partial = tmp_path / "partial.wandb"
    partial.write_bytes(path.read_bytes()[: 3 * 32768 + 100])
    assert 0 < sum(1 for _ in iter_records(partial)) < sum(1 for _ in iter_records(path))
    (tmp_path / "bad.wandb").write_bytes(b"not a run file")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_run(tmp_path / "bad.wandb")


def test_offline_only_without_credentials_and_an_explicit_mode_wins(tmp_path):
    netrc = tmp_path / "netrc"
    env = {"NETRC": str(netrc)}
    assert offline_unless_logged_in(env) and env["WANDB_MODE"] == "offline"
    for configured in ({"WANDB_API_KEY": "k" * 40}, {"WANDB_MODE": "online"}, {"WANDB_MODE": "disabled"}):
        env = {"NETRC": str(netrc), **configured}
        assert not offline_unless_logged_in(env)
        assert env.get("WANDB_MODE") == configured.get("WANDB_MODE")
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")  # what `wandb login` writes
    assert not offline_unless_logged_in({"NETRC": str(netrc)})
    # A self-hosted server's key does not count for another host.
    assert offline_unless_logged_in({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"})


def test_dashboard_has_the_comparison_panels_and_groups_by_strategy():
    workspace = build_workspace("team", "lightning-hpsgd", group="mnist1d")
    panels = {panel.title: (panel.x, list(panel.y)) for section in workspace.sections for panel in section.panels}
    assert panels["Validation accuracy vs wall time (s)"] == (WALL_TIME, ["val/acc"])
    assert panels["Hidden fraction of communication (1 - wait/comm)"] == (WALL_TIME, ["hpsgd/hidden"])
    assert panels["Wait vs comm per round (ms)"] == (WALL_TIME, ["hpsgd/comm_ms", "hpsgd/wait_ms"])
    assert panels["Replica drift |R - G| / |G|"] == (STEP, ["hpsgd/drift"])
    assert panels["sync_every (H of the current round)"] == (STEP, ["hpsgd/sync_every"])
    assert len(panels) == sum(len(p) for p in DASHBOARD.values())
    # The saved view, as it would be sent to the server (not sent here: no W&B server is reachable).
    view = workspace._to_model().model_dump_json(by_alias=True)
    assert "jobType" in view and "mnist1d" in view and WALL_TIME in view

    done = subprocess.run(
        [sys.executable, "-m", "lightning_hpsgd", "dashboard", "--entity", "team", "--group", "mnist1d", "--dry-run"],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Validation accuracy vs wall time (s): val/acc against time/wall_s" in done.stdout
