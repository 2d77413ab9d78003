"""``HPSGDStrategy``: Lightning's lifecycle mapped onto the HPSGD engine.

setup → broadcast and initialise; optimizer step → sync point; validation start, checkpoint, end of fit and
teardown → flush. The maths lives in :mod:`lightning_hpsgd.engine`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hpsgd.engine import (
    EngineStats,
    HPSGDEngine,
    MergeMode,
    StopRequest,
    resolve_comm_dtype,
    validate_options,
)
from lightning_hpsgd.monitor import HPSGDMonitor
from lightning_hpsgd.optim_state import gather_to_rank0, mean_of_states, to_cpu

log = logging.getLogger(__name__)

# The process groups this module created and whose collectives all completed, destroyed at interpreter exit.
_OWN_GROUPS: dict[int, dist.ProcessGroup] = {}
# Whether the default group was created for an HPSGD run (by Lightning, in setup_environment) and that run did
# not end in an error: then it is destroyed at exit too, as PyTorch asks of every script and Lightning does not.
_DEFAULT_GROUP = {"destroy_at_exit": False}


@atexit.register
def _destroy_own_groups() -> None:
    """Destroy HPSGD's process groups while the interpreter is still whole.

    Otherwise gloo's worker threads can release a finished all-reduce (and its tensors) during interpreter shutdown,
    when they can no longer take the GIL, and the process aborts at exit ("terminate called without an active
    exception") although training succeeded. Groups with abandoned work are left to the OS: destroying them would
    wait for the stuck collective. A default group that Lightning created for an HPSGD run that ended without an
    error goes too; one the user created is the user's.
    """
    groups = list(_OWN_GROUPS.values())
    _OWN_GROUPS.clear()
    for group in groups:
        if dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError) as err:  # already destroyed with the default group
                log.debug("HPSGD: could not destroy its process group at exit: %s", err)
    if _DEFAULT_GROUP["destroy_at_exit"] and dist.is_initialized():
        _DEFAULT_GROUP["destroy_at_exit"] = False
        dist.destroy_process_group()


CHECKPOINT_KEY = "hpsgd"


class HPSGDStrategy(DDPStrategy):
    """Hierarchical Parallel SGD: each rank trains its own replica while the previous round's average is in flight.

    A subclass of :class:`~lightning.pytorch.strategies.DDPStrategy` that reuses its launchers, cluster
    environments and distributed samplers, but never wraps the model in ``DistributedDataParallel``: gradients
    stay local, and every ``sync_every`` optimizer steps the rank's change is all-reduced on a process group of its
    own, overlapped with the next steps (see ``HPSGD.md``).

    Args:
        sync_every: ``H``, optimizer steps per round, counted as ``trainer.global_step`` counts them (so gradient
            accumulation and manual optimization count correctly). Integer >= 1; default 1.
        merge: ``"replica"`` (default; HPSGD, a rank's own progress stays visible at once: ``R ← G + Δ``) or
            ``"stale"`` (the naive stale-gradient pipeline: ``R ← G``; the paper's baseline).
        comm_dtype: dtype on the wire. ``None`` (default) sends full precision; ``torch.bfloat16`` /
            ``torch.float16`` (or ``"bf16"`` / ``"fp16"``) halve the bytes, while the global model is still
            accumulated in fp32 or wider.
        process_group_backend: ``"gloo"`` or ``"nccl"``; default: the accelerator's default, as in DDP.
        timeout: how long a collective may wait for a peer before the rank fails (a ``timedelta``, or seconds as a
            number). Default: PyTorch's default process group timeout (30 minutes), as in DDP.
        start_method: ``"popen"`` (default; re-runs the script per rank), ``"spawn"``, ``"fork"`` or
            ``"forkserver"``, as in DDP.
        monitor: add an :class:`~lightning_hpsgd.monitor.HPSGDMonitor` (``hpsgd/…`` metrics in every logger) during
            fit unless the Trainer already has one (default ``True``).
        accelerator: as in DDP; the ``Trainer`` sets it.
        parallel_devices: as in DDP; the ``Trainer`` sets it.
        cluster_environment: as in DDP; the ``Trainer`` sets it.
        checkpoint_io: as in DDP; the ``Trainer`` sets it.
        precision_plugin: as in DDP; the ``Trainer`` sets it.
    """

    strategy_name = "hpsgd"

    def __init__(
        self,
        sync_every: int = 1,
        merge: MergeMode = "replica",
        comm_dtype: str | torch.dtype | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | float | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        monitor: bool = True,
    ) -> None:
        validate_options(sync_every, merge)
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
        self.merge = merge
        self.comm_dtype = resolve_comm_dtype(comm_dtype)
        self.monitor = monitor
        self._added_callbacks: list[Callback] = []
        self._engine: HPSGDEngine | None = None
        self._last_stats: EngineStats | None = None
        self._hpsgd_group: dist.ProcessGroup | None = None
        self._object_group: dist.ProcessGroup | None = None
        self._trainable: tuple[bool, ...] = ()
        self._abandoned = False
        self._patched: list[tuple[object, str]] = []  # (object, attribute) whose instance override teardown removes
        # G of a narrow (bf16/fp16) replica keeps bits the model cannot hold; carried across checkpoints and
        # engine rebuilds so that a resume continues exactly.
        self._global_state: dict[str, torch.Tensor] | None = None

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
            "merge": self.merge,
            "comm_dtype": None if self.comm_dtype is None else str(self.comm_dtype).removeprefix("torch."),
            "process_group_backend": self.process_group_backend,
            "timeout_s": self._timeout.total_seconds() if self._timeout is not None else None,
        }

    @property
    def stats(self) -> EngineStats | None:
        """The engine's counters (rounds, flushes, wait): of the current fit, or of the last one after it ended."""
        return self._engine.stats if self._engine is not None else self._last_stats

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup_environment(self) -> None:
        created = not (dist.is_available() and dist.is_initialized())
        super().setup_environment()
        if created and dist.is_available() and dist.is_initialized():
            _DEFAULT_GROUP["destroy_at_exit"] = True

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
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
            _reject_wrapped_modules(self.model)
            self.setup_optimizers(trainer)
            _reject_sharded_optimizers(self.optimizers)
            self._engine = self._build_engine()
            self._abandoned = False
            flush_first = _FlushFirst(self)
            trainer.callbacks.insert(0, flush_first)
            self._added_callbacks = [flush_first]
            if self.monitor and not any(isinstance(cb, HPSGDMonitor) for cb in trainer.callbacks):
                self._added_callbacks.append(HPSGDMonitor())
                trainer.callbacks.append(self._added_callbacks[-1])
            self._replace_per_batch_collectives(trainer)
        else:
            _sync_module_states(self.model)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Runs after users' hooks, so it sees a freeze or unfreeze (e.g. BackboneFinetuning) before the batch trains.
        if self._engine is not None and self._trainable != _trainable_flags(self.model):
            self.flush("trainable parameters changed")
            self._global_state = self._engine.global_state() if self._engine.replica_is_narrow else None
            previous = self._engine
            self._engine = self._build_engine()
            self._engine.stats = previous.stats
            self._engine.stop_requested = previous.stop_requested
            self._engine.request_stop(previous.stop_sent)

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
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Lightning reads the model's state first when it dumps a checkpoint, on every rank.
        self.flush("checkpoint")
        return super().lightning_module_state_dict()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        # Also after fit (`trainer.save_checkpoint` once training is done): the optimizers still hold per-rank state.
        if "optimizer_states" in checkpoint and self.optimizers and dist.is_initialized() and not self._abandoned:
            checkpoint[CHECKPOINT_KEY] = self._gather_per_rank_state()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # Lightning reads the file before `setup` builds the engine, which then starts from the saved G.
        self._global_state = checkpoint.get(CHECKPOINT_KEY, {}).get("global")
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            # A checkpoint from DDP (or any strategy whose ranks share one optimizer state).
            super().load_optimizer_state_dict(checkpoint)
            return
        per_rank = saved["optimizer_states"]
        if saved["world_size"] == self.world_size:
            states = per_rank[self.global_rank]
            # Lightning restored rank 0's precision state (a GradScaler's scale); each rank takes back its own.
            precision_state = saved.get("precision_states", [None] * self.world_size)[self.global_rank]
            if precision_state:
                self.precision_plugin.load_state_dict(precision_state)
        else:
            rank_zero_warn(
                f"HPSGD: the checkpoint was written by {saved['world_size']} ranks and is resumed on"
                f" {self.world_size}. Each rank starts from the mean of the saved per-rank optimizer states"
                " (momentum, Adam moments), so the run will not continue exactly as the original would have."
            )
            states = [mean_of_states([rank_states[i] for rank_states in per_rank]) for i in range(len(per_rank[0]))]
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)
            _optimizers_to_device([optimizer], self.root_device)

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._abandon(exception)

    @override
    def teardown(self) -> None:
        if self._engine is not None and not self._engine.aborted and self._engine.needs_flush:
            self.flush("teardown")
        if self._engine is not None and self._engine.replica_is_narrow and not self._engine.aborted:
            self._global_state = self._engine.global_state()  # for `trainer.save_checkpoint` after fit
        if self._engine is not None:
            self._last_stats = self._engine.stats
        self._engine = None
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        for callback in self._added_callbacks:
            if trainer is not None and callback in trainer.callbacks:
                trainer.callbacks.remove(callback)
        self._added_callbacks = []
        for owner, name in self._patched:
            owner.__dict__.pop(name, None)
        self._patched = []
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        entries = (
            ("hpsgd", "popen", "replica"),
            ("hpsgd_spawn", "spawn", "replica"),
            ("hpsgd_fork", "fork", "replica"),
            ("hpsgd_notebook", "fork", "replica"),
            ("hpsgd_stale", "popen", "stale"),
        )
        for name, start_method, merge in entries:
            strategy_registry.register(
                name,
                cls,
                description=f"HPSGD strategy with merge={merge!r} and start_method={start_method!r}",
                override=True,
                start_method=start_method,
                merge=merge,
            )

    # ------------------------------------------------------------------ helpers

    def flush(self, reason: str = "request") -> None:
        """Bring every rank to the same model with nothing in flight (a collective: call it on every rank).

        Does nothing outside ``fit`` or after an error abandoned the engine.
        """
        if self._engine is None or self._engine.aborted:
            return
        step = self._global_step()
        self._engine.flush(step)
        log.debug(f"{self.__class__.__name__}: flushed at step {step} ({reason})")

    def _replace_per_batch_collectives(self, trainer: Trainer) -> None:
        """Carry SIGTERM and the time limit in HPSGD's side channel instead of a collective at every batch.

        Lightning 2.6's training loop broadcasts a SIGTERM flag from rank 0 before every batch, and its ``Timer``
        (``max_time``) broadcasts rank 0's verdict after every batch: blocking collectives per step, which make
        every rank wait for the others and, on a slow link, queue behind HPSGD's all-reduce, undoing the overlap.
        Lightning's SIGTERM handler also broadcasts. Here the handler only records the request (and, as
        Lightning's does, passes SIGTERM to the launcher's children); the next round carries it, and at its merge
        every rank raises ``SIGTERMException`` before the same batch. The time limit works the same way.
        """
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            epoch_loop._broadcast_sigterm_tensor = self._stop_if_requested
            self._patched.append((epoch_loop, "_broadcast_sigterm_tensor"))
        connector = trainer._signal_connector
        if hasattr(connector, "_sigterm_notifier_fn"):  # registered after setup, so this instance attribute is used
            connector._sigterm_notifier_fn = self._on_sigterm
            self._patched.append((connector, "_sigterm_notifier_fn"))
        for callback in trainer.callbacks:
            if isinstance(callback, Timer) and hasattr(callback, "_check_time_remaining"):
                callback._check_time_remaining = functools.partial(self._check_time_remaining, callback)
                self._patched.append((callback, "_check_time_remaining"))

    def _check_time_remaining(self, timer: Timer, trainer: Trainer) -> None:
        """``Trainer(max_time=...)``: the time limit agreed in the side channel, not by a broadcast every batch.

        Lightning's ``Timer`` broadcasts rank 0's verdict after every batch, a blocking collective. Here each rank
        checks its own clock, and a rank past the limit asks the others through the next round; every rank then
        stops after the same step, up to two rounds past the limit.
        """
        engine = self._engine
        if engine is None or engine.aborted:
            Timer._check_time_remaining(timer, trainer)
            return
        if timer._duration is not None and timer.time_elapsed() >= timer._duration:
            engine.request_stop(StopRequest.FINISH)
        if engine.stop_requested & StopRequest.FINISH and not trainer.should_stop:
            trainer.should_stop = True
            if timer._verbose:
                elapsed = timedelta(seconds=int(timer.time_elapsed()))
                rank_zero_info(f"Time limit reached. Elapsed time is {elapsed}. Signaling Trainer to stop.")

    def _on_sigterm(self, signum: Any, frame: Any) -> None:
        log.info(f"HPSGD (rank {self.global_rank}): received SIGTERM; every rank stops at the next merge")
        engine = self._engine
        if engine is None or engine.aborted:
            # No round left to carry it: stop here, as Lightning does.
            self.lightning_module.trainer._signal_connector.received_sigterm = True
            return
        if not engine.stop_sent & StopRequest.ABORT and self.launcher is not None:
            self.launcher.kill(signum)
        engine.request_stop(StopRequest.ABORT)

    def _stop_if_requested(self) -> None:
        if self._engine is not None and self._engine.stop_requested & StopRequest.ABORT:
            trainer = self.lightning_module.trainer
            log.warning(
                f"HPSGD (rank {self.global_rank}): a rank received SIGTERM; every rank stops after optimizer step"
                f" {trainer.global_step}."
            )
            trainer._signal_connector.received_sigterm = True
            raise SIGTERMException()

    def _global_step(self) -> int:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return trainer.global_step if trainer is not None else 0

    def _build_engine(self) -> HPSGDEngine:
        assert self.model is not None
        _check_same_model_on_every_rank(self.model)
        if self._hpsgd_group is None:
            self._hpsgd_group = dist.new_group(backend=self.process_group_backend, timeout=self._timeout)
            # Checkpoint state is gathered as pickled CPU objects: over gloo, never through rank 0's GPU memory.
            cpu_backend = self.process_group_backend == "gloo"
            self._object_group = None if cpu_backend else dist.new_group(backend="gloo", timeout=self._timeout)
            for group in (self._hpsgd_group, self._object_group):
                if group is not None:
                    _OWN_GROUPS[id(group)] = group
        names, replica, extra = [], [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                names.append(name)
                replica.append(param)
            else:
                extra.append(param)
        for name, buffer in self.model.named_buffers():
            if buffer.is_floating_point():
                names.append(name)
                replica.append(buffer)
            else:
                extra.append(buffer)
        if not replica:
            raise ValueError("HPSGD found no trainable parameter or floating-point buffer in the model to average.")
        self._trainable = _trainable_flags(self.model)
        engine = HPSGDEngine(
            replica,
            names,
            group=self._hpsgd_group,
            sync_every=self.sync_every,
            merge=self.merge,
            comm_dtype=self.comm_dtype,
            timeout=self._timeout,
            broadcast_extra=extra,
        )
        if self._global_state is not None and engine.replica_is_narrow:
            engine.load_global_state(self._global_state)
        self._global_state = None
        return engine

    def _gather_per_rank_state(self) -> dict[str, Any]:
        """Every rank's optimizer and precision state (and G of a narrow replica), gathered to rank 0."""
        local = {
            "optimizer_states": [to_cpu(_unwrap(opt).state_dict()) for opt in self.optimizers],
            "precision_state": to_cpu(self.precision_plugin.state_dict()),
        }
        gathered = gather_to_rank0(local, group=self._object_group)
        state: dict[str, Any] = {"world_size": self.world_size}
        if gathered is not None:
            state["optimizer_states"] = [g["optimizer_states"] for g in gathered]
            state["precision_states"] = [g["precision_state"] for g in gathered]
        engine = self._engine
        global_state = engine.global_state() if engine is not None and engine.replica_is_narrow else self._global_state
        if global_state is not None:
            state["global"] = global_state
        return state

    def _abandon(self, exception: BaseException) -> None:
        self._abandoned = True
        _DEFAULT_GROUP["destroy_at_exit"] = False
        for group in (self._hpsgd_group, self._object_group):
            _OWN_GROUPS.pop(id(group), None)
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


class _FlushFirst(Callback):
    """Flushes before user callbacks run, since Lightning calls callbacks' hooks before the strategy's.

    Inserted first in ``trainer.callbacks`` during fit, so a user's ``on_train_end`` or ``on_validation_start``
    sees the flushed model, and marks the engine abandoned before any ``on_exception`` callback (for example
    ``OnExceptionCheckpoint``) could start a collective.
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
        self._strategy._abandon(exception)


def _trainable_flags(model: Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


def _unwrap(optimizer: Optimizer) -> Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _reject_wrapped_modules(model: Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, (DistributedDataParallel, FullyShardedDataParallel)):
            raise ValueError(
                f"HPSGD: submodule {name or '(root)'!r} is already wrapped in {type(module).__name__}. HPSGD replaces"
                " DDP's gradient all-reduce with its own model averaging, so the module must not be wrapped: use the"
                " plain module and let `strategy='hpsgd'` handle communication."
            )


def _reject_sharded_optimizers(optimizers: list[Optimizer]) -> None:
    for optimizer in optimizers:
        optimizer = _unwrap(optimizer)
        if hasattr(optimizer, "consolidate_state_dict") or type(optimizer).__name__ == "PostLocalSGDOptimizer":
            raise ValueError(
                f"HPSGD: optimizer {type(optimizer).__name__} shards or averages state across ranks, but under HPSGD"
                " each rank's optimizer state is local and must be complete. Use a plain optimizer (for example"
                " torch.optim.SGD or AdamW)."
            )


def _check_same_model_on_every_rank(model: Module) -> None:
    """Raise on every rank, naming the first difference, if ranks hold models of different structure."""
    signature = [(n, tuple(t.shape), str(t.dtype), t.requires_grad) for n, t in model.named_parameters()]
    signature += [(n, tuple(t.shape), str(t.dtype), False) for n, t in model.named_buffers()]
    signatures: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(signatures, signature)
    reference = signatures[0]
    for rank, other in enumerate(signatures[1:], start=1):
        if other == reference:
            continue
        for i in range(max(len(reference), len(other))):
            ours = reference[i] if i < len(reference) else None
            theirs = other[i] if i < len(other) else None
            if ours != theirs:
                raise ValueError(
                    "HPSGD: ranks hold different models, so their parameters cannot be averaged. First difference,"
                    f" at tensor #{i}: rank 0 has {_describe(ours)}, rank {rank} has {_describe(theirs)}. Build the"
                    " same model on every rank (same architecture, dtype and frozen parameters)."
                )


def _describe(entry: tuple | None) -> str:
    if entry is None:
        return "no tensor"
    name, shape, dtype, requires_grad = entry
    return f"{name!r} shape={list(shape)} dtype={dtype} requires_grad={requires_grad}"
