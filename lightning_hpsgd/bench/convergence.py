"""Accuracy at equal optimizer steps, 2 to 8 workers, two tasks: ``python -m lightning_hpsgd.bench convergence``.

What it answers: how much accuracy each method loses as ``sync_every`` (``H``) grows, with a fixed batch per
worker and the same number of optimizer steps for every method. Time does not matter here, only steps, so the ``W``
workers may share few cores.

* **Workers.** ``W`` real processes on one gloo process group (loopback), started once per ``W``; each runs every
  job of the study in turn, so Python and torch start only once. Every worker draws its batches from its own shard
  of the training set (a new seeded permutation per epoch, as Lightning's ``DistributedSampler`` does).
* **The training loop** is plain PyTorch around the recipe's own model, loss, optimizer and schedule (fitted to the
  budget): the algorithm under test is the same [`HPSGDEngine`][lightning_hpsgd.engine.HPSGDEngine] the
  strategy drives (``on_optimizer_step`` after every step, ``flush`` at the end), DDP is
  ``DistributedDataParallel``, and post-local SGD is PyTorch's own (``post_localSGD_hook``,
  ``PostLocalSGDOptimizer`` with ``PeriodicModelAverager``), as in [`PostLocalSGDStrategy`][].
* **Methods.** ``ddp``; and ``localsgd``, ``hpsgd``, ``hpsgd_stale`` and ``hpsgd_outer`` (HPSGD with the outer
  optimizer, merged at the next sync point: ``τ = H``) at each ``H``. With the outer optimizer too, at each
  ``H``: ``diloco`` (``τ = 0``, a blocking average: DiLoCo), ``hpsgd_delay`` (each ``τ`` of ``--delays`` below
  ``H``) and ``hpsgd_fragments`` (each ``F`` of ``--fragments``, with the smallest ``τ`` that hides a link of
  ``--link-ratio`` steps per full all-reduce: ``⌈1.25 · ratio / F⌉``, at most ``H``). Post-local SGD's models are
  averaged once more after the last step, so that every method is evaluated on one model.
* **Measures.** Validation accuracy of the final model, and the final training loss (the mean over the last tenth
  of the steps and over the workers); mean ± standard deviation over the seeds.
* **Output.** ``results.jsonl`` (one line per run; a rerun with the same ``--out`` skips the runs already there),
  ``convergence.md`` (a table per task), ``convergence_<task>.png`` (accuracy against ``H`` for each ``W``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from lightning_hpsgd.extras import require

FAMILIES = ("localsgd", "hpsgd", "hpsgd_stale", "hpsgd_outer", "diloco", "hpsgd_delay", "hpsgd_fragments")
OUTER_FAMILIES = ("hpsgd_outer", "diloco", "hpsgd_delay", "hpsgd_fragments")
# Steps per budget ("short", "long"). MNIST-1D: where large H costs most, and where it costs little. Reverse: the
# task is solved once attention finds the mirrored position; at 8 workers DDP finds it within 200 steps and
# HPSGD at H = 16 within 300, so 200 separates the methods and 400 shows whether each gets there.
BUDGETS = {"mnist1d": (300, 1000), "reverse": (200, 400)}
LOCALSGD_WARMUP = 8  # steps of DDP before post-local SGD's local steps (as in the step-time benchmark)


@dataclass
class StudyConfig:
    """What ``python -m lightning_hpsgd.bench convergence`` runs (its command-line options)."""

    workers: tuple[int, ...] = (2, 4, 8)
    seeds: int = 3
    tasks: tuple[str, ...] = ("mnist1d", "reverse")
    sync_every: tuple[int, ...] = (1, 4, 16)
    families: tuple[str, ...] = ("ddp", *FAMILIES)
    budgets: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(BUDGETS))
    # The best of a sweep at W = 8, H = 16, MNIST-1D, 300 steps, one seed (docs/benchmarks.md).
    outer_lr: float = 0.8
    outer_momentum: float = 0.6
    delays: tuple[int, ...] = (1, 2, 4)
    fragments: tuple[int, ...] = (2, 4)
    link_ratio: float = 4.0  # full all-reduce time / step time that hpsgd_fragments' delay must hide
    batch_size: int = 32
    data_dir: str = "data/mnist1d"
    out: str = "convergence_results"
    timeout_s: float = 600.0

    @classmethod
    def quick(cls, out: str, data_dir: str) -> StudyConfig:
        """A smoke run: 2 workers, one seed, every family at H = 4 (one delay, one fragment count), 24 steps."""
        return cls(workers=(2,), seeds=1, sync_every=(4,), budgets={"mnist1d": (24,), "reverse": (24,)}, out=out,
                   data_dir=data_dir, delays=(1,), fragments=(2,))  # fmt: skip


Method = tuple[str, int | None, int | None, int]  # family, H, sync_delay (None: H), fragments


def methods(config: StudyConfig) -> list[Method]:
    """Every method: ``("ddp", None, None, 1)``, then each family at each ``H`` (with its delays and fragments)."""
    out: list[Method] = [("ddp", None, None, 1)] if "ddp" in config.families else []
    for family in (f for f in FAMILIES if f in config.families):
        for h in config.sync_every:
            if family == "diloco":
                out.append((family, h, 0, 1))
            elif family == "hpsgd_delay":
                out += [(family, h, tau, 1) for tau in config.delays if tau < h]
            elif family == "hpsgd_fragments":
                out += [(family, h, min(h, math.ceil(1.25 * config.link_ratio / f)), f) for f in config.fragments
                        if 1 < f <= h]  # fmt: skip
            else:
                out.append((family, h, None, 1))
    return out


def method_name(family: str, h: int | None, tau: int | None = None, fragments: int = 1) -> str:
    if h is None:
        return family
    return (
        f"{family} H={h}"
        + (f" τ={tau}" if family in ("hpsgd_delay", "hpsgd_fragments") else "")
        + (f" F={fragments}" if fragments > 1 else "")
    )


def jobs(config: StudyConfig, workers: int) -> list[dict[str, Any]]:
    out = []
    for task in config.tasks:
        for budget, steps in zip(("short", "long"), config.budgets[task]):
            for seed in range(config.seeds):
                for family, h, tau, fragments in methods(config):
                    out.append({"task": task, "budget": budget, "steps": steps, "seed": seed, "family": family,
                                "sync_every": h, "sync_delay": tau, "fragments": fragments,
                                "workers": workers})  # fmt: skip
    return out


def _key(job: dict[str, Any]) -> tuple:
    return (job["task"], job["budget"], job["steps"], job["seed"], job["family"], job["sync_every"], job["workers"],
            job.get("sync_delay"), job.get("fragments", 1))  # fmt: skip


def _method(job: dict[str, Any]) -> Method:
    return job["family"], job["sync_every"], job.get("sync_delay"), job.get("fragments", 1)


# ---------------------------------------------------------------------------------------------------- the workers


class _Task:
    """A recipe's model, data and loss, outside Lightning."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name = name
        if name == "mnist1d":
            from lightning_hpsgd.recipes import MNIST1DDataModule

            data = MNIST1DDataModule(data_dir=config["data_dir"])
            if int(os.environ["RANK"]) == 0:
                data.prepare_data()
            torch.distributed.barrier()
            data.setup("fit")
            self.train, self.val = data.train_set.tensors, data.test_set.tensors
        elif name == "reverse":
            from lightning_hpsgd.recipes import ReverseDataModule

            data = ReverseDataModule()
            data.setup("fit")
            self.train, self.val = data.train_set.tensors, data.val_set.tensors
        else:
            raise ValueError(f"Unknown task {name!r}; choose from {list(BUDGETS)}.")

    def model(self) -> torch.nn.Module:
        from lightning_hpsgd.recipes import MNIST1DClassifier, ReverseTransformer

        return MNIST1DClassifier(channels=64) if self.name == "mnist1d" else ReverseTransformer()

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())

    def batches(self, rank: int, world: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """This rank's batches: every epoch a seeded permutation, split into ``world`` shards (no overlap)."""
        x, y = self.train
        epoch = 0
        while True:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            shard = order[rank::world]
            for i in range(0, len(shard) - batch_size + 1, batch_size):
                index = shard[i : i + batch_size]
                yield x[index], y[index]
            epoch += 1

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module) -> float:
        model.eval()
        x, y = self.val
        correct = sum(int((model(x[i : i + 500]).argmax(-1) == y[i : i + 500]).sum()) for i in range(0, len(x), 500))
        model.train()
        return correct / y.numel()


def run_job(job: dict[str, Any], task: _Task, config: dict[str, Any], groups: dict[str, Any]) -> dict[str, Any]:
    """One training run on this rank; returns its figures (every rank returns the same accuracy)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from lightning_hpsgd.engine import HPSGDEngine
    from lightning_hpsgd.tensor_utils import checksums, differs_across_ranks

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1000 + job["seed"])  # the same initial model everywhere (DDP and HPSGD broadcast it anyway)
    model = task.model()
    schedule = model.optimizer_config(job["steps"])
    optimizer, scheduler = schedule["optimizer"], schedule["lr_scheduler"]["scheduler"]
    family, h = job["family"], job["sync_every"]
    forward: torch.nn.Module = model
    engine = None
    if family in ("ddp", "localsgd"):
        forward = DistributedDataParallel(model)
        if family == "localsgd":
            state = PostLocalSGDState(process_group=None, subgroup=groups["single"],
                                      start_localSGD_iter=LOCALSGD_WARMUP)  # fmt: skip
            forward.register_comm_hook(state, post_localSGD_hook)
            optimizer = PostLocalSGDOptimizer(optimizer, PeriodicModelAverager(period=h, warmup_steps=LOCALSGD_WARMUP))
    else:
        tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers()}
        averaged = [n for n, p in model.named_parameters() if p.requires_grad]
        averaged += [n for n, b in model.named_buffers() if b.is_floating_point()]
        outer = {"outer_lr": config["outer_lr"], "outer_momentum": config["outer_momentum"]}
        engine = HPSGDEngine(tensors, averaged, group=groups["hpsgd"], sync_every=h,
                             merge="stale" if family == "hpsgd_stale" else "replica",
                             sync_delay=job.get("sync_delay"), fragments=job.get("fragments", 1),
                             **(outer if family in OUTER_FAMILIES else {}))  # fmt: skip
    losses = []
    batches = task.batches(rank, world, config["batch_size"], job["seed"])
    started = time.perf_counter()
    for step in range(1, job["steps"] + 1):
        x, y = next(batches)
        loss = task.loss(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if engine is not None:
            engine.on_optimizer_step(step)
        losses.append(loss.item())
    if engine is not None:
        engine.flush(job["steps"])
    elif family == "localsgd":  # one last average, so that every method is evaluated on one model
        with torch.no_grad():
            for p in model.parameters():
                dist.all_reduce(p)
                p.div_(world)
    identical = not any(differs_across_ranks(checksums(list(model.parameters()))))
    tail = losses[-max(1, len(losses) // 10) :]
    final_loss = torch.tensor(sum(tail) / len(tail), dtype=torch.float64)
    dist.all_reduce(final_loss)
    return {**job, "val_acc": task.accuracy(model), "train_loss": float(final_loss) / world, "identical": identical,
            "seconds": time.perf_counter() - started}  # fmt: skip


def worker_main(jobs_file: str, results_file: str) -> None:
    """One rank: run every job of ``jobs_file`` in order; rank 0 appends each result to ``results_file``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    spec = json.loads(Path(jobs_file).read_text())
    config = spec["config"]
    dist.init_process_group("gloo", timeout=timedelta(seconds=config["timeout_s"]))
    rank = dist.get_rank()
    groups = {"hpsgd": dist.new_group(), "single": dist.new_subgroups(group_size=1)[0]}
    tasks: dict[str, _Task] = {}
    for job in spec["jobs"]:
        if job["task"] not in tasks:
            tasks[job["task"]] = _Task(job["task"], config)
        result = run_job(job, tasks[job["task"]], config, groups)
        if rank == 0:
            with open(results_file, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"W={job['workers']} {job['task']:<8} {job['budget']:<5} seed {job['seed']}"
                  f" {method_name(*_method(job)):<15} val_acc {result['val_acc']:.4f}"
                  f"  loss {result['train_loss']:.4f}  {result['seconds']:.1f} s", flush=True)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    # Every result is written. Post-local SGD's comm hook can abort the interpreter's teardown now and then
    # ("terminate called without an active exception"); nothing is left to clean up.
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------- orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_study(config: StudyConfig, log: Any = print) -> list[dict[str, Any]]:
    """Run every job not already in ``results.jsonl``, then write the report; returns every result."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = {_key(r) for r in _read(results_file)}
    for workers in config.workers:
        todo = [job for job in jobs(config, workers) if _key(job) not in done]
        if not todo:
            continue
        log(f"{len(todo)} runs on {workers} workers")
        jobs_file = out / f"jobs_w{workers}.json"
        jobs_file.write_text(json.dumps({"config": asdict(config), "jobs": todo}))
        port = _free_port()
        procs = []
        for rank in range(workers):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       WORLD_SIZE=str(workers), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # fmt: skip
            cmd = [sys.executable, "-m", "lightning_hpsgd.bench.convergence", "--worker", str(jobs_file),
                   str(results_file)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env, stdout=None if rank == 0 else subprocess.DEVNULL))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"Convergence study on {workers} workers: exit codes {codes}; see the output above.")
    results = [r for r in _read(results_file) if _key(r) in {_key(j) for w in config.workers for j in jobs(config, w)}]
    write_report(config, results, out)
    return results


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(results: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, float]]:
    """Mean and standard deviation over seeds of accuracy and loss, per (task, budget, W, method)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["budget"], r["workers"], *_method(r)), []).append(r)
    out = {}
    for key, runs in groups.items():
        acc = [r["val_acc"] for r in runs]
        loss = [r["train_loss"] for r in runs]
        out[key] = {"acc": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "loss": statistics.mean(loss), "loss_std": statistics.stdev(loss) if len(loss) > 1 else 0.0,
                    "seeds": len(runs)}  # fmt: skip
    return out


def goal_lines(config: StudyConfig, table: dict[tuple, dict[str, float]]) -> list[str]:
    """At the largest W and H, short budget: DDP, post-local SGD, the merge at the next sync point (``τ = H``),
    blocking DiLoCo (``τ = 0``) and the setting that hides the link with the most fragments."""
    w, h = max(config.workers), max(config.sync_every)
    fitted = [m for m in methods(config) if m[0] == "hpsgd_fragments" and m[1] == h]
    candidates = [
        ("DDP", ("ddp", None, None, 1)),
        ("post-local SGD", ("localsgd", h, None, 1)),
        (f"HPSGD τ = H = {h}", ("hpsgd_outer", h, None, 1)),
        ("DiLoCo (τ = 0)", ("diloco", h, 0, 1)),
    ]
    if fitted:
        f, tau = fitted[-1][3], fitted[-1][2]
        candidates.append((f"HPSGD F = {f}, τ = {tau}", fitted[-1]))  # fmt: skip
    lines = []
    for task in config.tasks:
        found = [(label, table.get((task, "short", w, *m))) for label, m in candidates]
        if not found[0][1]:
            continue
        ddp = found[0][1]["acc"]
        parts = [f"{label} {s['acc']:.3f}" + (f" ({100 * (s['acc'] - ddp):+.1f})" if label != "DDP" else "")
                 for label, s in found if s]  # fmt: skip
        lines.append(f"- **{task}**, W = {w}, H = {h}, short budget: " + ", ".join(parts) + ".")
    return lines


def markdown(config: StudyConfig, results: Sequence[dict[str, Any]]) -> str:
    table = summarize(results)
    budgets = ("short", "long")
    lines = ["# Convergence at equal steps", "",
             f"Per-worker batch {config.batch_size}; {config.seeds} seeds; outer optimizer: outer_lr"
             f" {config.outer_lr}, outer_momentum {config.outer_momentum}, Nesterov. Mean ± standard deviation over"
             " the seeds.", ""]  # fmt: skip
    lines += goal_lines(config, table) + [""]
    for task in config.tasks:
        steps = dict(zip(budgets, config.budgets[task]))
        columns = [(b, w) for b in budgets[: len(config.budgets[task])] for w in config.workers]
        header = " | ".join(f"W={w}, {steps[b]} steps" for b, w in columns)
        for measure, title in (("acc", "validation accuracy"), ("loss", "final training loss")):
            lines += [f"## {task}: {title}", "", f"| method | {header} |", "|---" * (len(columns) + 1) + "|"]
            for method in methods(config):
                cells = []
                for b, w in columns:
                    s = table.get((task, b, w, *method))
                    cells.append("–" if s is None else f"{s[measure]:.4f} ± {s[measure + '_std']:.4f}")
                if any(c != "–" for c in cells):
                    lines.append(f"| {method_name(*method)} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(config: StudyConfig, results: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """``convergence_<task>.png``: accuracy against H, one panel per (budget, W); DDP as a dashed line."""
    return plot_table(config, summarize(results), out)


def plot_table(config: StudyConfig, table: dict[tuple, dict[str, float]], out: Path) -> list[Path]:
    """``plot`` from a summary table (what ``summarize`` returns; only ``acc`` and ``acc_std`` are read):
    ``convergence_<task>.png`` in ``out`` for each task of ``config``; the docs redraw the Benchmarks page's charts
    from its own tables with it (``docs/scripts/convergence_figures.py``)."""
    paths = []
    for task in config.tasks:
        fig = figure(config, table, task)  # selects the Agg backend before pyplot is imported
        plt = require("matplotlib.pyplot", "The convergence study's charts")
        path = out / f"convergence_{task}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def figure(config: StudyConfig, table: dict[tuple, dict[str, float]], task: str) -> Any:
    """One task's chart, not saved: accuracy against H, one panel per (budget, W); DDP as a dashed line; the legend
    below the panels. Returns the matplotlib ``Figure``."""
    require("matplotlib", "The convergence study's charts").use("Agg")
    plt = require("matplotlib.pyplot", "The convergence study's charts")

    from lightning_hpsgd.plot import accuracy_axis

    budgets = list(zip(("short", "long"), config.budgets[task]))
    fig, axes = plt.subplots(len(budgets), len(config.workers), figsize=(7, 2.6 * len(budgets) + 0.6),
                             squeeze=False, sharey="row")  # fmt: skip
    for row, (budget, steps) in enumerate(budgets):
        for col, w in enumerate(config.workers):
            ax = axes[row][col]
            series: dict[str, list[tuple[int, dict[str, float]]]] = {}
            for method in methods(config):  # one line per method apart from H
                found = table.get((task, budget, w, *method))
                if method[1] is not None and found is not None:
                    label = method_name(*method).replace(f" H={method[1]}", "")
                    series.setdefault(label, []).append((method[1], found))
            for label, points in series.items():
                ax.errorbar([h for h, _ in points], [s["acc"] for _, s in points],
                            yerr=[s["acc_std"] for _, s in points], marker="o", capsize=3, label=label)  # fmt: skip
            ddp = table.get((task, budget, w, "ddp", None, None, 1))
            if ddp:
                ax.axhline(ddp["acc"], color="black", linestyle="--", label="ddp")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(config.sync_every), [str(h) for h in config.sync_every])
            ax.set_title(f"W={w}, {steps} steps", fontsize=9)
            if row == len(budgets) - 1:
                ax.set_xlabel("sync_every (H)")
            if col == 0:
                ax.set_ylabel("val accuracy")
    for ax in axes[:, 0]:  # the first panel of each row sets the row's shared axis
        accuracy_axis(ax, always=True)
    fig.suptitle(f"{task}: accuracy at equal steps")
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    # Below every panel, never over a curve: the figure grows to hold it (bbox_inches="tight").
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(handles) or 1),
               fontsize=7, frameon=False)  # fmt: skip
    return fig


def write_report(config: StudyConfig, results: Sequence[dict[str, Any]], out: Path) -> None:
    (out / "convergence.md").write_text(markdown(config, results))
    plot(config, results, out)


def main(args: Sequence[str]) -> None:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hpsgd.bench convergence",
        description="Accuracy at equal optimizer steps for DDP, post-local SGD and HPSGD (plain, stale, with the"
        " outer optimizer) at several sync_every, on 2 to 8 worker processes and two tasks (MNIST-1D's CNN and a"
        " small transformer reversing digit sequences). Writes results.jsonl, convergence.md and one PNG per task"
        " to --out; a rerun skips the runs already in results.jsonl.",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=list(defaults.workers))
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--tasks", nargs="+", default=list(defaults.tasks), choices=list(BUDGETS))
    parser.add_argument("--sync-every", type=int, nargs="+", default=list(defaults.sync_every))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(defaults.families),
        choices=list(defaults.families),
        help="which methods to run (default: all)",
    )
    parser.add_argument("--delays", type=int, nargs="+", default=list(defaults.delays),
                        help="hpsgd_delay's sync_delay values (each below H; default %(default)s)")  # fmt: skip
    parser.add_argument("--fragments", type=int, nargs="+", default=list(defaults.fragments),
                        help="hpsgd_fragments' fragment counts (default %(default)s)")  # fmt: skip
    parser.add_argument(
        "--link-ratio",
        type=float,
        default=defaults.link_ratio,
        help="full all-reduce time over step time that hpsgd_fragments' delay hides (default 4)",
    )
    parser.add_argument("--outer-lr", type=float, default=defaults.outer_lr)
    parser.add_argument("--outer-momentum", type=float, default=defaults.outer_momentum)
    parser.add_argument("--short", type=int, help="steps of the short budget (default: 300 MNIST-1D, 200 reverse)")
    parser.add_argument("--long", type=int, help="steps of the long budget (default: 1000 MNIST-1D, 400 reverse;"
                        " 0: none)")  # fmt: skip
    parser.add_argument("--data-dir", default=defaults.data_dir)
    parser.add_argument("--out", default=defaults.out, help="report directory (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 workers, 1 seed, H=4, 24 steps")
    options = parser.parse_args(args)
    if options.quick:
        config = StudyConfig.quick(options.out, options.data_dir)
    else:
        budgets = {}
        for task, (short, long) in BUDGETS.items():
            long = long if options.long is None else options.long
            budgets[task] = (options.short or short, long) if long else (options.short or short,)
        config = StudyConfig(
            workers=tuple(options.workers),
            seeds=options.seeds,
            tasks=tuple(options.tasks),
            sync_every=tuple(options.sync_every),
            families=tuple(options.methods),
            budgets=budgets,
            outer_lr=options.outer_lr,
            outer_momentum=options.outer_momentum,
            delays=tuple(options.delays),
            fragments=tuple(options.fragments),
            link_ratio=options.link_ratio,
            data_dir=options.data_dir,
            out=options.out,
        )
    if min(config.workers) < 1 or config.seeds < 1 or min(config.sync_every) < 1:
        parser.error("--workers, --seeds and --sync-every must be >= 1")
    started = time.perf_counter()
    run_study(config)
    print(f"wrote {Path(config.out) / 'convergence.md'} ({(time.perf_counter() - started) / 60:.1f} min)")
    print((Path(config.out) / "convergence.md").read_text())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1:])
