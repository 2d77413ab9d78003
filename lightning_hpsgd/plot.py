"""``hpsgd plot RUN_DIR [RUN_DIR ...]``: PNG charts from CSVLogger runs, without W&B.

Each RUN_DIR is a CSVLogger version folder (holding ``metrics.csv``) or a folder above such folders. Above them,
the newest version that holds training metrics is taken: ``hpsgd test`` with a recipe writes a newer version with
test metrics only, and that one is passed over. The command prints the version it used for each run, and warns in
one line when a run has no training metrics. Four charts are written to ``--out`` (default: the current folder),
with ``plot_data.json``, the points each chart draws:

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
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_hpsgd.extras import MissingExtraError, require

__all__ = ["Run", "accuracy_axis", "chart_data", "legend_outside", "load_run", "main", "plot_runs", "read_run"]

DESCRIPTION = (
    "Draw PNG charts from CSVLogger runs, without W&B: validation metric against wall time, training loss against"
    " step, all-reduce time and wait per round, and the hidden fraction of communication. Each RUN is a CSVLogger"
    " version folder (holding metrics.csv) or a folder above such folders: there, the newest version with training"
    " metrics is taken (a version written by `hpsgd test` holds test metrics only). plot_data.json holds the points"
    " drawn."
)
EXAMPLE = "example: hpsgd plot lightning_logs/mnist1d_hpsgd lightning_logs/mnist1d_ddp --out plots"

Series = dict[str, list[tuple[int, float]]]


@dataclass
class Run:
    """One run's CSV log, as ``hpsgd plot`` resolved it.

    Attributes:
        label: the run's name: the CSVLogger ``name`` (the folder above ``version_N``).
        path: the ``metrics.csv`` read.
        series: metric name → [(step, value)], in file order.
        training: whether the file holds training metrics (the loss, ``time/wall_s`` or ``hpsgd/*``).
        passed_over: newer ``metrics.csv`` files below the run folder without training metrics (``hpsgd test``'s).
    """

    label: str
    path: Path
    series: Series
    training: bool
    passed_over: list[Path] = field(default_factory=list)


def _read_series(path: Path) -> Series:
    series: Series = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                number = float(value)
                if math.isfinite(number):
                    series.setdefault(key, []).append((step, number))
    return series


def _is_training(series: Series, loss: str) -> bool:
    return any(key == loss or key == "time/wall_s" or key.startswith("hpsgd/") for key in series)


def read_run(run_dir: Path, loss: str = "train/loss") -> Run:
    """The run in ``run_dir``: its own ``metrics.csv``, or the newest one below it that holds training metrics.

    Training metrics are the ``loss`` column, ``time/wall_s`` or any ``hpsgd/*`` column. Below a folder, versions
    are taken newest first (by the file's modification time); when none holds training metrics, the newest is
    returned with ``training`` false.

    Raises:
        FileNotFoundError: no ``metrics.csv`` in ``run_dir`` or below it.
    """
    run_dir = Path(run_dir)
    direct = run_dir / "metrics.csv"
    found = [direct] if direct.exists() else sorted(run_dir.rglob("metrics.csv"), key=lambda p: -p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"No metrics.csv in {run_dir} or below it. Pass a CSVLogger folder, e.g. lightning_logs/mnist1d_hpsgd."
        )
    passed_over = []
    for path in found:
        series = _read_series(path)
        if _is_training(series, loss):
            break
        passed_over.append(path)
    else:
        path, series, passed_over = found[0], _read_series(found[0]), []
    label = path.parent.parent.name if path.parent.name.startswith("version_") else path.parent.name
    return Run(label, path, series, _is_training(series, loss), passed_over)


def load_run(run_dir: Path, loss: str = "train/loss") -> tuple[str, Series]:
    """A run's label and its series: metric name → [(step, value)] in file order (see `read_run`)."""
    run = read_run(run_dir, loss)
    return run.label, run.series


def describe(run: Run) -> str:
    """The line ``hpsgd plot`` prints for a run: the file it used, and the newer ones it passed over and why."""
    line = f"hpsgd plot: {run.label}: {run.path}"
    if run.passed_over:
        newer = ", ".join(p.parent.name for p in run.passed_over)
        line += f" (newest with training metrics; passed over {newer}: no training metrics, e.g. `hpsgd test`)"
    return line


def warning_for(run: Run, run_dir: Path, loss: str) -> str | None:
    """One line when ``run`` has no training metrics, naming the folder and what to pass instead; else None."""
    if run.training:
        return None
    return (
        f"hpsgd plot: warning: {run_dir} has no training metrics ({loss}, time/wall_s or hpsgd/*) in {run.path}:"
        f" its curves stay empty. Pass the folder of a fit run (e.g. {run.path.parent.parent}) or set --loss."
    )


def wall_time_of(series: Series, steps: Sequence[int]) -> list[float]:
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


def chart_data(runs: Sequence[Run], metric: str = "val/acc", loss: str = "train/loss") -> dict[str, dict[str, Any]]:
    """The points of each chart: file name → title, axis labels and ``series`` (legend label → [[x, y], ...])."""

    def steps_and_values(points):
        return [[s, v] for s, v in points]

    accuracy: dict[str, list[list[float]]] = {}
    for run in runs:
        points = run.series.get(metric, [])
        times = wall_time_of(run.series, [s for s, _ in points])
        if points and times:
            accuracy[run.label] = [[t, v] for t, (_, v) in zip(times, points)]
    losses = {run.label: steps_and_values(run.series[loss]) for run in runs if run.series.get(loss)}
    comm: dict[str, list[list[float]]] = {}
    for run in runs:
        for key in ("hpsgd/comm_ms", "hpsgd/wait_ms"):
            if run.series.get(key):
                comm[f"{run.label}: {key[6:]}"] = steps_and_values(run.series[key])
    hidden = {r.label: steps_and_values(r.series["hpsgd/hidden"]) for r in runs if r.series.get("hpsgd/hidden")}
    return {
        "accuracy_vs_wall_time.png": {"title": f"{metric} against wall time", "x": "wall time (s)", "y": metric,
                                      "series": accuracy},
        "loss_vs_step.png": {"title": f"{loss} against step", "x": "step", "y": loss, "series": losses},
        "wait_vs_comm.png": {"title": "all-reduce time (comm) and the part training waited for", "x": "step",
                             "y": "ms per round", "series": comm, "empty": "no hpsgd/comm_ms in these runs"},
        "hidden_vs_step.png": {"title": "how much of each round's communication was hidden behind compute",
                               "x": "step", "y": "hidden fraction (1 - wait / comm)", "series": hidden,
                               "empty": "no hpsgd/hidden in these runs"},
    }  # fmt: skip


def plot_runs(run_dirs: Sequence[Path], out: Path, metric: str = "val/acc", loss: str = "train/loss") -> list[Path]:
    """Write the four charts for ``run_dirs`` and ``plot_data.json`` into ``out``; returns the PNG files written."""
    return draw_runs([read_run(Path(d), loss) for d in run_dirs], out, metric, loss)


def draw_runs(runs: Sequence[Run], out: Path, metric: str = "val/acc", loss: str = "train/loss") -> list[Path]:
    """Draw `chart_data` of ``runs`` into ``out``, and write it there as ``plot_data.json``.

    The JSON also records, per chart, the y-axis limits and whether the legend overlaps the axes (it never
    should: legends are placed below the axes).
    """
    require("matplotlib", "hpsgd plot").use("Agg")
    plt = require("matplotlib.pyplot", "hpsgd plot")

    charts = chart_data(runs, metric, loss)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, chart in charts.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in chart["series"].items():
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if name == "accuracy_vs_wall_time.png":
                ax.plot(xs, ys, marker="o", label=label)
            elif name == "wait_vs_comm.png":
                ax.plot(xs, ys, "--" if label.endswith("wait_ms") else "-", label=label)
            elif name == "hidden_vs_step.png":
                ax.plot(xs, ys, marker=".", label=label)
            else:
                ax.plot(xs, ys, label=label, alpha=0.8)
        ax.set(xlabel=chart["x"], ylabel=chart["y"], title=chart["title"])
        ax.grid(alpha=0.3)
        if name == "loss_vs_step.png" and chart["series"]:
            ax.set_yscale("log")
        if name == "hidden_vs_step.png":  # below 0 when a rank waited longer than the all-reduce took (jitter)
            lowest = min([p[1] for points in chart["series"].values() for p in points], default=0.0)
            ax.set_ylim(min(-0.05, lowest - 0.05), 1.05)
        if name == "accuracy_vs_wall_time.png":
            accuracy_axis(ax)
        if not chart["series"] and "empty" in chart:
            ax.text(0.5, 0.5, chart["empty"], ha="center", transform=ax.transAxes)
        chart["legend_overlaps_axes"] = legend_outside(fig, ax)
        chart["ylim"] = list(ax.get_ylim())
        written.append(_save(fig, out / name))
    runs_json = [{"label": r.label, "metrics_csv": str(r.path), "training_metrics": r.training,
                  "passed_over": [str(p) for p in r.passed_over]} for r in runs]  # fmt: skip
    (out / "plot_data.json").write_text(json.dumps({"runs": runs_json, "charts": charts}, indent=1))
    return written


def accuracy_axis(ax, always: bool = False) -> None:
    """Keep an accuracy axis at or below 1.0: the top margin matplotlib adds would show values no run can reach.

    Args:
        ax: the axes.
        always: clip at 1.0 whatever is drawn (an error bar may reach past 1). By default only when every line's
            value lies in [0, 1], so a metric that is not a fraction (a loss, chosen with ``--metric``) keeps its
            axis.
    """
    values = [y for line in ax.get_lines() for y in line.get_ydata()]
    if always or (values and all(0.0 <= y <= 1.0 for y in values)):
        low, high = ax.get_ylim()
        ax.set_ylim(low, min(high, 1.0))
        for line in ax.get_lines():  # a point or line at exactly 1.0 is drawn whole on the top edge, not halved
            if all(y <= 1.0 for y in line.get_ydata()):
                line.set_clip_on(False)


def legend_outside(fig, ax, ncol: int = 2, fontsize: float = 8) -> bool:
    """The legend of ``ax`` below the axes (never over the data); returns whether it overlaps the axes.

    Saved with ``bbox_inches="tight"``, so the figure grows to hold it.
    """
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return False
    legend = ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(ncol, len(handles)),
                       fontsize=fontsize, frameon=False)  # fmt: skip
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    return bool(legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
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
        runs = [read_run(run_dir, parsed.loss) for run_dir in parsed.runs]
    except FileNotFoundError as err:
        parser.exit(2, f"hpsgd plot: error: {err}\n")  # a user error: one line, no traceback
    for run, run_dir in zip(runs, parsed.runs):
        print(describe(run))
        warning = warning_for(run, run_dir, parsed.loss)
        if warning:
            print(warning, file=sys.stderr)
    try:
        written = draw_runs(runs, parsed.out, parsed.metric, parsed.loss)
    except MissingExtraError as err:
        parser.exit(2, f"hpsgd plot: error: {err}\n")
    for path in written:
        print(path)
