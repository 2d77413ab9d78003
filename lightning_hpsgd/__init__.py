"""lightning-hpsgd: Hierarchical Parallel SGD as a PyTorch Lightning strategy.

Importing the package registers the strategy names ``"hpsgd"``, ``"hpsgd_spawn"``, ``"hpsgd_fork"``,
``"hpsgd_notebook"`` and ``"hpsgd_stale"`` with Lightning, so ``Trainer(strategy="hpsgd")`` works, and the baseline
``"localsgd"`` ([`PostLocalSGDStrategy`][lightning_hpsgd.baselines.PostLocalSGDStrategy], PyTorch's post-local SGD,
period 4). The same names select [`lightning_hpsgd.fabric.HPSGDStrategy`][] in ``lightning.Fabric(strategy=...)``.
"""

from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

from lightning_hpsgd import fabric
from lightning_hpsgd.baselines import PostLocalSGDStrategy
from lightning_hpsgd.engine import (
    HPSGDCommunicationError,
    HPSGDEngine,
    HPSGDError,
    NonFiniteUpdateError,
    RanksDivergedError,
    RanksOutOfStepError,
    StopRequest,
)
from lightning_hpsgd.monitor import HPSGDMonitor
from lightning_hpsgd.strategy import HPSGDStrategy

__version__ = "0.1.0"

__all__ = [
    "HPSGDCommunicationError",
    "HPSGDEngine",
    "HPSGDError",
    "HPSGDMonitor",
    "HPSGDStrategy",
    "NonFiniteUpdateError",
    "PostLocalSGDStrategy",
    "RanksDivergedError",
    "RanksOutOfStepError",
    "StopRequest",
]

# Registration is idempotent (override=True): children of the popen launcher import this module again.
HPSGDStrategy.register_strategies(StrategyRegistry)
fabric.HPSGDStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)
StrategyRegistry.register(
    "localsgd",
    PostLocalSGDStrategy,
    description="PyTorch's post-local SGD (model averaging every 4 steps after 8 DDP steps), on every device",
    override=True,
)
