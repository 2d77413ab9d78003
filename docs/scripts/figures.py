"""Draw the overview's figures: ``python docs/scripts/figures.py [OUT_DIR]`` (``make docs`` runs it).

* ``timeline.png``: one worker under DDP and under HPSGD, compute and communication side by side, for a link where
  one all-reduce takes as long as one step of compute.
* ``replica_global.png``: the replica ``R``, the global model ``G`` and a round's average change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

COMPUTE, COMM, WAIT = "#4C72B0", "#DD8452", "#D9D9D9"


def timeline(path: Path, steps: int = 4, compute: float = 1.0, comm: float = 1.0) -> None:
    """Gantt rows: DDP waits for each all-reduce; HPSGD runs the next step while the previous all-reduce travels."""
    # Drawn at the width the page shows it (about 760 px), so the labels are read at their own size.
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rows = {"DDP: compute": 3.0, "DDP: network": 2.4, "HPSGD: compute": 1.2, "HPSGD: network": 0.6}
    t = 0.0
    for _ in range(steps):  # DDP: backward's all-reduce must finish before the optimizer step
        ax.broken_barh([(t, compute)], (rows["DDP: compute"], 0.45), color=COMPUTE, edgecolor="white")
        ax.broken_barh([(t + compute, comm)], (rows["DDP: network"], 0.45), color=COMM, edgecolor="white")
        ax.broken_barh([(t + compute, comm)], (rows["DDP: compute"], 0.45), color=WAIT)
        t += compute + comm
    ddp_end = t
    t = 0.0
    for _ in range(steps):  # HPSGD (H = 1): launch at the sync point, merge at the next one
        ax.broken_barh([(t, compute)], (rows["HPSGD: compute"], 0.45), color=COMPUTE, edgecolor="white")
        ax.broken_barh([(t + compute, comm)], (rows["HPSGD: network"], 0.45), color=COMM, edgecolor="white")
        t += compute
    hpsgd_end = t + comm  # the last round is merged by the flush
    ax.broken_barh([(t, comm)], (rows["HPSGD: compute"], 0.45), color=WAIT)
    ax.set_yticks([v + 0.22 for v in rows.values()], list(rows))
    ax.set_xlabel("time (one step of compute = 1; one all-reduce = 1)")
    ax.set_xlim(0, ddp_end + 0.2)
    ax.axvline(ddp_end, color=COMPUTE, ls=":", lw=1)
    ax.axvline(hpsgd_end, color=COMPUTE, ls=":", lw=1)
    ax.set_ylim(0.4, 3.95)
    ax.text(ddp_end - 0.05, 3.55, f"DDP: {steps} steps", ha="right", fontsize=9)
    ax.text(hpsgd_end + 0.1, 1.05, f"HPSGD: {steps} steps\n(the last round\nis merged by the flush)", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (COMPUTE, COMM, WAIT)]
    ax.legend(handles, ["compute", "all-reduce on the network", "waiting"], loc="upper center",
              bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)  # fmt: skip
    ax.set_title("One worker, communication as slow as compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replica_global(path: Path) -> None:
    """Two replicas start from G, each takes its own steps (Δ), and G moves by their mean."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    g = (0.0, 0.0)
    deltas = [(1.6, 1.0), (1.4, -0.6)]
    mean = (sum(d[0] for d in deltas) / 2, sum(d[1] for d in deltas) / 2)
    ax.scatter(*g, s=80, color="black", zorder=3)
    ax.annotate("G (and S): every worker's start", g, xytext=(-0.1, -0.45), ha="left", fontsize=9)
    for i, (d, color) in enumerate(zip(deltas, (COMPUTE, "#55A868"))):
        ax.add_patch(FancyArrowPatch(g, d, arrowstyle="->", mutation_scale=14, color=color, lw=1.8))
        ax.annotate(f"R of worker {i}: S + Δ{i}", d, xytext=(d[0] + 0.05, d[1] + 0.1), fontsize=9, color=color)
    ax.add_patch(FancyArrowPatch(g, mean, arrowstyle="->", mutation_scale=14, color=COMM, lw=2.2, ls="--"))
    label = "G + mean(Δ): the next G,\nmerged while the next steps run"
    ax.annotate(label, mean, xytext=(mean[0] + 0.1, mean[1] - 0.55), fontsize=9, color=COMM)
    ax.set_xlim(-0.4, 2.9)
    ax.set_ylim(-1.1, 1.5)
    ax.axis("off")
    ax.set_title("Replica R, global model G, and one round's average change")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "img")
    out.mkdir(parents=True, exist_ok=True)
    timeline(out / "timeline.png")
    replica_global(out / "replica_global.png")


if __name__ == "__main__":
    main()
