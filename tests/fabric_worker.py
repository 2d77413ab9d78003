"""One rank of a Fabric test run: a plain Fabric loop, as Fabric's docs write it, with ``HPSGDStrategy``.

Started by :mod:`tests.launch` through :mod:`tests.worker` (scenario ``"fabric"``). ``args["runs"]`` lists loops
that run one after another in the same processes (each with its own Fabric and engine); each run's record is
returned under the same index.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_hpsgd.fabric import HPSGDStrategy
from tests.models import build_net, make_batches

LR, MOMENTUM = 0.05, 0.9


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def make_fabric(args: dict[str, Any], launch: bool = True) -> L.Fabric:
    strategy: Any = args.get("strategy_name")
    if strategy is None:
        options = {"sync_every": args.get("sync_every", 1), "merge": args.get("merge", "replica"),
                   "iteration_end": args.get("iteration_end", "auto"), "timeout": args.get("timeout_s", 60),
                   **args.get("strategy_args", {})}  # fmt: skip
        strategy = HPSGDStrategy(**options)
    fabric = L.Fabric(accelerator="cpu", devices=int(os.environ.get("HPSGD_TEST_DEVICES", 1)),
                      num_nodes=int(os.environ.get("HPSGD_TEST_NODES", 1)), strategy=strategy,
                      precision=args.get("precision", "32-true"))  # fmt: skip
    if launch:
        fabric.launch()
    return fabric


def run_regression(fabric: L.Fabric, args: dict[str, Any], outdir: Path) -> dict[str, Any]:
    """The regression loop of the reference tests: one optimizer, or two over the two layers (``"split"``)."""
    rank = fabric.global_rank
    num = args.get("num_batches", 7)
    seed = 100 + rank if args.get("per_rank_data", True) else 100
    extra = args.get("extra_steps_on_rank1", 0) if rank == 1 else 0  # uneven data: the ranks fall out of step
    batches = make_batches(num + extra, 8, seed=seed)
    net = build_net(hidden=8 if args.get("hidden_on_rank1") and rank == 1 else 16)
    if args.get("optimizers") == "split":
        opts = [sgd(net[0].parameters()), sgd(net[2].parameters())]
    else:
        opts = [sgd(net.parameters())]
    if args.get("zero_optimizer"):  # a sharded optimizer: refused at setup
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opts = [ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.SGD, lr=LR)]
    model, *opts = fabric.setup(net, *opts)
    start = 0
    if args.get("resume"):
        state = {"model": model, **{f"optimizer{i}": opt for i, opt in enumerate(opts)}, "iteration": 0}
        fabric.load(args["resume"], state)
        start = state["iteration"]
    record: dict[str, Any] = {"start": start, "steps_after_load": fabric.strategy.steps, "stopped_at": None}
    if opts:
        record["momentum_at_start"] = [
            {i: s["momentum_buffer"].clone() for i, s in opt.optimizer.state_dict()["state"].items()} for opt in opts
        ]
    for i in range(start, args.get("stop_after", num) + extra):
        x, y = batches[i]
        if args.get("nan_at") == i + 1 and rank == 1:
            with torch.no_grad():
                net[0].weight[0, 0] = float("nan")
        if args.get("exit_at") == i + 1 and rank == 1:
            os._exit(17)
        if args.get("sigterm_at") == i + 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        for opt in opts:
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        for opt in opts:
            opt.step()
        if i + 1 in args.get("save_at", ()):
            state = {"model": model, **{f"optimizer{i}": opt for i, opt in enumerate(opts)}, "iteration": i + 1}
            fabric.save(outdir / f"ckpt_{i + 1}.pt", state)
        if fabric.strategy.should_stop and not args.get("ignore_stop"):
            record["stopped_at"] = i + 1
            fabric.save(outdir / "stopped.pt", {"model": model, "iteration": i + 1})
            break
    if args.get("launch_function"):
        record["net"] = net  # no flush here: fabric.launch(fn) flushes when fn returns
        return record
    fabric.strategy.flush("end of the loop")
    record["final"] = snapshot(net)
    if args.get("save_final"):
        fabric.save(outdir / f"final_rank{rank}.pt", {"model": model, "iteration": args.get("stop_after", num)})
    return record


def run_gan(fabric: L.Fabric, args: dict[str, Any], outdir: Path) -> dict[str, Any]:
    """A DCGAN-shaped loop (Fabric's GAN example): the generator's graph is built before the discriminator's step
    and runs backward after it, so no sync point may fall between the two ``step()`` calls."""
    rank = fabric.global_rank
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))
    discriminator = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    generator, opt_g = fabric.setup(generator, sgd(generator.parameters()))
    discriminator, opt_d = fabric.setup(discriminator, sgd(discriminator.parameters()))
    batches = make_batches(args.get("num_batches", 5), 8, seed=100 + rank)
    noise = torch.Generator().manual_seed(7 + rank)
    for real, _ in batches:
        fake = generator(torch.randn(8, 4, generator=noise))
        opt_d.zero_grad()
        d_loss = nn.functional.softplus(-discriminator(real)).mean()
        d_loss = d_loss + nn.functional.softplus(discriminator(fake.detach())).mean()
        fabric.backward(d_loss)
        opt_d.step()
        if args.get("end_between"):
            fabric.strategy.end_iteration()  # a round boundary inside the iteration: the wrong place
        opt_g.zero_grad()
        fabric.backward(nn.functional.softplus(-discriminator(fake)).mean())
        opt_g.step()
        if args.get("end_between"):
            fabric.strategy.end_iteration()
    fabric.strategy.flush("end of the loop")
    return {"generator": snapshot(generator), "discriminator": snapshot(discriminator),
            "steps": fabric.strategy.steps, "rounds": fabric.strategy.stats.rounds}  # fmt: skip


def scenario_fabric(outdir: Path, args: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    records = []
    rank = 0
    for i, run in enumerate(args.get("runs", [args])):
        run_dir = outdir / f"run{i}"
        run_dir.mkdir(exist_ok=True)
        loop = run_gan if run.get("loop") == "gan" else run_regression
        if run.get("launch_function"):  # the loop as the function fabric.launch runs
            fabric = make_fabric(run, launch=False)
            record = fabric.launch(loop, run, run_dir)
            record.update(final=snapshot(record.pop("net")), needs_flush=fabric.strategy.engine.needs_flush)
        else:
            fabric = make_fabric(run)
            record = loop(fabric, run, run_dir)
        rank = fabric.global_rank
        stats = fabric.strategy.stats
        record.update(steps=fabric.strategy.steps, stats=stats.to_dict() if stats else None,
                      metrics=fabric.strategy.metrics())  # fmt: skip
        fabric.strategy.teardown()
        records.append(record)
    return {"rank": rank, "runs": records}
