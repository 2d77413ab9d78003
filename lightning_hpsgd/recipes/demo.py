"""``make demo``: train a recipe with the CLI's configuration, test it, and print a short result table.

``python -m lightning_hpsgd.recipes.demo --config recipes/mnist1d.yaml [LightningCLI overrides ...]``
"""

from __future__ import annotations

import sys
import time

import torch

from lightning_hpsgd.cli import HPSGDCLI, expand_strategy_names
from lightning_hpsgd.strategy import HPSGDStrategy


def main() -> None:
    # Lightning's popen launcher re-runs this module with the same arguments on every other rank.
    cli = HPSGDCLI(run=False, args=expand_strategy_names(sys.argv[1:]))
    try:
        _train_and_report(cli)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # as PyTorch asks; gloo may abort at exit otherwise


def _train_and_report(cli: HPSGDCLI) -> None:
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - started
    results = trainer.test(model, datamodule=data, verbose=False)
    if not trainer.is_global_zero:
        return
    strategy = trainer.strategy
    rows = [("test accuracy", f"{results[0]['test/acc']:.4f}"), ("training wall time", f"{fit_seconds:.1f} s")]
    if isinstance(strategy, HPSGDStrategy) and strategy.stats is not None:
        stats = strategy.stats
        sync_rounds = max(1, stats.rounds - stats.flushes)
        rows += [
            ("HPSGD rounds", f"{stats.rounds} ({stats.flushes} of them flushes)"),
            ("mean wait per round", f"{1000 * stats.wait_seconds / sync_rounds:.3f} ms"),
        ]
    name = type(strategy).__name__
    print(f"\nResult: {type(model).__name__} on {type(data).__name__}, {trainer.world_size} processes, {name}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
