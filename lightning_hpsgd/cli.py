"""``hpsgd`` / ``python -m lightning_hpsgd``: LightningCLI with the HPSGD strategies registered.

Everything LightningCLI does works: ``fit``, ``validate``, ``test``, ``predict``, ``--config``, ``--print_config``
and dotted overrides. ``hpsgd plot RUN_DIR ...`` draws charts from CSV logs ([`lightning_hpsgd.plot`][]), and
``hpsgd dashboard --entity E`` creates the W&B comparison workspace ([`lightning_hpsgd.wandb`][]).
Importing this package first is what makes ``trainer.strategy: hpsgd`` valid by name.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LightningCLI

import lightning_hpsgd  # noqa: F401  (registers the strategy names before the Trainer is built)
from lightning_hpsgd.strategy import REGISTERED_NAMES
from lightning_hpsgd.wandb import dashboard_main, offline_unless_logged_in


def expand_strategy_names(args: Sequence[str]) -> list[str]:
    """Rewrite ``--trainer.strategy hpsgd`` into its ``class_path`` form when strategy options follow it.

    jsonargparse cannot attach ``--trainer.strategy.sync_every 4`` to a plain string, so
    ``--trainer.strategy hpsgd --trainer.strategy.sync_every 4`` becomes
    ``--trainer.strategy lightning_hpsgd.HPSGDStrategy --trainer.strategy.start_method popen ...
    --trainer.strategy.sync_every 4``. Without strategy options after it, a name stays a name.
    """
    args = list(args)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = None
        if arg == "--trainer.strategy" and i + 1 < len(args):
            name, step = args[i + 1], 2
        elif arg.startswith("--trainer.strategy="):
            name, step = arg.split("=", 1)[1], 1
        has_options = any(a.startswith("--trainer.strategy.") for a in args[i + 1 :])
        if name in REGISTERED_NAMES and has_options:
            out += ["--trainer.strategy", "lightning_hpsgd.HPSGDStrategy"]
            for key, value in REGISTERED_NAMES[name].items():
                out += [f"--trainer.strategy.{key}", value]
            i += step
            continue
        out.append(arg)
        i += 1
    return out


class HPSGDCLI(LightningCLI):
    """LightningCLI whose ``args`` also accept ``--trainer.strategy hpsgd --trainer.strategy.<option> ...``.

    Defaults differ from LightningCLI's in two ways: the saved ``config.yaml`` may overwrite an earlier one, so a
    recipe can be run twice in the same directory; and without a W&B API key (and no ``WANDB_MODE``) W&B runs are
    written offline ([`lightning_hpsgd.wandb.offline_unless_logged_in`][]).
    """

    def __init__(self, *args, **kwargs) -> None:
        offline_unless_logged_in()
        if isinstance(kwargs.get("args"), (list, tuple)):
            kwargs["args"] = expand_strategy_names(kwargs["args"])
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``hpsgd`` console script and of ``python -m lightning_hpsgd``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["plot"]:
        from lightning_hpsgd.plot import main as plot_main

        plot_main(argv[1:])
        return
    if argv[:1] == ["dashboard"]:
        dashboard_main(argv[1:])
        return
    if args is None:
        # Rewritten in place, so that Lightning's popen launcher re-runs the same (expanded) command per rank.
        sys.argv[1:] = expand_strategy_names(sys.argv[1:])
        HPSGDCLI()
    else:
        HPSGDCLI(args=list(args))
    if args is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        # The command ends here: end the process group as PyTorch asks, so that no collective's resources are
        # freed by gloo's threads during interpreter shutdown (which aborts the process).
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
