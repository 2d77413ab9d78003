"""``HPSGDStrategy``: Lightning's lifecycle mapped onto the HPSGD engine.

* setup → build the engine (broadcast and initialise);
* before each batch → follow tensors that user code replaced or froze ([`HPSGDEngine.follow`][]);
* optimizer step → sync point;
* validation start, checkpoint, end of fit and teardown → flush;
* an agreed stop (SIGTERM, time limit) → flush, then Lightning's own stop; any other exception → abandon.

The rule lives in [`lightning_hpsgd.engine`][], what Lightning does not expose in [`lightning_hpsgd.compat`][],
and what a checkpoint holds in [`lightning_hpsgd.checkpoint`][].
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from datetime import timedelta
from itertools import chain
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hpsgd import compat, process_groups
from lightning_hpsgd.checkpoint import (
    CHECKPOINT_KEY,
    gather_per_rank_state,
    restore_per_rank_state,
    saved_engine_state,
)
from lightning_hpsgd.engine import (
    DEFAULT_MAX_SYNC_EVERY,
    EngineStats,
    HPSGDEngine,
    MergeMode,
    NodeGroups,
    StopRequest,
    resolve_comm_dtype,
    validate_options,
)
from lightning_hpsgd.monitor import HPSGDMonitor
from lightning_hpsgd.refusals import reject_sharded_optimizers, reject_unsupported_model

log = logging.getLogger(__name__)

# The names ``Trainer(strategy=...)`` accepts, and the options each stands for.
REGISTERED_NAMES: dict[str, dict[str, str]] = {
    "hpsgd": {"start_method": "popen", "merge": "replica"},
    "hpsgd_spawn": {"start_method": "spawn", "merge": "replica"},
    "hpsgd_fork": {"start_method": "fork", "merge": "replica"},
    "hpsgd_notebook": {"start_method": "fork", "merge": "replica"},
    "hpsgd_stale": {"start_method": "popen", "merge": "stale"},
}


class HPSGDStrategy(DDPStrategy):
    """Hierarchical Parallel SGD: each rank trains its own replica while the previous round's average is in flight.

    A subclass of Lightning's ``DDPStrategy`` that reuses its launchers, cluster
    environments and distributed samplers, but never wraps the model in ``DistributedDataParallel``: gradients
    stay local, and every ``sync_every`` optimizer steps the rank's change is all-reduced on a process group of its
    own, overlapped with the next steps (see the algorithm page of the documentation).

    Every floating-point tensor of the module that changes during training is averaged: trainable parameters and
    floating-point buffers in every round, and frozen tensors (an EMA teacher) from the first flush that finds them
    changed. Tensors that user code replaces (SWA's BatchNorm reset, ``module.weight = nn.Parameter(...)``) are
    followed before the next batch. Right after every flush the module is bit-identical on every rank, or
    [`RanksDivergedError`][lightning_hpsgd.engine.RanksDivergedError] names the tensor that is not.

    Args:
        sync_every: ``H``, optimizer steps per round, counted as ``trainer.global_step`` counts them (so gradient
            accumulation and manual optimization count correctly). Integer >= 1; default 1. Or ``"auto"``: start at
            1 and let the ranks choose ``H`` from what they measure (the smallest ``H`` whose ``H`` steps of compute
            hide one all-reduce, with a 25 % margin), agreed at every merge so that every rank ends rounds at the
            same steps. The current value is logged as ``hpsgd/sync_every``.
        max_sync_every: the largest ``H`` that ``sync_every="auto"`` may choose (default 32).
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
    """

    strategy_name = "hpsgd"

    def __init__(
        self,
        sync_every: int | Literal["auto"] = 1,
        merge: MergeMode = "replica",
        comm_dtype: str | torch.dtype | None = None,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        outer_nesterov: bool = True,
        max_sync_every: int = DEFAULT_MAX_SYNC_EVERY,
        hierarchy: Literal["node"] | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | float | None = compat.default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        monitor: bool = True,
    ) -> None:
        validate_options(
            sync_every,
            merge,
            max_sync_every=max_sync_every,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            outer_nesterov=outer_nesterov,
            hierarchy=hierarchy,
        )
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(
                f"start_method must be one of ['popen', 'spawn', 'fork', 'forkserver']; received {start_method!r}."
            )
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            timeout = timedelta(seconds=timeout)
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
            raise ValueError(f"timeout must be a positive timedelta or number of seconds; received {timeout!r}.")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.sync_every = sync_every
        self.max_sync_every = max_sync_every
        self.merge = merge
        self.comm_dtype = resolve_comm_dtype(comm_dtype)
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.outer_nesterov = outer_nesterov
        self.monitor = monitor
        self.hierarchy = hierarchy
        self._node_groups: NodeGroups | None = None
        self._engine: HPSGDEngine | None = None
        self._hpsgd_group: dist.ProcessGroup | None = None
        self._object_group: dist.ProcessGroup | None = None
        self._added_callbacks: list[Callback] = []
        self._callback_list: list[Callback] = []  # the Trainer's list they were added to
        self._patches: compat.StopPatches | None = None
        self._signature: tuple = ()
        self._wrapped_parameters: list[int] = []
        self._abandoned = False
        self._exception_handled = False
        # Engine state read from a checkpoint (resume), used once by the next engine; and the last engine's state,
        # used only by `trainer.save_checkpoint` after fit. Neither ever reaches another fit's engine otherwise.
        self._engine_state_to_load: dict[str, Any] | None = None
        self._final_engine_state: dict[str, Any] | None = None
        self._last_stats: EngineStats | None = None

    @property
    def engine(self) -> HPSGDEngine | None:
        """The engine of the current fit, or ``None`` outside ``trainer.fit``."""
        return self._engine

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The options that define this run's algorithm, for loggers' run configs (``HPSGDMonitor`` logs them)."""
        return {
            "name": "hpsgd" if self.merge == "replica" else "hpsgd_stale",
            "sync_every": self.sync_every,
            "max_sync_every": self.max_sync_every,
            "merge": self.merge,
            "comm_dtype": None if self.comm_dtype is None else str(self.comm_dtype).removeprefix("torch."),
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "outer_nesterov": self.outer_nesterov,
            "hierarchy": self.hierarchy,
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
        if fitting and self._layer_sync:
            rank_zero_warn(
                "HPSGD: sync_batchnorm=True makes every forward pass wait for the other ranks, which HPSGD cannot"
                " hide behind compute. BatchNorm statistics are averaged at every sync point without it."
            )
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            reject_unsupported_model(self.model)
            self.setup_optimizers(trainer)
            reject_sharded_optimizers(self.optimizers)
            self._start_engine(trainer)
            self._wrap_for_the_node()
        else:
            compat.sync_module_states(self.model)
        self.setup_precision_plugin()
        if fitting:
            compat.optimizers_to_device(self.optimizers, self.root_device)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Runs after users' hooks, so it sees a replaced tensor or a (un)freeze before the batch trains.
        self._follow_model()

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._engine is not None:
            # Lightning counts this step into `global_step` after this call returns.
            self._engine.on_optimizer_step(self._global_step() + 1)
        return output

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
        if "optimizer_states" in checkpoint and self.optimizers and dist.is_initialized() and not self._abandoned:
            engine_state = self._engine.state_dict() if self._engine is not None else self._final_engine_state
            checkpoint[CHECKPOINT_KEY] = gather_per_rank_state(
                [_unwrap(opt) for opt in self.optimizers], self.precision_plugin, engine_state, self._object_group
            )
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # Lightning reads the file before `setup` builds the engine, which then starts from the saved state.
        self._engine_state_to_load = saved_engine_state(checkpoint)
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None or "optimizer_states" not in saved:
            # A checkpoint from DDP (or any strategy whose ranks share one optimizer state).
            super().load_optimizer_state_dict(checkpoint)
            return
        if saved["world_size"] != self.world_size:
            rank_zero_warn(
                f"HPSGD: the checkpoint was written by {saved['world_size']} ranks and is resumed on"
                f" {self.world_size}. Each rank starts from the mean of the saved per-rank optimizer states"
                " (momentum, Adam moments), so the run will not continue exactly as the original would have."
            )
        optimizers = [_unwrap(opt) for opt in self.optimizers]
        restore_per_rank_state(saved, optimizers, self.precision_plugin, self.global_rank, self.world_size)
        compat.optimizers_to_device(optimizers, self.root_device)

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._stop_or_abandon(exception)

    @override
    def teardown(self) -> None:
        engine = self._engine
        if engine is not None and not engine.aborted:
            if engine.needs_flush:
                self.flush("teardown")
            self._final_engine_state = engine.state_dict()
        if engine is not None:
            self._last_stats = engine.stats
        self._engine = None
        self._wrapped_parameters = []
        for callback in self._added_callbacks:
            if callback in self._callback_list:
                self._callback_list.remove(callback)
        self._added_callbacks = []
        if self._patches is not None:
            self._patches.remove()
            self._patches = None
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
        step = self._global_step()
        self._engine.flush(step)
        log.debug(f"{self.__class__.__name__}: flushed at step {step} ({reason})")

    def _start_engine(self, trainer: Trainer) -> None:
        if self._hpsgd_group is None:
            self._hpsgd_group = process_groups.new_group(self.process_group_backend, self._timeout)
            # Checkpoint state is gathered as pickled CPU objects: over gloo, never through rank 0's GPU memory.
            if self.process_group_backend != "gloo":
                self._object_group = process_groups.new_group("gloo", self._timeout)
            if self.hierarchy == "node":
                self._node_groups = process_groups.node_groups(
                    self.node_rank, self.process_group_backend, self._timeout
                )
        tensors = self._model_tensors()
        self._engine = HPSGDEngine(
            tensors,
            _averaged_names(self.lightning_module),
            group=self._hpsgd_group,
            object_group=self._object_group,
            sync_every=self.sync_every,
            max_sync_every=self.max_sync_every,
            merge=self.merge,
            comm_dtype=self.comm_dtype,
            outer_lr=self.outer_lr,
            outer_momentum=self.outer_momentum,
            outer_nesterov=self.outer_nesterov,
            timeout=self._timeout,
            nodes=self._node_groups,
        )
        self._signature = _signature(self.lightning_module)
        if self._engine_state_to_load is not None:
            self._engine.load_state_dict(self._engine_state_to_load)
        self._engine_state_to_load = None
        self._final_engine_state = None
        self._abandoned = False
        self._exception_handled = False
        flush_first = _FlushFirst(self)
        trainer.callbacks.insert(0, flush_first)
        self._added_callbacks = [flush_first]
        self._callback_list = trainer.callbacks
        if self.monitor and not any(isinstance(cb, HPSGDMonitor) for cb in trainer.callbacks):
            self._added_callbacks.append(HPSGDMonitor())
            trainer.callbacks.append(self._added_callbacks[-1])
        self._patches = compat.StopPatches(trainer, self._raise_if_stopping, self._on_sigterm, self._check_time)

    def _wrap_for_the_node(self) -> None:
        """``hierarchy="node"`` with several devices per node: DDP on the node's group averages gradients."""
        nodes = self._node_groups
        if nodes is None or nodes.node is None:
            return
        device_ids = self.determine_ddp_device_ids()
        ctx = torch.cuda.stream(torch.cuda.Stream()) if device_ids is not None else nullcontext()
        with ctx:
            self.model = DistributedDataParallel(
                module=self.lightning_module, device_ids=device_ids, process_group=nodes.node, **self._ddp_kwargs
            )
        # DDP's reducer holds these parameter objects: a parameter replaced later would silently stop being
        # averaged inside the node, so `_follow_model` refuses it.
        self._wrapped_parameters = [id(p) for p in self.lightning_module.parameters()]

    def _model_tensors(self) -> dict[str, Tensor]:
        module = self.lightning_module
        assert module is not None
        return dict(chain(module.named_parameters(), module.named_buffers()))

    def _follow_model(self) -> None:
        """Hand the engine the module's tensors again if any was replaced, (un)frozen, added or removed."""
        if self._engine is None or self._engine.aborted:
            return
        signature = _signature(self.lightning_module)
        if signature != self._signature:
            if self._wrapped_parameters and [id(p) for p in self.lightning_module.parameters()] != (
                self._wrapped_parameters
            ):
                raise ValueError(
                    "HPSGD: a parameter of the module was replaced or added during fit. With hierarchy='node', the"
                    " node's gradient averaging (DDP) cannot follow a new parameter object; assign to"
                    " `param.data` instead, or use hierarchy=None."
                )
            self._engine.follow(self._model_tensors(), _averaged_names(self.lightning_module), self._global_step())
            self._signature = signature

    def _raise_if_stopping(self) -> None:
        """Before each batch is fetched (where Lightning broadcast the SIGTERM flag): stop if the ranks agreed."""
        engine = self._engine
        if engine is not None and engine.stop_requested & StopRequest.ABORT:
            trainer = self.lightning_module.trainer
            log.warning(
                f"HPSGD (rank {self.global_rank}): a rank received SIGTERM; every rank stops after optimizer step"
                f" {trainer.global_step}."
            )
            compat.mark_sigterm(trainer)
            raise SIGTERMException()

    def _on_sigterm(self, signum: Any, frame: Any) -> None:
        log.info(f"HPSGD (rank {self.global_rank}): received SIGTERM")
        engine = self._engine
        first = engine is None or not engine.stop_sent & StopRequest.ABORT
        if first and self.launcher is not None:
            self.launcher.kill(signum)  # as Lightning's handler does: pass it to the launcher's children
        if engine is None or engine.aborted or self.world_size == 1:
            # No round carries it (or nobody to agree with): Lightning's own stop after the current batch.
            compat.mark_sigterm(self.lightning_module.trainer)
        if engine is not None and not engine.aborted:
            engine.request_stop(StopRequest.ABORT)

    def _check_time(self, timer: Timer, trainer: Trainer) -> None:
        """``Trainer(max_time=...)``: the time limit agreed in the side channel, not by a broadcast every batch.

        Each rank checks its own clock, and a rank past the limit asks the others through the next round; every
        rank then stops after the same step, up to two rounds past the limit.
        """
        engine = self._engine
        if engine is None or engine.aborted:
            compat.lightning_time_check(timer, trainer)
            return
        if compat.timer_limit_reached(timer):
            engine.request_stop(StopRequest.FINISH)
        if engine.stop_requested & StopRequest.FINISH and not trainer.should_stop:
            trainer.should_stop = True
            if compat.timer_is_verbose(timer):
                elapsed = timedelta(seconds=int(timer.time_elapsed()))
                rank_zero_info(f"Time limit reached. Elapsed time is {elapsed}. Signaling Trainer to stop.")

    def _stop_or_abandon(self, exception: BaseException) -> None:
        """An agreed stop flushes (every rank is at the same batch boundary); anything else abandons."""
        if self._exception_handled:
            return
        self._exception_handled = True
        engine = self._engine
        agreed = (
            isinstance(exception, SIGTERMException)
            and engine is not None
            and not engine.aborted
            and bool(engine.stop_requested & StopRequest.ABORT)
        )
        if agreed:
            self.flush("agreed stop")
            return
        self._abandon(exception)

    def _abandon(self, exception: BaseException) -> None:
        self._abandoned = True
        nodes = self._node_groups
        process_groups.forget(self._hpsgd_group, self._object_group, *((nodes.node, nodes.across) if nodes else ()))
        if self._engine is None or self._engine.aborted:
            return
        self._engine.abandon()
        # Every rank speaks here: the exception may have hit any one of them.
        warnings.warn(
            f"HPSGD (rank {self.global_rank}): training stopped with {type(exception).__name__} after optimizer step"
            f" {self._global_step()}."
            " Replicas were not flushed (a collective after an error can hang), so local progress since the last"
            " flush point is not in the global model. Resume from the last checkpoint.",
            stacklevel=2,
        )

    def _global_step(self) -> int:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return trainer.global_step if trainer is not None else 0


class _FlushFirst(Callback):
    """Flushes before user callbacks run, since Lightning calls callbacks' hooks before the strategy's.

    Inserted first in ``trainer.callbacks`` during fit, so a user's ``on_train_end`` or ``on_validation_start``
    sees the flushed model; and, before any ``on_exception`` callback (for example ``OnExceptionCheckpoint``) runs,
    flushes an agreed stop or marks the engine abandoned after any other exception, so that no collective starts.
    """

    def __init__(self, strategy: HPSGDStrategy) -> None:
        self._strategy = strategy

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._strategy.flush("validation start")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._strategy.flush("end of fit")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._strategy._stop_or_abandon(exception)


def _averaged_names(model: Module) -> set[str]:
    """Averaged in every round: trainable parameters and floating-point buffers (BatchNorm statistics)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return names | {name for name, b in model.named_buffers() if b.is_floating_point()}


def _signature(model: Module) -> tuple:
    """Cheap, per batch: which storage each tensor has, and which parameters train."""
    return tuple((t.data_ptr(), t.requires_grad) for t in _tensors(model))


def _tensors(model: Module) -> Iterator[Tensor]:
    return chain(model.parameters(), model.buffers())


def _unwrap(optimizer: Optimizer) -> Optimizer:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
