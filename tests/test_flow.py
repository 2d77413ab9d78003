"""The Quick start's first-run flow, end to end: fit, test, fit the baseline, plot; the charts' data is checked.

The commands are read from ``docs/snippets/quickstart_cli.sh`` (the Quick start page includes it), so this test
breaks when the page changes. Small overrides keep it fast: 2 epochs of 6 steps, a validation every epoch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import ROOT, base_env, run_commands

SNIPPET = ROOT / "docs" / "snippets" / "quickstart_cli.sh"
HPSGD = Path(sys.executable).parent / "hpsgd"  # the console entry point a user runs
EPOCHS, STEPS_PER_EPOCH = 2, 6
OVERRIDES = {
    "fit": ["--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(STEPS_PER_EPOCH),
            "--trainer.limit_val_batches", "2", "--trainer.check_val_every_n_epoch", "1",
            "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false"],
    "test": ["--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false"],
}  # fmt: skip
# About 10 times what a command takes on an idle 2-core machine (2 processes of a few seconds each), so that a busy
# machine makes the test slow, never a failure.
COMMAND_TIMEOUT_S = 300


def snippet_commands(path: Path) -> list[list[str]]:
    """The shell commands of a snippet: comments dropped, ``\\`` continuations joined, split as the shell would."""
    text = path.read_text().replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def flow_env(tmp: Path) -> dict[str, str]:
    """A user's shell without W&B credentials; W&B disabled (its offline runs are tested in test_cli and test_wandb)."""
    env = {k: v for k, v in base_env().items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(WANDB_MODE="disabled", NETRC=str(tmp / "no-netrc"))
    env["PATH"] = f"{HPSGD.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(cmd: list[str], cwd: Path) -> tuple[int, str, str]:
    (done,) = run_commands([cmd], [flow_env(cwd)], cwd=cwd, timeout=COMMAND_TIMEOUT_S)
    return done.returncode, done.stdout, done.stderr


def run_the_flow(home: Path) -> dict:
    """The Quick start's commands, in order, in ``home``, a fresh folder given a copy of the recipes."""
    shutil.copytree(ROOT / "recipes", home / "recipes")
    commands = snippet_commands(SNIPPET)
    assert [c[:2] for c in commands] == [["hpsgd", "fit"], ["hpsgd", "test"], ["hpsgd", "fit"], ["hpsgd", "plot"]]
    outputs = []
    for cmd in commands:
        done = run([str(HPSGD), *cmd[1:], *OVERRIDES.get(cmd[1], [])], home)
        assert done[0] == 0, f"{shlex.join(cmd)} failed:\n{done[1][-3000:]}\n{done[2][-3000:]}"
        outputs.append(done)
    return {"home": home, "commands": commands, "outputs": outputs}


def check_hpsgd_test_uses_the_checkpoint_the_fit_just_wrote(flow: dict) -> None:
    home, commands, outputs = flow["home"], flow["commands"], flow["outputs"]
    ckpt_path = home / commands[1][commands[1].index("--ckpt_path") + 1]
    assert ckpt_path == home / "checkpoints" / "mnist1d_hpsgd" / "last.ckpt"
    _, test_out, test_err = outputs[1]
    restored = re.search(r"Restoring states from the checkpoint path at (\S+)", test_out + test_err)
    assert restored and Path(home, restored.group(1)).resolve() == ckpt_path.resolve(), (test_out + test_err)[-3000:]
    # The fit's own last step, and nothing else in the folder: no last-v1.ckpt beside it.
    assert torch.load(ckpt_path, map_location="cpu", weights_only=False)["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert not list(ckpt_path.parent.glob("last-v*.ckpt"))
    assert re.search(r"test/acc\s+│?\s*0\.\d+", test_out + test_err)


def check_plot_charts_the_fits_not_the_test_run(flow: dict) -> None:
    home, outputs = flow["home"], flow["outputs"]
    # `hpsgd test` wrote a newer version (test metrics only) beside the fit's.
    versions = sorted(p.name for p in (home / "lightning_logs" / "mnist1d_hpsgd").glob("version_*"))
    assert versions == ["version_0", "version_1"], versions
    _, plot_out, plot_err = outputs[3]
    assert "warning" not in plot_err, plot_err
    assert re.search(r"hpsgd plot: mnist1d_hpsgd: \S+/version_0/metrics\.csv \(newest with training metrics;"
                     r" passed over version_1", plot_out), plot_out  # fmt: skip
    assert re.search(r"hpsgd plot: mnist1d_ddp: \S+/version_0/metrics\.csv$", plot_out, re.M), plot_out

    data = json.loads((home / "plots" / "plot_data.json").read_text())
    assert [(r["label"], r["training_metrics"]) for r in data["runs"]] == [
        ("mnist1d_hpsgd", True),
        ("mnist1d_ddp", True),
    ]
    charts = data["charts"]
    comm = charts["wait_vs_comm.png"]["series"]
    assert comm["mnist1d_hpsgd: comm_ms"] and all(v > 0 for _, v in comm["mnist1d_hpsgd: comm_ms"]), comm
    assert "mnist1d_hpsgd: wait_ms" in comm and not any(k.startswith("mnist1d_ddp") for k in comm)
    hidden = charts["hidden_vs_step.png"]["series"]["mnist1d_hpsgd"]
    assert hidden and all(v <= 1.0 for _, v in hidden)
    assert charts["hidden_vs_step.png"]["ylim"][0] < min(v for _, v in hidden)  # every point on the chart
    accuracy = charts["accuracy_vs_wall_time.png"]
    for label in ("mnist1d_hpsgd", "mnist1d_ddp"):
        points = accuracy["series"][label]
        assert len(points) == EPOCHS and all(t > 0 and 0 < v <= 1 for t, v in points), points
    assert accuracy["ylim"][1] <= 1.0  # an accuracy axis never shows values above 1
    loss = charts["loss_vs_step.png"]["series"]
    assert {"mnist1d_hpsgd", "mnist1d_ddp"} <= set(loss) and max(s for s, _ in loss["mnist1d_hpsgd"]) >= STEPS_PER_EPOCH
    for name, chart in charts.items():
        assert chart["legend_overlaps_axes"] is False, name
        png = home / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def check_plot_warns_in_one_line_for_a_run_without_training_metrics(flow: dict) -> None:
    home = flow["home"]
    test_only = home / "lightning_logs" / "mnist1d_hpsgd" / "version_1"
    code, out, err = run([str(HPSGD), "plot", str(test_only), "--out", str(home / "plots_test_only")], home)
    assert code == 0 and "Traceback" not in err, err
    assert err.strip().splitlines() == [
        f"hpsgd plot: warning: {test_only} has no training metrics (train/loss, time/wall_s or hpsgd/*) in"
        f" {test_only / 'metrics.csv'}: its curves stay empty. Pass the folder of a fit run (e.g."
        f" {test_only.parent}) or set --loss."
    ]
    data = json.loads((home / "plots_test_only" / "plot_data.json").read_text())
    assert data["runs"][0]["training_metrics"] is False


# One test, so that the flow runs once: a module fixture would run again on every pytest-xdist worker.
@pytest.mark.timeout(4 * COMMAND_TIMEOUT_S + 60)
def test_the_quick_start_flow(tmp_path):
    """fit, test, fit the baseline, plot: the test restores the checkpoint the fit just wrote, the plot charts the
    fits (not the version the test added) and warns about a run without training metrics."""
    flow = run_the_flow(tmp_path)
    check_hpsgd_test_uses_the_checkpoint_the_fit_just_wrote(flow)
    check_plot_charts_the_fits_not_the_test_run(flow)
    check_plot_warns_in_one_line_for_a_run_without_training_metrics(flow)


def test_the_readme_quick_start_runs_the_same_commands():
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    for cmd in snippet_commands(SNIPPET):
        assert re.search(r"\s+".join(map(re.escape, cmd)), readme), shlex.join(cmd)
