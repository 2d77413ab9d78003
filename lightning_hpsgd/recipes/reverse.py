"""Reversing a random sequence of digits with a small transformer: a task that is sensitive to stale, averaged
Adam updates. The data is generated locally from a seed (no download)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


def reverse_dataset(size: int, length: int, vocab: int, seed: int) -> TensorDataset:
    """``size`` random sequences of ``length`` digits below ``vocab``; the target is each sequence reversed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (size, length), generator=generator)
    return TensorDataset(x, x.flip(1))


class ReverseDataModule(L.LightningDataModule):
    """Random digit sequences and their reversals, generated from fixed seeds (the same on every rank).

    Args:
        train_size: training sequences (default 50,000).
        val_size: validation (and test) sequences, drawn from another seed (default 1,000).
        length: digits per sequence (default 16).
        vocab: distinct digits (default 10).
        batch_size: sequences per batch on each rank (default 32).
        seed: the training set's seed; validation uses ``seed + 1`` (default 0).
    """

    def __init__(self, train_size: int = 50_000, val_size: int = 1_000, length: int = 16, vocab: int = 10,
                 batch_size: int = 32, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train_set = reverse_dataset(hp.train_size, hp.length, hp.vocab, hp.seed)
        self.val_set = reverse_dataset(hp.val_size, hp.length, hp.vocab, hp.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 500)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 500)


class ReverseTransformer(L.LightningModule):
    """A transformer encoder that outputs, at every position, the digit at the mirrored position.

    Token and learned position embeddings, ``layers`` pre-norm encoder layers, a linear head per position; no
    dropout. Adam with a linear warm-up over ``warmup_steps`` and a cosine decay to 0 over the run. Accuracy is
    per digit.

    Args:
        vocab: distinct digits (default 10).
        length: sequence length (default 16).
        d_model: model width (default 64).
        heads: attention heads (default 4).
        layers: encoder layers (default 2).
        lr: peak learning rate (default 1e-3).
        warmup_steps: optimizer steps of linear warm-up (default 50).
        position_scale: standard deviation of the initial position embeddings (default 0.3). The task is solved
            once attention finds the mirrored position; from 0.02 (GPT-2's) that takes thousands of steps, from
            0.3 a few hundred, and from 1.0 about a hundred.
    """

    def __init__(self, vocab: int = 10, length: int = 16, d_model: int = 64, heads: int = 4, layers: int = 2,
                 lr: float = 1e-3, warmup_steps: int = 50, position_scale: float = 0.3) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(length, d_model) * position_scale)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, vocab))
        self.train_acc = MulticlassAccuracy(vocab, average="micro")
        self.val_acc = MulticlassAccuracy(vocab, average="micro")
        self.test_acc = MulticlassAccuracy(vocab, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, length, vocab)``."""
        return self.head(self.encoder(self.embed(x) + self.position[: x.shape[1]]))

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc(logits.flatten(0, 1), y.flatten())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits.flatten(0, 1), y.flatten())
        self.log("val/loss", self.loss(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits.flatten(0, 1), y.flatten())
        self.log("test/loss", self.loss(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        return self.optimizer_config(self.trainer.estimated_stepping_batches)

    def optimizer_config(self, total_steps: int) -> dict[str, Any]:
        """Adam, and a per-step schedule: linear warm-up, then cosine decay to 0 at ``total_steps``."""
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        warmup = max(1, min(self.hparams.warmup_steps, int(total_steps) // 2))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, int(total_steps) - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
