"""``HPSGDStrategy``: Lightning's lifecycle mapped onto the HPSGD engine, and nothing more.

* setup → build the engine (broadcast and initialise);
* before each batch → follow tensors that user code replaced or froze
  ([`HPSGDEngine.follow`][lightning_hpsgd.engine.HPSGDEngine.follow]);
* the end of a batch that stepped an optimizer → a step of the engine (a sync point every ``sync_every``);
* validation start, checkpoint, end of fit and teardown → flush;
* an agreed stop (SIGTERM, time limit) → flush, then Lightning's own stop; any other exception → abandon
  ([`lightning_hpsgd.stops`][]).

The rule lives in [`lightning_hpsgd.engine`][], which tensors it gets in [`lightning_hpsgd.model_tensors`][], what
Lightning does not expose in [`lightning_hpsgd.compat`][], what a checkpoint holds in [`lightning_hpsgd.checkpoint`][]
and what HPSGD refuses in [`lightning_hpsgd.refusals`][].
"""

from __future__ import annotations

import inspect
import logging
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import Module, SyncBatchNorm
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hpsgd import compat, process_groups
from lightning_hpsgd.checkpoint import (
    CHECKPOINT_KEY,
    SavedEngineState,
    abandoned_entry,
    gather_per_rank_state,
    restore_per_rank_state,
)
from lightning_hpsgd.engine import HPSGDEngine
from lightning_hpsgd.model_tensors import ModelWatcher, averaged_names, model_tensors, trained_names
from lightning_hpsgd.monitor import HPSGDMonitor
from lightning_hpsgd.options import RuleOptions, validate_launch
from lightning_hpsgd.refusals import reject_sharded_optimizers, reject_unsupported_model
from lightning_hpsgd.stats import EngineStats
from lightning_hpsgd.stops import StopCoordinator
from lightning_hpsgd.wire import NodeGroups

log = logging.getLogger(__name__)

# The names ``Trainer(strategy=...)`` accepts, and the options each stands for.
REGISTERED_NAMES: dict[str, dict[str, str]] = {
    "hpsgd": {"start_method": "popen", "merge": "replica"},
    "hpsgd_spawn": {"start_method": "spawn", "merge": "replica"},
    "hpsgd_fork": {"start_method": "fork", "merge": "replica"},
    "hpsgd_notebook": {"start_method": "fork", "merge": "replica"},
    "hpsgd_stale": {"start_method": "popen", "merge": "stale"},
}


class HPSGDStrategy(DDPStrategy, RuleOptions):
    """Hierarchical Parallel SGD: each rank trains its own replica while the previous round's average is in flight.

    A subclass of Lightning's ``DDPStrategy`` that reuses its launchers, cluster
    environments and distributed samplers, but never wraps the model in ``DistributedDataParallel``: gradients
    stay local, and every ``sync_every`` optimizer steps the rank's change is all-reduced on a process group of its
    own, overlapped with the next steps (see the algorithm page of the documentation).

    Every floating-point tensor of the module that changes during training is averaged: trainable parameters and
    normalization layers' running statistics in every round, and any other floating-point tensor (an EMA teacher,
    a buffer user code updates) from the first flush that finds it changed; constant buffers (a causal mask) and
    frozen parameters send nothing. Tensors that user code replaces (SWA's BatchNorm reset,
    ``module.weight = nn.Parameter(...)``) are followed before the next batch. Right after every flush the module
    is bit-identical on every rank, or [`RanksDivergedError`][lightning_hpsgd.errors.RanksDivergedError] names the
    tensor that is not.

    Args:
        sync_every: ``H``, steps per round. A step is a batch that stepped an optimizer (``trainer.global_step``
            advanced): gradient accumulation counts optimizer steps, and a manual-optimization batch that steps two
            optimizers (a GAN) counts once, so a round always ends between batches, never between two ``step()``
            calls of one batch. Integer >= 1; default 1. Or ``"auto"``: start at
            1 and let the ranks choose ``H`` from what they measure (the smallest ``H`` whose ``H`` steps of compute
            hide one all-reduce, with a 25 % margin), agreed at every merge so that every rank ends rounds at the
            same steps. The current value is logged as ``hpsgd/sync_every``.
        max_sync_every: the largest ``H`` that ``sync_every="auto"`` may choose (default 32).
        sync_delay: ``τ``, optimizer steps from a round's launch to its merge, from 0 to ``H``. ``None`` (default):
            ``H``, the merge at the next sync point (the paper's rule). A smaller ``τ`` makes the merged average
            less stale (the staleness is ``τ`` steps, not ``H``) while the rank's progress since the launch is kept
            exactly; ``0`` is a blocking average (DiLoCo with the outer optimizer). ``"auto"``: the smallest ``τ``
            whose steps of compute hide one all-reduce, agreed by every rank like ``sync_every="auto"`` and logged
            as ``hpsgd/sync_delay``. Needs ``merge="replica"`` when below ``H``.
        fragments: ``F``, parts of the model (contiguous, near-equal slices of the flat parameters) whose rounds
            are launched at different steps: fragment ``f`` at the steps ``≡ ⌊f·H/F⌋ (mod H)``, each with its own
            pending round and merge, so that one ``1/F`` of the bytes is in flight at a time and the link stays
            busy. From 1 (default) to ``H``; needs an integer ``sync_every``.
        merge: ``"replica"`` (default; HPSGD, a rank's own progress stays visible at once: ``R ← G + Δ``) or
            ``"stale"`` (the naive stale-gradient pipeline: ``R ← G``; the paper's baseline).
        comm_dtype: dtype on the wire. ``None`` (default) sends full precision; ``torch.bfloat16`` /
            ``torch.float16`` (or ``"bf16"`` / ``"fp16"``) halve the bytes, while the global model is still
            accumulated in fp32 or wider.
        outer_lr: ``η``, the outer learning rate applied to each merged mean change (default 1.0).
        outer_momentum: ``μ`` in [0, 1), the outer optimizer's momentum on the merged mean changes (default 0.0).
            Momentum amplifies a steady change by up to ``1 / (1 − μ)``. The momentum buffer is the same on every
            rank and is checkpointed.
        outer_nesterov: Nesterov momentum (default ``True``). With ``outer_lr=1.0`` and ``outer_momentum=0.0``
            the outer optimizer is off: plain HPSGD, bit for bit.
        hierarchy: ``None`` (default): flat HPSGD, every rank (device) a worker with its own replica. ``"node"``:
            for nodes of several devices (fast link inside a node, slow link between nodes): inside a node the
            ranks average gradients at every step as DDP does (``DistributedDataParallel`` on a process group of
            the node's ranks, overlapped with backward), so node-mates hold one replica; across nodes HPSGD runs
            with each local rank all-reducing only its ``1/L`` share of the change (``L`` devices per node) with
            the same local rank on the other nodes, then the node all-gathers the shares. Every node needs the
            same number of devices.
        process_group_backend: ``"gloo"`` or ``"nccl"``; default: the accelerator's default, as in DDP.
        timeout: how long a collective may wait for a peer before the rank fails (a ``timedelta``, or seconds as a
            number). Default: PyTorch's default process group timeout (30 minutes), as in DDP.
        start_method: ``"popen"`` (default; re-runs the script per rank), ``"spawn"``, ``"fork"`` or
            ``"forkserver"``, as in DDP.
        monitor: add an [`HPSGDMonitor`][lightning_hpsgd.monitor.HPSGDMonitor] (``hpsgd/…`` metrics in every
            logger) during fit unless the Trainer already has one (default ``True``).
        accelerator: as in DDP; the ``Trainer`` sets it.
        parallel_devices: as in DDP; the ``Trainer`` sets it.
        cluster_environment: as in DDP; the ``Trainer`` sets it.
        checkpoint_io: as in DDP; the ``Trainer`` sets it.
        precision_plugin: as in DDP; the ``Trainer`` sets it.
        **kwargs: ``DistributedDataParallel``'s options (``find_unused_parameters=True``, ``static_graph``,
            ``bucket_cap_mb``, ...) for the node's gradient averaging with ``hierarchy="node"``, as
            ``DDPStrategy(**kwargs)`` takes them. Flat HPSGD never wraps the model, and warns that they are unused.
    """

    strategy_name = "hpsgd"

    def __init__(
        self,
        sync_every: int | Literal["auto"] = 1,
        merge: Literal["replica", "stale"] = "replica",
        comm_dtype: str | torch.dtype | None = None,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        outer_nesterov: bool = True,
        max_sync_every: int | None = None,
        sync_delay: int | Literal["auto"] | None = None,
        fragments: int = 1,
        hierarchy: Literal["node"] | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | float | None = timedelta(minutes=30),
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        monitor: bool = True,
        **kwargs: Any,
    ) -> None:
        self.set_rule_options(sync_every=sync_every, merge=merge, comm_dtype=comm_dtype, outer_lr=outer_lr,
                              outer_momentum=outer_momentum, outer_nesterov=outer_nesterov,
                              max_sync_every=max_sync_every, sync_delay=sync_delay, fragments=fragments,
                              hierarchy=hierarchy, warn=rank_zero_warn)  # fmt: skip
        timeout = validate_launch(start_method, timeout)
        if hierarchy is None and (changed := _changed_ddp_options(kwargs)):
            rank_zero_warn(f"HPSGD: DDP options {changed} have no effect without hierarchy='node'.")
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method, **kwargs)  # fmt: skip
        self.monitor = monitor
        self._groups: process_groups.RunGroups | None = None
        self._engine: HPSGDEngine | None = None
        self._stops: StopCoordinator | None = None
        self._watcher: ModelWatcher | None = None
        self._hooks: list[Callback] = []  # the callbacks this fit added, and the list they were added to
        self._callback_list: list[Callback] = []
        self._saved = SavedEngineState()
        self._steps = 0  # batches that stepped an optimizer, this run
        self._seen_global_step = 0
        self._last_stats: EngineStats | None = None

    @property
    def engine(self) -> HPSGDEngine | None:
        """The engine of the current fit, or ``None`` outside ``trainer.fit``."""
        return self._engine

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The options that define this run's algorithm, for loggers' run configs (``HPSGDMonitor`` logs them)."""
        return {
            **self.rule_hyperparameters(),
            "process_group_backend": self.process_group_backend,
            "timeout_s": self._timeout.total_seconds() if self._timeout is not None else None,
        }

    @property
    def stats(self) -> EngineStats | None:
        """The engine's counters (rounds, flushes, wait): of the current fit, or of the last one after it ended."""
        return self._engine.stats if self._engine is not None else self._last_stats

    def receive_stats(self, values: dict[str, Any]) -> None:
        """Take the counters of a fit that ran in child processes (the spawn and fork launchers send them)."""
        self._last_stats = EngineStats.from_dict(values)

    # ------------------------------------------------------------------ lifecycle

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = compat.StatsCarryingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        created = not (dist.is_available() and dist.is_initialized())
        super().setup_environment()
        if created and dist.is_available() and dist.is_initialized():
            process_groups.destroy_default_group_at_exit()

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            if self._groups is None:
                node_rank = self.node_rank if self.hierarchy == "node" else None
                self._groups = process_groups.RunGroups(self.process_group_backend, self._timeout, node_rank)
            self.model = _sync_batchnorm(self.model, self._layer_sync, self._groups.nodes)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            reject_unsupported_model(self.model)
            self.setup_optimizers(trainer)
            reject_sharded_optimizers(self.optimizers)
            self._start_engine(trainer)
            self.configure_ddp()  # the node's wrapper, through `_setup_model`
        else:
            compat.sync_module_states(self.model)
        self.setup_precision_plugin()
        if fitting:
            compat.optimizers_to_device(self.optimizers, self.root_device)

    @override
    def _setup_model(self, model: Module) -> Module:
        """``hierarchy="node"`` with several devices per node: DDP on the node's group averages gradients; flat
        HPSGD never wraps the model."""
        nodes = self._groups.nodes if self._groups is not None else None
        if nodes is None or nodes.node is None:
            return model
        self._ddp_kwargs["process_group"] = nodes.node
        return super()._setup_model(model)

    @override
    def _register_ddp_hooks(self) -> None:
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            super()._register_ddp_hooks()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Runs after users' hooks, so it sees a replaced tensor or a (un)freeze before the batch trains.
        self._follow_model()

    def _end_batch(self, trainer: Trainer) -> None:
        """A batch ended: if it stepped an optimizer (once or more), it is one step of the engine."""
        if self._engine is None or trainer.global_step == self._seen_global_step:
            return
        self._seen_global_step = trainer.global_step
        self._steps += 1
        self._engine.on_optimizer_step(self._steps)

    @override
    def on_train_end(self) -> None:
        # After every callback's and the module's `on_train_end`: SWA, for one, writes its average there.
        self.flush("end of fit, after every on_train_end hook")

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Lightning reads the model's state first when it dumps a checkpoint, on every rank.
        self.flush("checkpoint")
        return super().lightning_module_state_dict()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        # Also after fit (`trainer.save_checkpoint` once training is done): the optimizers still hold per-rank state.
        if self._stops is not None and self._stops.abandoned:
            checkpoint[CHECKPOINT_KEY] = abandoned_entry(self.world_size, "training stopped with an exception")
            rank_zero_warn(
                f"HPSGD: {filepath} is written after an error, without a flush: it holds rank 0's unmerged replica."
                " Resume from the last checkpoint written during training; fit refuses this one."
            )
        elif "optimizer_states" in checkpoint and self.optimizers and dist.is_initialized():
            engine_state = self._engine.state_dict() if self._engine is not None else self._saved.last_fit
            groups = self._groups
            nodes = groups.nodes if groups is not None else None
            checkpoint[CHECKPOINT_KEY] = gather_per_rank_state(
                [_unwrap(opt) for opt in self.optimizers], self.precision_plugin, engine_state,
                groups.objects if groups is not None else None, nodes.local_size if nodes is not None else 1,
            )  # fmt: skip
            checkpoint[CHECKPOINT_KEY]["steps"] = self._steps
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # Lightning reads the file before `setup` builds the engine, which then starts from the saved state.
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        self._saved.read(checkpoint, fitting, checkpoint_path)
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None or "optimizer_states" not in saved:
            # A checkpoint from DDP (or any strategy whose ranks share one optimizer state).
            super().load_optimizer_state_dict(checkpoint)
            return
        nodes = self._groups.nodes if self._groups is not None else None
        local_size = nodes.local_size if nodes is not None else 1
        optimizers = [_unwrap(opt) for opt in self.optimizers]
        restore_per_rank_state(saved, optimizers, self.precision_plugin, self.global_rank, self.world_size, local_size)
        compat.optimizers_to_device(optimizers, self.root_device)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self._stops is not None and self._stops.abandoned:
            return  # after an error a peer may never arrive (OnExceptionCheckpoint calls this)
        super().barrier(*args, **kwargs)

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if self._stops is not None:
            self._stops.stop_or_abandon(exception)

    @override
    def teardown(self) -> None:
        engine = self._engine
        if engine is not None and not engine.aborted:
            if engine.needs_flush:
                self.flush("teardown")
            self._saved.last_fit = engine.state_dict()
        if engine is not None:
            self._last_stats = engine.stats
        self._engine = None
        for callback in self._hooks:
            if callback in self._callback_list:
                self._callback_list.remove(callback)
        self._hooks = []
        if self._stops is not None:
            self._stops.remove()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: compat.StrategyRegistry) -> None:
        for name, options in REGISTERED_NAMES.items():
            description = f"HPSGD strategy with merge={options['merge']!r}, start_method={options['start_method']!r}"
            strategy_registry.register(name, cls, description=description, override=True, **options)

    # ------------------------------------------------------------------ helpers

    def flush(self, reason: str = "request") -> None:
        """Bring every rank to the same model with nothing in flight (a collective: call it on every rank).

        Does nothing outside ``fit`` or after an error abandoned the engine.
        """
        if self._engine is None or self._engine.aborted:
            return
        self._follow_model()
        self._engine.flush(self._steps)
        log.debug(f"{self.__class__.__name__}: flushed at step {self._steps} ({reason})")

    def _start_engine(self, trainer: Trainer) -> None:
        assert self._groups is not None
        module = self.lightning_module
        state, steps = self._saved.take()
        self._engine = HPSGDEngine(
            model_tensors(module), averaged_names(module), trained=trained_names(module),
            group=self._groups.rounds, object_group=self._groups.objects, timeout=self._timeout,
            nodes=self._groups.nodes, **self.engine_options(),
        )  # fmt: skip
        if state is not None:
            self._engine.load_state_dict(state)
        # A checkpoint of an older release (or of DDP) has no step count: every batch then stepped once.
        self._steps = steps if steps is not None else trainer.global_step
        self._seen_global_step = trainer.global_step
        self._watcher = ModelWatcher(module)
        self._hooks = [_HPSGDHooks(self)]
        trainer.callbacks.insert(0, self._hooks[0])
        self._callback_list = trainer.callbacks
        if self.monitor and not any(isinstance(cb, HPSGDMonitor) for cb in trainer.callbacks):
            self._hooks.append(HPSGDMonitor())
            trainer.callbacks.append(self._hooks[-1])
        launcher = self.launcher
        self._stops = StopCoordinator(
            lambda: self._engine, trainer, rank=self.global_rank, world_size=self.world_size,
            kill_children=lambda signum: launcher.kill(signum) if launcher is not None else None,
            flush=self.flush, forget_groups=self._groups.forget,
        )  # fmt: skip

    def _follow_model(self) -> None:
        """Hand the engine the module's tensors again if any was replaced, (un)frozen, added or removed."""
        module = self.lightning_module
        if self._engine is None or self._engine.aborted or self._watcher is None or not self._watcher.changed(module):
            return
        wrapped = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        if wrapped and self._watcher.parameters_replaced(module):
            raise ValueError(
                "HPSGD: a parameter of the module was replaced or added during fit. With hierarchy='node', the node's"
                " gradient averaging (DDP) cannot follow a new parameter object; assign to `param.data` instead, or"
                " use hierarchy=None."
            )
        rewrap = wrapped and self._watcher.trained_changed(module)
        self._engine.follow(model_tensors(module), averaged_names(module), self._steps, trained_names(module))
        if rewrap:
            # DDP averages only the parameters that required grad when it was built: build it again, after the
            # flush that `follow` ran, so node-mates average the (un)frozen ones from this batch on.
            self.model = self._setup_model(module)
        self._watcher.accept(module)


class _HPSGDHooks(Callback):
    """Runs before user callbacks (it is inserted first), since Lightning calls callbacks' hooks before the
    strategy's: a user's ``on_train_end`` or ``on_validation_start`` sees the flushed model; a batch's end is a step
    of the engine before any user callback (``ModelCheckpoint``) runs; and, before any ``on_exception`` callback
    (``OnExceptionCheckpoint``), an agreed stop is flushed or the engine is abandoned, so that no collective starts.
    """

    def __init__(self, strategy: HPSGDStrategy) -> None:
        self._strategy = strategy

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._strategy._end_batch(trainer)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._strategy.flush("validation start")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._strategy.flush("end of fit")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._strategy._stops is not None:
            self._strategy._stops.stop_or_abandon(exception)


def _sync_batchnorm(model: Module, layer_sync: LayerSync | None, nodes: NodeGroups | None) -> Module:
    """``sync_batchnorm=True``: with ``hierarchy="node"``, on the node's group (node-mates are synchronous anyway);
    flat, on every rank, with a warning that it costs a collective per forward pass."""
    if not layer_sync:
        return model
    if nodes is not None:
        return SyncBatchNorm.convert_sync_batchnorm(model, process_group=nodes.node) if nodes.node else model
    rank_zero_warn(
        "HPSGD: sync_batchnorm=True makes every forward pass wait for the other ranks, which HPSGD cannot"
        " hide behind compute. BatchNorm statistics are averaged at every sync point without it."
    )
    return layer_sync.apply(model)


def _changed_ddp_options(kwargs: dict[str, Any]) -> list[str]:
    """The DDP options in ``kwargs`` set to something other than their defaults (LightningCLI passes every one)."""
    defaults = {
        name: p.default
        for fn in (DDPStrategy.__init__, torch.nn.parallel.DistributedDataParallel.__init__)
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return sorted(k for k, v in kwargs.items() if k not in defaults or v is not defaults[k] and v != defaults[k])


def _unwrap(optimizer: Optimizer) -> Optimizer:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
