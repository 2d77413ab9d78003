"""CIFAR-10 with a torchvision ResNet-18 adapted to 32x32 input (for GPU machines).

The data comes from ``torchvision.datasets.CIFAR10``. Offline, with no copy in ``data_dir``, setup fails at once
and says where to put it. ``fake=True`` swaps in ``torchvision.datasets.FakeData`` of the same shape for smoke
tests, and says so.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_hpsgd.extras import require
from lightning_hpsgd.recipes.classifier import ImageClassifier

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CIFAR_FOLDER = "cifar-10-batches-py"


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images, with random crop and horizontal flip for training.

    Args:
        data_dir: where ``cifar-10-batches-py/`` is, or goes when downloaded (default ``data/cifar10``).
        batch_size: images per batch on each rank (default 128).
        num_workers: DataLoader worker processes (default 4).
        download: download the data set if it is missing (default ``True``; needs internet).
        fake: use ``torchvision.datasets.FakeData`` of the same shape instead (synthetic, for smoke tests).
        fake_size: training images when ``fake`` (default 512; test gets a quarter).
    """

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = True,
        fake: bool = False,
        fake_size: int = 512,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.fake = fake
        self.fake_size = fake_size
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def prepare_data(self) -> None:
        if self.fake or (self.data_dir / CIFAR_FOLDER).exists():
            return
        if not self.download:
            raise FileNotFoundError(self._missing_message("download=False"))
        CIFAR10 = require("torchvision.datasets", "The CIFAR-10 recipe").CIFAR10  # noqa: N806

        try:
            CIFAR10(self.data_dir, train=True, download=True)
            CIFAR10(self.data_dir, train=False, download=True)
        except OSError as err:  # URLError and socket errors are OSErrors
            raise FileNotFoundError(self._missing_message(f"the download failed: {err}")) from err

    def setup(self, stage: str) -> None:
        T = require("torchvision.transforms", "The CIFAR-10 recipe")  # noqa: N806

        normalize = T.Normalize(MEAN, STD)
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        test_tf = T.Compose([T.ToTensor(), normalize])
        if self.fake:
            FakeData = require("torchvision.datasets", "The CIFAR-10 recipe").FakeData  # noqa: N806

            rank_zero_warn(
                "CIFAR10DataModule(fake=True): training on SYNTHETIC data (torchvision FakeData, random images of"
                " CIFAR-10's shape). Accuracy figures from this run mean nothing."
            )
            self.train_set = FakeData(self.fake_size, (3, 32, 32), 10, transform=train_tf, random_offset=0)
            self.test_set = FakeData(max(1, self.fake_size // 4), (3, 32, 32), 10, transform=test_tf, random_offset=1)
            return
        if not (self.data_dir / CIFAR_FOLDER).exists():
            raise FileNotFoundError(self._missing_message("it is not there"))
        CIFAR10 = require("torchvision.datasets", "The CIFAR-10 recipe").CIFAR10  # noqa: N806

        self.train_set = CIFAR10(self.data_dir, train=True, transform=train_tf)
        self.test_set = CIFAR10(self.data_dir, train=False, transform=test_tf)

    def _missing_message(self, why: str) -> str:
        return (
            f"CIFAR-10 is not in {self.data_dir.resolve() / CIFAR_FOLDER} ({why}). On a machine with internet,"
            " `--data.download true` (the default) fetches it; offline, copy the extracted `cifar-10-batches-py/`"
            f" folder (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) into {self.data_dir.resolve()}, or"
            " pass `--data.data_dir` where it is. For a smoke test without the data, pass `--data.fake true`."
        )

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class CIFAR10ResNet18(ImageClassifier):
    """torchvision's ResNet-18 with a 3x3 stem and no max-pool, the usual adaptation to 32x32 input.

    Args:
        lr: peak learning rate of the one-cycle schedule (default 0.1).
        weight_decay: SGD weight decay (default 5e-4).
        optimizer: ``"sgd"`` (default, Nesterov momentum 0.9) or ``"adamw"``.
    """

    def __init__(self, lr: float = 0.1, weight_decay: float = 5e-4, optimizer: str = "sgd") -> None:
        super().__init__(num_classes=10, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        net = require("torchvision.models", "The CIFAR-10 recipe").resnet18(num_classes=10)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net
