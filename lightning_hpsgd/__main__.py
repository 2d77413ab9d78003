"""``python -m lightning_hpsgd``: the same command line as the ``hpsgd`` console script."""

from lightning_hpsgd.cli import main

main()
