"""train.py: the script that the multi-node commands run on every node."""

import argparse

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hpsgd import HPSGDStrategy


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    # "node": synchronous (DDP) inside a node, HPSGD across nodes (several GPUs).
    parser.add_argument("--hierarchy", choices=["node"], default=None)
    args = parser.parse_args()
    x = torch.randn(512, 8)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=32)
    # Under SLURM, no auto-requeue: it would save a checkpoint from a signal
    # handler (see the FAQ).
    slurm = SLURMEnvironment.detect()
    plugins = [SLURMEnvironment(auto_requeue=False)] if slurm else []
    trainer = L.Trainer(
        strategy=HPSGDStrategy(sync_every=4, hierarchy=args.hierarchy),
        plugins=plugins,
        accelerator="auto",
        num_nodes=args.num_nodes,
        devices=args.devices,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
    )
    model = Regressor()
    trainer.fit(model, data)
    if trainer.is_global_zero:
        stats = trainer.strategy.stats
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(
            f"trained on {trainer.world_size} processes, {trainer.num_nodes} nodes,"
            f" {stats.rounds} rounds; each rank sent {stats.bytes_per_round}"
            f" of the model's {model_bytes} bytes per round"
        )
