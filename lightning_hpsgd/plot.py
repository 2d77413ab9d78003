"""``hpsgd plot RUN_DIR [RUN_DIR ...]``: PNG charts from CSVLogger runs, without W&B.

Each RUN_DIR is a CSVLogger version folder (holding ``metrics.csv``) or a folder above such folders (the newest
version is taken). Four charts are written to ``--out`` (default: the current folder):

* ``accuracy_vs_wall_time.png``: the validation metric of every run against wall time (``time/wall_s``, logged by
  ``HPSGDMonitor``), on one chart: accuracy at a fixed wall time, the paper's central view;
* ``loss_vs_step.png``: the training loss of every run against the step;
* ``wait_vs_comm.png``: ``hpsgd/comm_ms`` and ``hpsgd/wait_ms`` per step, for the runs that have them;
* ``hidden_vs_step.png``: ``hpsgd/hidden``, the fraction of communication hidden behind compute (1: fully hidden),
  per step: the key question of whether HPSGD pays off on this link.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path

from lightning_hpsgd.extras import MissingExtraError, require

__all__ = ["load_run", "main", "plot_runs"]

DESCRIPTION = (
    "Draw PNG charts from CSVLogger runs, without W&B: validation metric against wall time, training loss against"
    " step, all-reduce time and wait per round, and the hidden fraction of communication. Each RUN is a CSVLogger"
    " folder (holding metrics.csv) or a folder above such folders (the newest version is taken)."
)
EXAMPLE = "example: hpsgd plot lightning_logs/mnist1d_hpsgd --out plots"


def find_metrics(run_dir: Path) -> Path:
    """``metrics.csv`` of a CSVLogger version folder, or of the newest version below ``run_dir``."""
    direct = run_dir / "metrics.csv"
    if direct.exists():
        return direct
    found = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"No metrics.csv in {run_dir} or below it. Pass a CSVLogger folder, e.g. lightning_logs/mnist1d_hpsgd."
        )
    return found[-1]


def load_run(run_dir: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """A run's label and its series: metric name → [(step, value)] in file order."""
    path = find_metrics(run_dir)
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                number = float(value)
                if math.isfinite(number):
                    series.setdefault(key, []).append((step, number))
    label = path.parent.parent.name if path.parent.name.startswith("version_") else path.parent.name
    return label, series


def wall_time_of(series: dict[str, list[tuple[int, float]]], steps: Sequence[int]) -> list[float]:
    """Wall time at each step, interpolated from the run's ``time/wall_s`` points."""
    points = sorted(series.get("time/wall_s", []))
    if not points:
        return []
    out = []
    for step in steps:
        before = [p for p in points if p[0] <= step] or points[:1]
        after = [p for p in points if p[0] >= step] or points[-1:]
        (s0, t0), (s1, t1) = before[-1], after[0]
        out.append(t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0))
    return out


def plot_runs(run_dirs: Sequence[Path], out: Path, metric: str = "val/acc", loss: str = "train/loss") -> list[Path]:
    """Write the three charts for ``run_dirs`` into ``out``; returns the files written."""
    require("matplotlib", "hpsgd plot").use("Agg")
    plt = require("matplotlib.pyplot", "hpsgd plot")

    runs = [load_run(Path(d)) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, series in runs:
        points = series.get(metric, [])
        times = wall_time_of(series, [s for s, _ in points])
        if points and times:
            ax.plot(times, [v for _, v in points], marker="o", label=label)
    ax.set(xlabel="wall time (s)", ylabel=metric, title=f"{metric} against wall time")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "accuracy_vs_wall_time.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, series in runs:
        points = series.get(loss, [])
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=label, alpha=0.8)
    ax.set(xlabel="step", ylabel=loss, title=f"{loss} against step", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "loss_vs_step.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, series in runs:
        for key, style in (("hpsgd/comm_ms", "-"), ("hpsgd/wait_ms", "--")):
            points = series.get(key, [])
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], style, label=f"{label}: {key[6:]}")
    ax.set(xlabel="step", ylabel="ms per round", title="all-reduce time (comm) and the part training waited for")
    _legend_or_note(ax, "no hpsgd/comm_ms in these runs")
    written.append(_save(fig, out / "wait_vs_comm.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, series in runs:
        points = series.get("hpsgd/hidden", [])
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=label)
    ax.set(xlabel="step", ylabel="hidden fraction (1 - wait / comm)", ylim=(-0.05, 1.05),
           title="how much of each round's communication was hidden behind compute")  # fmt: skip
    _legend_or_note(ax, "no hpsgd/hidden in these runs")
    written.append(_save(fig, out / "hidden_vs_step.png"))
    return written


def _legend_or_note(ax, note: str) -> None:
    """A grid, and the legend, or ``note`` in the middle of an empty chart (runs without HPSGD's metrics)."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, note, ha="center", transform=ax.transAxes)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    require("matplotlib.pyplot", "hpsgd plot").close(fig)
    return path


def main(args: Sequence[str] | None = None) -> None:
    """``hpsgd plot``."""
    parser = argparse.ArgumentParser(prog="hpsgd plot", description=DESCRIPTION, epilog=EXAMPLE)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="CSVLogger folders (e.g. lightning_logs/mnist1d_hpsgd)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG files (default: .)")
    parser.add_argument("--metric", default="val/acc", help="validation metric to chart (default: val/acc)")
    parser.add_argument("--loss", default="train/loss", help="training loss to chart (default: train/loss)")
    parsed = parser.parse_args(args)
    try:
        written = plot_runs(parsed.runs, parsed.out, parsed.metric, parsed.loss)
    except (FileNotFoundError, MissingExtraError) as err:
        parser.exit(2, f"hpsgd plot: error: {err}\n")  # a user error: one line, no traceback
    for path in written:
        print(path)
