"""The optional packages: which extra of ``lightning-hpsgd`` installs each, and the one line said when one is missing.

``pip install lightning-hpsgd`` installs what the strategy, the monitor and the ``hpsgd`` command need: torch,
Lightning and jsonargparse. The recipes, the charts and the W&B helpers import their packages only when used,
through [`require`][], which turns a missing package into a [`MissingExtraError`][] that names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require"]

# Top-level module -> (the extra that installs it, its distribution's name on PyPI).
EXTRAS: dict[str, tuple[str, str]] = {
    "torchvision": ("recipes", "torchvision"),
    "mnist1d": ("recipes", "mnist1d"),
    "matplotlib": ("plot", "matplotlib"),
    "wandb": ("wandb", "wandb"),
    "wandb_workspaces": ("wandb", "wandb-workspaces"),
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message is one line that names the extra to install."""


def install_hint(module: str) -> str:
    """``pip install 'lightning-hpsgd[EXTRA]'`` for the extra that installs ``module`` (a dotted name is fine)."""
    extra, _ = EXTRAS[module.split(".")[0]]
    return f"pip install 'lightning-hpsgd[{extra}]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (``"matplotlib.pyplot"``, ``"torchvision.datasets"``), one of the optional packages.

    Args:
        module: the module to import; its top-level package must be a key of [`EXTRAS`][].
        purpose: what needs it, the start of the error message (``"hpsgd plot"``).

    Raises:
        MissingExtraError: if the package is not installed: ``hpsgd plot needs matplotlib, which is not installed:
            pip install 'lightning-hpsgd[plot]'``.
    """
    top = module.split(".")[0]
    hint = install_hint(top)  # a KeyError here is a bug: every optional package has an extra
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is not: its own message says which
        raise MissingExtraError(f"{purpose} needs {top}, which is not installed: {hint}", name=top) from None
