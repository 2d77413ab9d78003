"""The same, with HPSGD's options: a round every 4 steps, bf16 on the wire."""

import lightning as L

from lightning_hpsgd import HPSGDStrategy

trainer = L.Trainer(
    strategy=HPSGDStrategy(sync_every=4, comm_dtype="bf16"),
    accelerator="cpu",
    devices=2,
    max_epochs=2,
)
