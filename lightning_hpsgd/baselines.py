"""Baselines that HPSGD is compared with, made faithful on every device.

Lightning's ``DDPStrategy`` registers DDP communication hooks only on CUDA. On CPU it silently trains plain DDP
with a compression hook (bf16, PowerSGD), and with PyTorch's post-local SGD (``PostLocalSGDState`` +
``model_averaging_period``) it keeps DDP's per-step gradient all-reduce and adds the periodic model averaging on
top: neither DDP nor local SGD. [`CommHookDDPStrategy`][] and [`PostLocalSGDStrategy`][] register the hook on CPU
as well.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

log = logging.getLogger(__name__)


class CommHookDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with its DDP communication hook registered on every device, CPU included.

    The arguments are ``DDPStrategy``'s: ``ddp_comm_hook`` (for example ``default_hooks.bf16_compress_hook`` or
    ``powerSGD_hook.powerSGD_hook``), ``ddp_comm_state`` (``PowerSGDState`` for PowerSGD) and ``ddp_comm_wrapper``.
    On CUDA it does what ``DDPStrategy`` does; on CPU (gloo) the hook runs too, where ``DDPStrategy`` skips it.
    """

    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        log.debug(f"{self.__class__.__name__}: registering {self._ddp_comm_hook} on {self.root_device.type}")
        _register_ddp_comm_hook(
            model=self.model,
            ddp_comm_state=self._ddp_comm_state,
            ddp_comm_hook=self._ddp_comm_hook,
            ddp_comm_wrapper=self._ddp_comm_wrapper,
        )


class PostLocalSGDStrategy(DDPStrategy):
    """PyTorch's post-local SGD on any device: DDP for ``warmup_steps`` steps, then local steps averaged every
    ``model_averaging_period`` steps.

    After the warm-up, gradients are all-reduced only inside groups of ``local_group_size`` consecutive ranks
    (``1``: every process steps alone, classical local SGD), and ``PeriodicModelAverager`` averages the parameters
    of all ranks every ``model_averaging_period`` optimizer steps. This is ``DDPStrategy(ddp_comm_state=
    PostLocalSGDState(subgroup=...), ddp_comm_hook=post_localSGD_hook, model_averaging_period=...)`` with the hook
    registered on CPU too.

    Args:
        model_averaging_period: optimizer steps between parameter averages (default 4).
        warmup_steps: steps of plain DDP before local SGD starts (PyTorch's ``start_localSGD_iter``; default 8).
        local_group_size: ranks that still all-reduce gradients every step after the warm-up (default 1). ``None``
            takes the devices of one node, which is PyTorch's own default on GPUs (one node then behaves as DDP).
        **kwargs: passed to ``DDPStrategy`` (``accelerator``, ``process_group_backend``, ``timeout``, ...).
    """

    def __init__(
        self,
        model_averaging_period: int = 4,
        warmup_steps: int = 8,
        local_group_size: int | None = 1,
        **kwargs: Any,
    ) -> None:
        if model_averaging_period < 1 or warmup_steps < 0 or (local_group_size is not None and local_group_size < 1):
            raise ValueError(
                "model_averaging_period and local_group_size must be >= 1 and warmup_steps >= 0; received"
                f" {model_averaging_period!r}, {local_group_size!r} and {warmup_steps!r}."
            )
        self.local_group_size = local_group_size
        state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=warmup_steps)
        super().__init__(
            ddp_comm_state=state,
            ddp_comm_hook=post_localSGD_hook,
            model_averaging_period=model_averaging_period,
            **kwargs,
        )

    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        state = self._ddp_comm_state
        assert isinstance(state, PostLocalSGDState)
        if state.subgroup is None:
            # PyTorch's default subgroups size themselves by the CUDA device count, which is 0 on CPU.
            state.subgroup, _ = dist.new_subgroups(group_size=self.local_group_size or self.num_processes)
        log.debug(f"{self.__class__.__name__}: registering post-local SGD on {self.root_device.type}")
        _register_ddp_comm_hook(model=self.model, ddp_comm_state=state, ddp_comm_hook=self._ddp_comm_hook)
