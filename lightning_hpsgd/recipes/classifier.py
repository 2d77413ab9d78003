"""What every recipe's model shares: cross-entropy, torchmetrics accuracy, an optimizer and an LR schedule."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(L.LightningModule):
    """A classifier around ``self.net`` with train/val/test accuracy and a one-cycle LR schedule.

    Args:
        num_classes: number of classes.
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: AdamW / SGD weight decay.
        optimizer: ``"adamw"`` or ``"sgd"`` (SGD uses Nesterov momentum 0.9).
    """

    def __init__(self, num_classes: int, lr: float, weight_decay: float, optimizer: str) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd'; received {optimizer!r}.")
        self.net: nn.Module = nn.Identity()
        # average="micro": the fraction of correct predictions (torchmetrics' default, "macro", averages per class).
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        return self.optimizer_config(self.trainer.estimated_stepping_batches)

    def optimizer_config(self, total_steps: int) -> dict[str, Any]:
        """The optimizer and its per-step schedule for a run of ``total_steps`` optimizer steps."""
        hp = self.hparams
        if hp.optimizer == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.weight_decay
            )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
