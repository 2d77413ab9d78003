"""train.py: the script that the multi-node commands run on every node.

It survives preemption and lost workers: it saves last.ckpt every
--save-every-n-steps steps and when the ranks agree to stop (SIGTERM), and
each start resumes from the newest checkpoint (ckpt_path="last").
"""

import argparse
import hashlib
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from lightning_hpsgd import HPSGDStrategy

STOPPED = 3  # exit code after a SIGTERM: a checkpoint was written; run again


class Regressor(L.LightningModule):
    def __init__(self, dataset: TensorDataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def train_dataloader(self):
        # Shuffled, and exact after a resume in mid-epoch: the checkpoint
        # holds the loader's position and this sampler's; its order follows
        # from the seed and the epoch. Not StatefulDataLoader(shuffle=True):
        # see the page. Made here, where each rank knows its rank.
        sampler = StatefulDistributedSampler(
            self.dataset,
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
            shuffle=True,
            seed=0,  # the same on every rank
        )
        return StatefulDataLoader(self.dataset, batch_size=16, sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class OnStopCheckpoint(OnExceptionCheckpoint):
    """Saves when the ranks agreed to stop (SIGTERM), not after an error.

    After an error HPSGD cannot merge the ranks' progress: that checkpoint
    would be marked, and fit refuses to resume from it. A restart then
    resumes from the last periodic checkpoint instead.
    """

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)


def parameters_digest(model: nn.Module) -> str:
    flat = torch.cat([p.detach().cpu().flatten() for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    # "node": synchronous (DDP) inside a node, HPSGD across nodes.
    parser.add_argument("--hierarchy", choices=["node"], default=None)
    parser.add_argument("--ckpt-dir", default="checkpoints")
    parser.add_argument("--save-every-n-steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)  # the same data on every rank, in every run
    x = torch.randn(384, 8)
    dataset = TensorDataset(x, x.sum(dim=1, keepdim=True))
    # No SLURM auto-requeue: it saves from a signal handler (see the FAQ).
    plugins = []
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        # timeout: a rank whose peer died fails after 5 minutes (default 30).
        strategy=HPSGDStrategy(sync_every=4, hierarchy=args.hierarchy, timeout=300),
        plugins=plugins,
        accelerator="auto",
        num_nodes=args.num_nodes,
        devices=args.devices,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        callbacks=[
            ModelCheckpoint(
                dirpath=args.ckpt_dir,
                every_n_train_steps=args.save_every_n_steps,
                save_last=True,
            ),
            OnStopCheckpoint(dirpath=args.ckpt_dir),
        ],
    )
    model = Regressor(dataset)
    try:
        # "last": the newest of last.ckpt and on_exception.ckpt; none at first.
        trainer.fit(model, ckpt_path="last")
    except SIGTERMException:
        sys.exit(STOPPED)
    digest = parameters_digest(model)
    print(f"rank {trainer.global_rank}: step {trainer.global_step}, {digest}")
    if trainer.is_global_zero:
        stats = trainer.strategy.stats
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        print(
            f"trained on {trainer.world_size} processes, {trainer.num_nodes}"
            f" nodes, {stats.rounds} rounds; each rank sent"
            f" {stats.bytes_per_round} of the model's {size} bytes per round"
        )
