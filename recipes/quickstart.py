"""Quick start: an unchanged LightningModule trained with HPSGD on 2 CPU processes, offline.

Run it with ``make demo`` (or ``python recipes/quickstart.py``). It trains a small MLP classifier on a synthetic
data set with ``Trainer(strategy="hpsgd")``, then reports validation accuracy on the flushed model that every rank
shares. Lightning's popen launcher re-runs this script once per extra rank.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_hpsgd  # noqa: F401  (registers strategy="hpsgd")


def make_data(n: int, seed: int) -> TensorDataset:
    """Ten Gaussian blobs in 20 dimensions: learnable in a few epochs, and generated locally."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 20, generator=torch.Generator().manual_seed(0)) * 0.6
    labels = torch.randint(0, 10, (n,), generator=gen)
    return TensorDataset(centers[labels] + torch.randn(n, 20, generator=gen), labels)


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.net(x).argmax(-1) == y).float().mean()
        self.log("val_acc", acc, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    trainer = L.Trainer(
        strategy="hpsgd",  # or lightning_hpsgd.HPSGDStrategy(sync_every=4)
        accelerator="cpu",
        devices=2,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
    )
    model = Classifier()
    trainer.fit(
        model,
        DataLoader(make_data(4096, seed=1), batch_size=64, shuffle=True),
        DataLoader(make_data(1024, seed=2), batch_size=256),
    )
    metrics = trainer.validate(model, DataLoader(make_data(1024, seed=2), batch_size=256), verbose=False)
    if trainer.is_global_zero:
        print(f"HPSGD quick start: validation accuracy {metrics[0]['val_acc']:.3f} on {trainer.world_size} ranks")


if __name__ == "__main__":
    main()
