"""``HPSGDStrategy`` for Lightning Fabric: HPSGD in a training loop the user writes, on the Trainer's engine.

Fabric's calls mapped onto the engine, and nothing more:

* ``fabric.setup(model, *optimizers)`` → broadcast rank 0's tensors and build the engine (a second model, a GAN's
  discriminator, joins the same engine);
* ``optimizer.step()`` → the optimizer's step; once every optimizer set up with Fabric has stepped, the end of an
  iteration: a step of the engine (a sync point every ``sync_every``). Or, with ``iteration_end="manual"``, where
  the loop calls [`end_iteration`][lightning_hpsgd.fabric.HPSGDStrategy.end_iteration];
* [`flush`][lightning_hpsgd.fabric.HPSGDStrategy.flush], ``fabric.save``, the return of the function given to
  ``fabric.launch`` and ``teardown`` → flush; ``fabric.save`` then writes every rank's optimizer state, and
  ``fabric.load`` gives it back and restarts the engine from the file;
* SIGTERM → the ranks agree on a step through the engine's side channel, flush there, and
  [`should_stop`][lightning_hpsgd.fabric.HPSGDStrategy.should_stop] turns ``True`` on every rank at once.

``fabric.barrier()`` does not flush: Fabric calls it inside ``save`` and ``load``, and users call it around file
and data work, where a collective that changes the model would surprise.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import warnings
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hpsgd import process_groups
from lightning_hpsgd.compat import (
    BackwardSyncControl,
    FlushingMultiProcessingLauncher,
    FlushingScriptLauncher,
    StrategyRegistry,
)
from lightning_hpsgd.engine import HPSGDEngine
from lightning_hpsgd.errors import HPSGDError
from lightning_hpsgd.fabric_checkpoints import FabricCheckpoints
from lightning_hpsgd.model_tensors import ModelWatcher, averaged_names, model_tensors, trained_names
from lightning_hpsgd.options import RuleOptions, validate_launch
from lightning_hpsgd.refusals import reject_sharded_optimizers, reject_unsupported_model
from lightning_hpsgd.side_channel import StopRequest
from lightning_hpsgd.stats import EngineStats, IntervalMetrics
from lightning_hpsgd.strategy import REGISTERED_NAMES, _changed_ddp_options
from lightning_hpsgd.tensor_utils import broadcast_tensors

log = logging.getLogger(__name__)

__all__ = ["HPSGDStrategy"]

IterationEnd = Literal["auto", "manual"]


class HPSGDStrategy(FabricCheckpoints, DDPStrategy, RuleOptions):
    """Hierarchical Parallel SGD for Lightning Fabric: ``Fabric(strategy="hpsgd")`` in the user's own loop.

    The same rule and options as the Trainer's [`HPSGDStrategy`][lightning_hpsgd.strategy.HPSGDStrategy], on the
    same engine: each rank trains its own replica while the previous round's average is in flight, and the model
    is never wrapped in ``DistributedDataParallel``. Fabric has no validation or checkpoint hooks, so the loop
    chooses the flush points: ``fabric.strategy.flush()`` before an evaluation, and ``fabric.save(...)``, which
    flushes first. Right after a flush every rank's model is bit-identical, or
    [`RanksDivergedError`][lightning_hpsgd.errors.RanksDivergedError] names the tensor that is not.

    Args:
        sync_every: ``H``, iterations per round (integer >= 1, default 1), or ``"auto"`` (chosen from the measured
            times, up to ``max_sync_every``). An iteration ends once every optimizer set up with Fabric has stepped
            since the last one (one ``optimizer.step()`` with one optimizer); with gradient accumulation only the
            steps count.
        merge: ``"replica"`` (default; HPSGD) or ``"stale"`` (the stale-gradient baseline).
        comm_dtype: dtype on the wire: ``None`` (default, full precision), ``"bf16"`` or ``"fp16"``.
        outer_lr: ``η``, the outer learning rate on each merged mean change (default 1.0).
        outer_momentum: ``μ`` in [0, 1), the outer optimizer's momentum (default 0.0).
        outer_nesterov: Nesterov momentum for the outer optimizer (default ``True``).
        max_sync_every: the largest ``H`` that ``sync_every="auto"`` may choose (default 32).
        sync_delay: ``τ``, iterations from a round's launch to its merge (``None``, default: ``H``; 0 to ``H``;
            ``"auto"``).
        fragments: ``F``, parts of the model whose rounds start at different iterations (default 1).
        hierarchy: ``None`` (default, flat) or ``"node"`` (DDP inside each node, HPSGD across nodes).
        iteration_end: ``"auto"`` (default): an iteration ends when every optimizer has stepped since the last one.
            ``"manual"``: the loop calls
            [`end_iteration`][lightning_hpsgd.fabric.HPSGDStrategy.end_iteration] where an iteration ends.
        process_group_backend: ``"gloo"`` or ``"nccl"``; default: the accelerator's, as in DDP.
        timeout: how long a collective waits for a peer (a ``timedelta`` or seconds; default 30 minutes).
        start_method: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``, as in DDP.
        accelerator: as in DDP; ``Fabric`` sets it.
        parallel_devices: as in DDP; ``Fabric`` sets it.
        cluster_environment: as in DDP; ``Fabric`` sets it.
        checkpoint_io: as in DDP; ``Fabric`` sets it.
        precision: as in DDP; ``Fabric`` sets it.
        **kwargs: ``DistributedDataParallel``'s options, for the node's gradient averaging with
            ``hierarchy="node"``.
    """

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
        iteration_end: IterationEnd = "auto",
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | float | None = timedelta(minutes=30),
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        self.set_rule_options(sync_every=sync_every, merge=merge, comm_dtype=comm_dtype, outer_lr=outer_lr,
                              outer_momentum=outer_momentum, outer_nesterov=outer_nesterov,
                              max_sync_every=max_sync_every, sync_delay=sync_delay, fragments=fragments,
                              hierarchy=hierarchy, warn=rank_zero_warn)  # fmt: skip
        if iteration_end not in ("auto", "manual"):
            raise ValueError(
                "iteration_end must be 'auto' (an iteration ends once every optimizer has stepped) or 'manual' (call"
                f" fabric.strategy.end_iteration()); received {iteration_end!r}."
            )
        timeout = validate_launch(start_method, timeout)
        if hierarchy is None and (changed := _changed_ddp_options(kwargs)):
            rank_zero_warn(f"HPSGD: DDP options {changed} have no effect without hierarchy='node'.")
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io, precision=precision,
                         process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
                         **kwargs)  # fmt: skip
        self.iteration_end = iteration_end
        self._backward_sync_control = _NodeBackwardSyncControl()
        self._groups: process_groups.RunGroups | None = None
        self._engine: HPSGDEngine | None = None
        self._modules: list[Module] = []  # the models set up with Fabric, unwrapped, in setup order
        self._watchers: list[ModelWatcher] = []
        self._optimizers: list[Optimizer] = []
        self._stepped: set[int] = set()  # ids of the optimizers that stepped in the current iteration
        self._steps = 0  # iterations, this run
        self._should_stop = False
        self._interval = IntervalMetrics()
        self._handlers: _ProcessHandlers | None = None

    # ------------------------------------------------------------------ what the loop reads and calls

    @property
    def engine(self) -> HPSGDEngine | None:
        """The engine, once a model is set up (``None`` before)."""
        return self._engine

    @property
    def steps(self) -> int:
        """Iterations ended so far (restored by ``fabric.load``)."""
        return self._steps

    @property
    def stats(self) -> EngineStats | None:
        """The engine's counters (rounds, flushes, wait and communication times), or ``None`` before setup."""
        return self._engine.stats if self._engine is not None else None

    @property
    def should_stop(self) -> bool:
        """Whether the ranks agreed to stop (a rank received SIGTERM): ``True`` on every rank after the same
        ``optimizer.step()``, with the model flushed. Save and leave the loop; the next ``optimizer.step()`` raises
        ``SIGTERMException`` on every rank."""
        return self._should_stop

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The options that define the run's algorithm, for a logger's run config."""
        return {
            **self.rule_hyperparameters(),
            "iteration_end": self.iteration_end,
            "process_group_backend": self.process_group_backend,
            "timeout_s": self._timeout.total_seconds() if self._timeout is not None else None,
        }

    def metrics(self) -> dict[str, float]:
        """This rank's ``hpsgd/*`` metrics since the previous call, for ``fabric.log_dict(fabric.strategy.metrics())``.

        ``hpsgd/rounds``, ``hpsgd/flushes``, ``hpsgd/sync_every``, ``hpsgd/sync_delay`` and ``hpsgd/bytes`` always;
        ``hpsgd/comm_ms``, ``hpsgd/wait_ms`` and ``hpsgd/hidden`` once a round was timed since the last call;
        ``hpsgd/staleness`` once a round was merged; ``hpsgd/step_ms``, the wall time per iteration. No collective:
        call it on any subset of ranks.
        """
        return self._interval.read(self.stats, self._steps)

    def flush(self, reason: str = "request") -> None:
        """Bring every rank to the same model with nothing in flight (a collective: call it on every rank).

        Call it before evaluating, so that every rank evaluates the global model. Does nothing before a model is
        set up or after an error abandoned the engine.
        """
        engine = self._engine
        if engine is None or engine.aborted:
            return
        self._follow_models()
        engine.flush(self._steps)
        log.debug(f"{self.__class__.__name__}: flushed at iteration {self._steps} ({reason})")

    def end_iteration(self) -> None:
        """End an iteration: a step of the engine, and a sync point every ``sync_every`` of them.

        With ``iteration_end="auto"`` the strategy calls it after the iteration's last ``optimizer.step()``. With
        ``"manual"`` the loop calls it on every rank where an iteration ends: after every optimizer stepped, and
        never while a graph built before an ``optimizer.step()`` still has to run backward.
        """
        engine = self._engine
        if engine is None or engine.aborted:
            return
        self._follow_models()
        self._steps += 1
        engine.on_optimizer_step(self._steps)
        if engine.stop_requested & StopRequest.ABORT and not self._should_stop:
            self.flush("agreed stop")
            self._should_stop = True
            rank_zero_warn(
                f"HPSGD: a rank received SIGTERM; every rank stopped after iteration {self._steps}, flushed."
                " fabric.strategy.should_stop is True: save a checkpoint and leave the loop."
            )

    # ------------------------------------------------------------------ setup

    @override
    def _configure_launcher(self) -> None:
        """DDP's launchers, with a flush when the function given to ``fabric.launch`` returns."""
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = FlushingScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = FlushingMultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        created = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        super().setup_environment()
        if created and torch.distributed.is_initialized():
            process_groups.destroy_default_group_at_exit()

    @override
    def setup_module_and_optimizers(
        self, module: Module, optimizers: list[Optimizer], scheduler: Any | None = None
    ) -> tuple[Module, list[Optimizer], Any | None]:
        reject_sharded_optimizers(optimizers)
        module = self.setup_module(module)
        return module, [self.setup_optimizer(optimizer) for optimizer in optimizers], scheduler

    @override
    def setup_module(self, module: Module) -> Module:
        """Broadcast rank 0's tensors and hand the module to the engine; with ``hierarchy="node"`` and several
        devices per node, wrap it in DDP on the node's group. Flat HPSGD never wraps it."""
        reject_unsupported_model(module)
        if self._groups is None:
            node_rank = self.node_rank if self.hierarchy == "node" else None
            self._groups = process_groups.RunGroups(self.process_group_backend, self._timeout, node_rank)
        self._add_module(module)
        nodes = self._groups.nodes
        if nodes is None or nodes.node is None:
            return module
        self._ddp_kwargs["process_group"] = nodes.node
        return super().setup_module(module)

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        reject_sharded_optimizers([optimizer])
        self._optimizers.append(optimizer)
        return optimizer

    def _add_module(self, module: Module) -> None:
        tensors = list(module.state_dict(keep_vars=True).values())
        if self._engine is not None:
            # A second model (a GAN's discriminator): rank 0's values, then the engine follows both (a flush).
            broadcast_tensors([t.data for t in tensors], src=0, group=self._groups.rounds if self._groups else None)
        self._modules.append(module)
        self._watchers.append(ModelWatcher(module))
        if self._engine is None:
            self._engine = self._new_engine(broadcast=True)
            self._handlers = _ProcessHandlers(self)
        else:
            tensors, averaged, trained = self._named_tensors()
            self._engine.follow(tensors, averaged, self._steps, trained)

    def _new_engine(self, broadcast: bool) -> HPSGDEngine:
        assert self._groups is not None
        tensors, averaged, trained = self._named_tensors()
        return HPSGDEngine(
            tensors, averaged, trained=trained, group=self._groups.rounds, object_group=self._groups.objects,
            timeout=self._timeout, nodes=self._groups.nodes, broadcast=broadcast, **self.engine_options(),
        )  # fmt: skip

    def _named_tensors(self) -> tuple[dict[str, Tensor], set[str], set[str]]:
        """Every set-up model's tensors by name: plain names for one model, ``"{i}.{name}"`` for several."""
        if len(self._modules) == 1:
            (module,) = self._modules
            return model_tensors(module), averaged_names(module), trained_names(module)
        tensors: dict[str, Tensor] = {}
        averaged: set[str] = set()
        trained: set[str] = set()
        for i, module in enumerate(self._modules):
            tensors.update({f"{i}.{name}": t for name, t in model_tensors(module).items()})
            averaged.update(f"{i}.{name}" for name in averaged_names(module))
            trained.update(f"{i}.{name}" for name in trained_names(module))
        return tensors, averaged, trained

    def _follow_models(self) -> None:
        """Hand the engine the models' tensors again if user code replaced, (un)froze, added or removed one."""
        engine = self._engine
        if engine is None or not any(w.changed(m) for w, m in zip(self._watchers, self._modules)):
            return
        tensors, averaged, trained = self._named_tensors()
        engine.follow(tensors, averaged, self._steps, trained)
        for watcher, module in zip(self._watchers, self._modules):
            watcher.accept(module)

    # ------------------------------------------------------------------ steps

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        if self._should_stop:
            raise SIGTERMException(
                f"HPSGD: every rank stopped after iteration {self._steps} on SIGTERM (the model is flushed). Check"
                " fabric.strategy.should_stop after optimizer.step() to save a checkpoint before leaving the loop."
            )
        output = super().optimizer_step(optimizer, **kwargs)
        if self.iteration_end == "auto" and self._engine is not None:
            self._stepped.add(id(optimizer))
            if self._stepped.issuperset(id(opt) for opt in self._optimizers):
                self._stepped.clear()
                self.end_iteration()
        return output

    def _restart_engine(self, engine_state: dict[str, Any] | None, steps: int | None) -> None:
        """The loaded models are identical on every rank: a new engine over them, with the saved state."""
        for watcher, module in zip(self._watchers, self._modules):
            watcher.accept(module)
        self._engine = self._new_engine(broadcast=True)
        if engine_state:
            self._engine.load_state_dict(engine_state)
        self._steps = steps if steps is not None else 0
        self._stepped.clear()
        self._should_stop = False
        self._interval = IntervalMetrics()
        log.debug(f"{self.__class__.__name__}: engine restarted from a checkpoint at iteration {self._steps}")

    # ------------------------------------------------------------------ collectives, errors, the end

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        engine = self._engine
        if engine is not None and engine.aborted:
            return  # after an error a peer may never arrive (fabric.save calls this)
        super().barrier(*args, **kwargs)

    def abandon(self, exception: BaseException | None = None) -> None:
        """Give up after an error without another collective (the error may have hit one rank only): the pending
        round is dropped, the process groups are left to the OS, and ``fabric.save`` writes no per-rank state."""
        engine = self._engine
        if self._groups is not None:
            self._groups.forget()
        if engine is None or engine.aborted:
            return
        engine.abandon()
        what = type(exception).__name__ if exception is not None else "an error"
        warnings.warn(
            f"HPSGD (rank {self.global_rank}): training stopped with {what} after iteration {self._steps}. Replicas"
            " were not flushed, so local progress since the last flush is not in the global model. Resume from the"
            " last checkpoint.",
            stacklevel=2,
        )

    @override
    def teardown(self) -> None:
        engine = self._engine
        if engine is not None and not engine.aborted and engine.needs_flush:
            self.flush("teardown")
        if self._handlers is not None:
            self._handlers.remove()
            self._handlers = None
        self._engine = None
        self._modules, self._watchers, self._optimizers = [], [], []
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        for name, options in REGISTERED_NAMES.items():
            description = f"HPSGD strategy with merge={options['merge']!r}, start_method={options['start_method']!r}"
            strategy_registry.register(name, cls, description=description, override=True, **options)


class _NodeBackwardSyncControl(BackwardSyncControl):
    """``fabric.no_backward_sync``: flat HPSGD syncs no gradients, so there is nothing to skip; with
    ``hierarchy="node"`` it skips the node's DDP all-reduce."""

    @override
    def no_backward_sync(self, module: Module, enabled: bool) -> AbstractContextManager:
        if enabled and isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return nullcontext()


class _ProcessHandlers:
    """SIGTERM asks every rank to stop at the same iteration; an uncaught exception abandons the engine before
    the interpreter exits, so that no collective waits for a peer at exit. Installed at setup, removed at
    teardown (only from the main thread: Python delivers signals there)."""

    def __init__(self, strategy: HPSGDStrategy) -> None:
        self._strategy = strategy
        self._previous_signal: Any = None
        self._previous_hook = sys.excepthook
        self._forwarded = False
        sys.excepthook = self._excepthook
        atexit.register(self._at_exit)
        if threading.current_thread() is threading.main_thread():
            self._previous_signal = signal.signal(signal.SIGTERM, self._on_sigterm)

    def remove(self) -> None:
        atexit.unregister(self._at_exit)
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_hook
        if self._previous_signal is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_signal)

    def _at_exit(self) -> None:
        """Say so when the process ends with rounds in flight: the ranks' last models then differ. A flush here
        could wait forever for a rank that left the loop on an error, so the loop must end with one itself."""
        strategy = self._strategy
        engine = strategy.engine
        if engine is not None and not engine.aborted and engine.needs_flush and strategy.global_rank == 0:
            print(
                f"HPSGD: the process ends with iterations up to {strategy.steps} not merged into every rank's model."
                " End the loop with fabric.save(...) or fabric.strategy.flush().",
                file=sys.stderr,
            )

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        strategy = self._strategy
        log.info(f"HPSGD (rank {strategy.global_rank}): received SIGTERM")
        launcher_procs = getattr(strategy.launcher, "procs", None) or []
        if not self._forwarded:  # as Lightning does: the launcher's children get it too
            self._forwarded = True
            for proc in launcher_procs:
                if proc.poll() is None:
                    proc.send_signal(signum)
        engine = strategy.engine
        if engine is None or engine.aborted:
            raise SIGTERMException(f"HPSGD (rank {strategy.global_rank}): received SIGTERM")
        engine.request_stop(StopRequest.ABORT)

    def _excepthook(self, kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        self._strategy.abandon(value)
        if isinstance(value, HPSGDError) and os.environ.get("HPSGD_DEBUG", "") in ("", "0"):
            print(f"{kind.__name__}: {value}", file=sys.stderr)  # it says what to do: no traceback
            return
        self._previous_hook(kind, value, tb)
