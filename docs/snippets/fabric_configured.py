"""Fabric with HPSGD's options set in code."""

import lightning as L

from lightning_hpsgd.fabric import HPSGDStrategy

fabric = L.Fabric(
    accelerator="cpu",
    devices=2,
    strategy=HPSGDStrategy(sync_every=4, outer_momentum=0.9, comm_dtype="bf16"),
)
