"""Small LightningModules and data used by the tests: deterministic, CPU-sized."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_batches(
    num_batches: int, batch_size: int, seed: int, in_features: int = 6
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of (x, y) regression batches: y = x @ w + noise."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(in_features, 2, generator=torch.Generator().manual_seed(1234))
    batches = []
    for _ in range(num_batches):
        x = torch.randn(batch_size, in_features, generator=gen)
        y = x @ w + 0.1 * torch.randn(batch_size, 2, generator=gen)
        batches.append((x, y))
    return batches


def loader(batches: list[tuple[torch.Tensor, torch.Tensor]], stateful: bool = False) -> DataLoader:
    """A DataLoader that yields exactly ``batches``, in order.

    ``stateful``: torchdata's ``StatefulDataLoader``, whose position Lightning saves in checkpoints, so that a
    mid-epoch resume continues with the next batch.
    """
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    cls = DataLoader
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader as cls  # noqa: N813
    return cls(TensorDataset(x, y), batch_size=batches[0][0].shape[0], shuffle=False)


def build_net(
    hidden: int = 16, batchnorm: bool = False, frozen_first: bool = False, in_features: int = 6
) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, 2)]
    net = nn.Sequential(*layers)
    if frozen_first:
        net[0].requires_grad_(False)
    return net


class Regressor(L.LightningModule):
    """An MLP regressor; every option is a feature the strategy must support."""

    def __init__(
        self,
        hidden: int = 16,
        lr: float = 0.05,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        batchnorm: bool = False,
        frozen_first: bool = False,
        scheduler: bool = False,
        manual: bool = False,
        nan_at_step: int | None = None,
        nan_rank: int = 1,
        exit_at_step: int | None = None,
        hang_at_step: int | None = None,
        unfreeze_at_epoch: int | None = None,
        raise_at_step: int | None = None,
        sigterm_at_step: int | None = None,
        step_sleep_s: float = 0.0,
        sleep_rank: int | None = None,
        log_sync_dist: bool = True,
        step_every_other: bool = False,
        sigterm_rank: int = 1,
        ema_teacher: float | None = None,
        replace_at_step: int | None = None,
        unused_branch_rank: int | None = None,
        raise_rank: int | None = 1,
        constant_buffer: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(hidden, batchnorm, frozen_first)
        if ema_teacher is not None:
            # Mean teacher / BYOL / DINO style: a frozen copy that follows the student outside the optimizer.
            self.teacher = build_net(hidden, batchnorm, frozen_first).requires_grad_(False)
        if unused_branch_rank is not None:
            # An MoE expert or an unused branch: only one rank's data ever reaches it, so only that rank's optimizer
            # has state for it.
            self.branch = nn.Linear(6, 2)
        if constant_buffer:
            # A causal mask or a RoPE cache kept as a float buffer: never changes, must cost no wire bytes.
            self.register_buffer("mask", torch.tril(torch.ones(constant_buffer, constant_buffer)))
        self.automatic_optimization = not manual
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        # Fine-tuning style: the frozen first layer joins training, with its own param group.
        if self.hparams.unfreeze_at_epoch == self.current_epoch:
            self.net[0].requires_grad_(True)
            self.optimizers().optimizer.add_param_group({"params": list(self.net[0].parameters())})

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.hparams.unused_branch_rank == self.global_rank and self.training:
            out = out + 0.1 * self.branch(x)
        return nn.functional.mse_loss(out.float(), y.float())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.replace_at_step is None or self.global_step != self.hparams.replace_at_step:
            return
        # What user code does: a parameter replaced by a new object (moved into the optimizer by hand), and a buffer
        # registered mid-fit. Both start with different values on each rank.
        old = self.net[-1].weight
        new = nn.Parameter(old.detach() + 0.01 * (self.global_rank + 1))
        self.net[-1].weight = new
        optimizer = self.trainer.optimizers[0]
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in optimizer.state:
            optimizer.state[new] = optimizer.state.pop(old)
        self.register_buffer("extra", torch.full((3,), float(self.global_rank), device=self.device))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hparams.ema_teacher is None:
            return
        with torch.no_grad():
            for teacher, student in zip(self.teacher.parameters(), self.net.parameters()):
                teacher.lerp_(student, 1.0 - self.hparams.ema_teacher)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        hp = self.hparams
        if hp.exit_at_step is not None and self.global_step == hp.exit_at_step and self.global_rank == 1:
            import os

            os._exit(17)
        if (
            hp.raise_at_step is not None
            and self.global_step == hp.raise_at_step
            and hp.raise_rank in (None, self.global_rank)
        ):
            raise RuntimeError(
                f"a bug in the user's training_step, on {'every rank' if hp.raise_rank is None else 'rank 1 only'}"
            )
        sigterm_here = self.global_step == hp.sigterm_at_step and self.global_rank == hp.sigterm_rank
        if sigterm_here and not getattr(self, "_signalled", False):
            self._signalled = True
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler preempting this one process
        if hp.step_sleep_s and hp.sleep_rank in (None, self.global_rank):
            import time

            time.sleep(hp.step_sleep_s)
        if hp.hang_at_step is not None and self.global_step == hp.hang_at_step and self.global_rank == 1:
            import time

            time.sleep(3600)
        loss = self._loss(batch)
        if hp.nan_at_step is not None and self.global_step == hp.nan_at_step and self.global_rank == hp.nan_rank:
            loss = loss * float("nan")
        self.losses.append(float(loss.detach()))
        # sync_dist runs a collective on the default group while an HPSGD round is in flight on its own group.
        self.log("train_loss", loss, sync_dist=hp.log_sync_dist)
        if hp.manual:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            if hp.scheduler:
                self.lr_schedulers().step()
            return None
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # Lightning's documented pattern for stepping only on some batches: global_step still counts every batch.
        if self.hparams.step_every_other and batch_idx % 2 == 0:
            optimizer_closure()
            return
        optimizer.step(closure=optimizer_closure)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        if hp.unused_branch_rank is not None:
            params += list(self.branch.parameters())
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr)
        elif hp.optimizer == "zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.SGD, lr=hp.lr)
        else:
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum)
        if hp.scheduler:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}
        return opt


class GAN(L.LightningModule):
    """Two optimizers stepped by hand, GAN-style: every batch takes two optimizer steps."""

    def __init__(self, lr: float = 0.05, docs_order: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.docs_order = docs_order
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4, generator=torch.Generator().manual_seed(batch_idx))
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self.generator(z)
        if self.docs_order:
            # Lightning's manual-optimization example: D steps first, then G's loss flows back through `fake`.
            d_loss = bce(self.discriminator(real), torch.ones(real.shape[0], 1)) + bce(
                self.discriminator(fake.detach()), torch.zeros(real.shape[0], 1)
            )
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            g_loss = bce(self.discriminator(fake), torch.ones(real.shape[0], 1))
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
            return
        g_loss = bce(self.discriminator(fake), torch.ones(real.shape[0], 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        d_loss = bce(self.discriminator(real), torch.ones(real.shape[0], 1)) + bce(
            self.discriminator(fake.detach()), torch.zeros(real.shape[0], 1)
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.generator.parameters(), lr=self.lr, momentum=0.5),
            torch.optim.SGD(self.discriminator.parameters(), lr=self.lr, momentum=0.5),
        )
