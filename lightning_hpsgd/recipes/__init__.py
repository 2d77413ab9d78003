"""Models and data modules that the YAML recipes in ``recipes/`` name by ``class_path``.

* [`MNIST1DDataModule`][], [`MNIST1DClassifier`][]: MNIST-1D, generated locally (the offline default).
* [`ReverseDataModule`][], [`ReverseTransformer`][]: reversing random digit sequences with a small transformer,
  generated locally; sensitive to stale, averaged Adam updates.
* [`CIFAR10DataModule`][], [`CIFAR10ResNet18`][]: CIFAR-10 with a torchvision ResNet-18 (for GPU machines).
"""

from lightning_hpsgd.recipes.cifar10 import CIFAR10DataModule, CIFAR10ResNet18
from lightning_hpsgd.recipes.mnist1d import MNIST1DClassifier, MNIST1DDataModule
from lightning_hpsgd.recipes.reverse import ReverseDataModule, ReverseTransformer

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10ResNet18",
    "MNIST1DClassifier",
    "MNIST1DDataModule",
    "ReverseDataModule",
    "ReverseTransformer",
]
