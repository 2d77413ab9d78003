"""A Fabric training loop, written as Fabric's docs write one, trained with HPSGD:
only the strategy differs.

python fabric_loop.py      # 2 CPU processes; run it again to resume
"""

import argparse
from itertools import islice
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lightning.fabric.loggers import CSVLogger
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_hpsgd  # noqa: F401  (registers "hpsgd" with Fabric)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint", default="checkpoints/fabric_loop.ckpt")
    args = parser.parse_args()

    fabric = L.Fabric(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="hpsgd",  # the only line that differs from a DDP loop ("ddp")
        loggers=CSVLogger("logs", name="fabric_loop", flush_logs_every_n_steps=1),
    )
    fabric.launch()
    fabric.seed_everything(0)

    data = make_dataset(get_dataset_args())  # MNIST-1D, generated locally
    train = TensorDataset(
        torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
    )
    test = TensorDataset(
        torch.tensor(data["x_test"], dtype=torch.float32),
        torch.tensor(data["y_test"]),
    )
    train_loader, test_loader = fabric.setup_dataloaders(
        DataLoader(train, batch_size=32, shuffle=True),
        DataLoader(test, batch_size=250),
    )

    model = nn.Sequential(
        nn.Linear(40, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(
        model, optimizer
    )  # rank 0's weights on every rank; no DDP wrapper
    accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10).to(
        fabric.device
    )

    state = {"model": model, "optimizer": optimizer, "epoch": 0, "batch": 0}
    if Path(args.checkpoint).exists():
        fabric.load(
            args.checkpoint, state
        )  # the model, every rank's optimizer state and HPSGD's own
        fabric.print(f"resumed at epoch {state['epoch']}, batch {state['batch']}")

    for epoch in range(state["epoch"], args.epochs):
        train_loader.sampler.set_epoch(epoch)  # the same shuffle after a resume
        for batch, (x, y) in enumerate(
            islice(train_loader, state["batch"], None), start=state["batch"]
        ):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            # HPSGD's sync point: the last round's average merges, the next starts.
            optimizer.step()
            if fabric.strategy.steps % 50 == 0:
                fabric.log_dict(
                    {"train_loss": loss.item(), **fabric.strategy.metrics()},
                    step=fabric.strategy.steps,
                )
            if (
                fabric.strategy.should_stop
            ):  # a rank received SIGTERM: every rank stops here, flushed
                state.update(epoch=epoch, batch=batch + 1)
                fabric.save(args.checkpoint, state)
                return
        evaluate(fabric, model, test_loader, accuracy)
        state.update(epoch=epoch + 1, batch=0)
        fabric.save(
            args.checkpoint, state
        )  # flushes (already done), then writes every rank's optimizer state


def evaluate(
    fabric: L.Fabric,
    model: nn.Module,
    test_loader: DataLoader,
    accuracy: torchmetrics.Metric,
) -> None:
    """The global model's accuracy on the test set; each rank evaluates a share."""
    fabric.strategy.flush()  # every rank now holds the same, global model
    model.eval()
    with torch.no_grad():
        for x, y in test_loader:
            accuracy.update(model(x), y)
    test_acc = accuracy.compute().item()  # over every rank's share of the test set
    accuracy.reset()
    model.train()
    fabric.log_dict({"test_acc": test_acc}, step=fabric.strategy.steps)
    fabric.print(
        f"after {fabric.strategy.steps} iterations: test accuracy {test_acc:.3f}"
    )


if __name__ == "__main__":
    main()
