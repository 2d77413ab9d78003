"""``make demo``: train a recipe with the CLI's configuration, test it, and print a short result table.

``python -m lightning_hpsgd.recipes.demo --config recipes/mnist1d.yaml [LightningCLI overrides ...]``

The demo's checkpoints go to ``checkpoints/demo/<name>/`` (the recipe's ``checkpoints/<name>/`` with ``demo/``
inserted), so that ``make demo`` never replaces the ``last.ckpt`` of a run the user trained with ``hpsgd fit``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_hpsgd.cli import HPSGDCLI, expand_strategy_names
from lightning_hpsgd.extras import require
from lightning_hpsgd.strategy import HPSGDStrategy

# What the libraries print before the result table that is not about this run: advice that does not apply to a
# 2-process CPU demo, a deprecation inside Lightning, and an advertisement. Each is matched by its own text.
QUIET_WARNINGS = (
    r"Using `DistributedSampler` with the dataloaders\. During `trainer\.test\(\)`",  # the test set divides evenly
    r"The '\w+_dataloader' does not have many workers",  # MNIST-1D lives in memory: workers would only add start-up
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's call into torch.utils._pytree
    r"Checkpoint directory .* exists and is not empty",  # the demo's own checkpoints, replaced on each run
)
QUIET_INFO = ("💡 Tip:",)  # Lightning's advertisement for its cloud logger


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_the_libraries() -> None:
    """Silence, by their text, the warnings and the advertisement listed above; W&B's console chatter too.

    W&B prints its own lines (settings warnings, where the offline run is, how to sync it); the demo prints one
    line for that instead (``HPSGDMonitor``), so ``WANDB_SILENT`` is set unless the user set it.
    """
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages(QUIET_INFO))
    os.environ.setdefault("WANDB_SILENT", "true")
    if importlib.util.find_spec("wandb") is None:  # the recipes' W&B logger is then refused by Lightning itself
        return
    wandb = require("wandb", "make demo")
    # Lightning's WandbLogger passes anonymous=None, and W&B warns about that setting while it reads the run's
    # settings, before WANDB_SILENT takes effect: apply it to W&B's console now.
    wandb.termsetup(wandb.Settings(silent=os.environ["WANDB_SILENT"].lower() in ("1", "true")), None)


def main() -> None:
    quiet_the_libraries()
    # Rewritten in place (not passed as args, which LightningCLI warns about): Lightning's popen launcher re-runs
    # this module with the same arguments on every other rank.
    sys.argv[1:] = expand_strategy_names(sys.argv[1:])
    cli = HPSGDCLI(run=False)
    try:
        _train_and_report(cli)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # as PyTorch asks; gloo may abort at exit otherwise


def _demo_checkpoints(trainer) -> None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            dirpath = Path(callback.dirpath)
            callback.dirpath = str(dirpath.parent / "demo" / dirpath.name)


def _train_and_report(cli: HPSGDCLI) -> None:
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    _demo_checkpoints(trainer)
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
