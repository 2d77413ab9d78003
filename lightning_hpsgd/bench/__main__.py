"""``python -m lightning_hpsgd.bench``: the project's benchmarks, printed as ratios measured side by side.

* ``python -m lightning_hpsgd.bench [options]``: HPSGD against DDP, post-local SGD and the compute-only limit over
  a real throttled link ([`lightning_hpsgd.bench.compare`][]); ``make bench`` runs it.
* ``python -m lightning_hpsgd.bench overlap``: the engine alone, wait per round over all-reduce time.
* ``python -m lightning_hpsgd.bench monitor``: HPSGD's step time with ``HPSGDMonitor`` on against off.
* ``python -m lightning_hpsgd.bench gpu``: compute-only, DDP and HPSGD (H=1, H=4) on this machine's GPUs
  ([`lightning_hpsgd.bench.gpu`][]).
* ``python -m lightning_hpsgd.bench checksum``: the post-flush checksum against a plain sum of the same tensors
  ([`lightning_hpsgd.bench.checksum`][]).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_hpsgd.bench.worker import STRATEGIES


def overlap_main(args: Sequence[str]) -> None:
    from lightning_hpsgd.bench.overlap import measure_overlap, report

    parser = argparse.ArgumentParser(
        prog="python -m lightning_hpsgd.bench overlap",
        description="Wait per round over all-reduce time (0 = communication fully hidden), gloo on loopback.",
    )
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512, help="MLP width; parameters grow as 2*hidden^2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    options = parser.parse_args(args)
    result = measure_overlap(
        world_size=options.world_size, hidden=options.hidden, rounds=options.rounds, batch=options.batch
    )
    print("HPSGD overlap benchmark (gloo on loopback, CPU, sync_every=1)")
    print(report(result))


def compare_main(args: Sequence[str]) -> None:
    from lightning_hpsgd.bench.compare import BenchConfig, run_benchmark

    defaults = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hpsgd.bench",
        description="HPSGD against DDP, post-local SGD and the compute-only limit, each worker in its own network"
        " namespace behind a rate-limited link (needs root and iproute2; otherwise loopback, with a warning)."
        " Writes bench.json, bench.md and bench.png to --out. Other benchmarks, named by the first argument:"
        " 'overlap' (the engine alone), 'monitor' (HPSGDMonitor's cost), 'gpu' (CUDA/NCCL), 'convergence'"
        " (accuracy at equal steps, 2 to 8 workers) and 'checksum' (the post-flush check's cost); each has its own"
        " --help.",
    )
    parser.add_argument("--workers", type=int, default=defaults.workers, help="worker processes (default %(default)s)")
    parser.add_argument("--nodes", type=int, help="simulated nodes, one namespace each, with workers / nodes"
                        " workers inside (unthrottled) and throttled links between them (default: one worker per"
                        " node); compare hpsgd_node and hpsgd_node_h4 (hierarchy='node') with the flat"
                        " strategies")  # fmt: skip
    parser.add_argument("--comm-ratio", type=float, default=defaults.comm_ratio,
                        help="calibrate the link so one all-reduce of the model takes this many steps of compute"
                        " (default %(default)s)")  # fmt: skip
    parser.add_argument("--link-mbit", type=float, help="fix the link speed (Mbit/s) instead of calibrating it")
    parser.add_argument("--channels", type=int, default=defaults.channels,
                        help="width of the MNIST-1D CNN (64: the recipe's model, 41k parameters)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per equal-steps run")
    parser.add_argument("--val-every", type=int, default=defaults.val_every, help="steps between validations")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="runs per strategy and phase")
    parser.add_argument("--strategies", nargs="+", default=list(defaults.strategies), choices=STRATEGIES)
    parser.add_argument("--time-budget", type=float, help="seconds per equal-time run (default: compute-only's"
                        " median training time at equal steps)")  # fmt: skip
    parser.add_argument("--data-dir", default=defaults.data_dir)
    parser.add_argument("--out", default=defaults.out, help="report directory (default %(default)s)")
    parser.add_argument("--loopback", action="store_true", help="no namespaces: loopback at full speed")
    parser.add_argument("--quick", action="store_true", help="a smoke run: narrow model, 60 steps, one repeat")
    options = parser.parse_args(args)
    values = {
        "workers": options.workers,
        "nodes": options.nodes,
        "comm_ratio": options.comm_ratio,
        "link_mbit": options.link_mbit,
        "strategies": tuple(options.strategies),
        "time_budget_s": options.time_budget,
        "data_dir": options.data_dir,
        "out": options.out,
        "loopback": options.loopback,
    }
    given = set(arg.split("=")[0] for arg in args)
    for flag, key in (("--channels", "channels"), ("--steps", "steps"), ("--val-every", "val_every"),
                      ("--repeats", "repeats")):  # fmt: skip
        if flag in given or not options.quick:
            values[key] = getattr(options, key)
    config = BenchConfig.quick(**values) if options.quick else BenchConfig(**values)
    run_benchmark(config)
    print()
    print((Path(config.out) / "bench.md").read_text())


def monitor_main(args: Sequence[str]) -> None:
    from lightning_hpsgd.bench.monitor_overhead import measure_monitor_overhead, report

    parser = argparse.ArgumentParser(
        prog="python -m lightning_hpsgd.bench monitor",
        description="Step time of HPSGD with HPSGDMonitor on against off, alternating, on loopback.",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--channels", type=int, default=64)
    options = parser.parse_args(args)
    print(report(measure_monitor_overhead(options.repeats, options.steps, options.channels)))


def main(args: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["overlap"]:
        overlap_main(argv[1:])
    elif argv[:1] == ["monitor"]:
        monitor_main(argv[1:])
    elif argv[:1] == ["convergence"]:
        from lightning_hpsgd.bench.convergence import main as convergence_main

        convergence_main(argv[1:])
    elif argv[:1] == ["gpu"]:
        from lightning_hpsgd.bench.gpu import main as gpu_main

        gpu_main(argv[1:])
    elif argv[:1] == ["checksum"]:
        from lightning_hpsgd.bench.checksum import main as checksum_main

        checksum_main(argv[1:])
    else:
        compare_main(argv)


if __name__ == "__main__":
    main()
