"""What HPSGD refuses at setup (lightning_hpsgd/refusals.py), each with one line that says what to do instead."""

from __future__ import annotations

import os
from unittest import mock

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp as fsdp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_hpsgd.refusals import (
    reject_dtensors,
    reject_sharded_optimizers,
    reject_unsupported_model,
    reject_wrapped_modules,
)
from tests.models import Regressor, build_net, loader, make_batches

fully_shard = getattr(fsdp, "fully_shard", None)  # public from PyTorch 2.6
needs_fully_shard = pytest.mark.skipif(fully_shard is None, reason="this PyTorch has no fsdp.fully_shard")


def refusal(check, *args) -> str:
    """The message of the ``ValueError`` that ``check(*args)`` raises, which must fit on one line."""
    with pytest.raises(ValueError) as err:
        check(*args)
    message = str(err.value)
    assert "\n" not in message and len(message) <= 160, message
    assert message.startswith("HPSGD: ")
    return message


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_net()


def test_plain_model_and_optimizer_pass():
    model = Model()
    reject_unsupported_model(model)
    reject_sharded_optimizers([torch.optim.SGD(model.parameters(), lr=0.1)])


def test_ddp_wrapped_submodule_is_refused(one_rank_group):
    model = Model()
    model.net = DistributedDataParallel(model.net)
    message = refusal(reject_unsupported_model, model)
    assert "submodule 'net' is already wrapped in DistributedDataParallel; use the plain module" in message
    assert refusal(reject_wrapped_modules, model) == message


@needs_fully_shard
def test_fully_shard_submodule_is_refused_by_name(one_rank_group):
    model = Model()
    fully_shard(model.net, mesh=init_device_mesh("cpu", (1,)))
    assert isinstance(model.net[0].weight, DTensor)  # FSDP2 turned the parameters into DTensors
    message = refusal(reject_unsupported_model, model)
    assert message == (
        "HPSGD: submodule 'net' is already wrapped in FSDP2 (fully_shard); use the plain module and let"
        " strategy='hpsgd' handle communication."
    )


@needs_fully_shard
def test_fully_shard_root_is_refused(one_rank_group):
    model = fully_shard(Model(), mesh=init_device_mesh("cpu", (1,)))
    assert "submodule '(root)' is already wrapped in FSDP2 (fully_shard)" in refusal(reject_unsupported_model, model)


def test_dtensor_parameter_and_buffer_are_refused_by_name(one_rank_group):
    # Tensor parallelism: DTensors in an otherwise plain module, whose class tells nothing.
    mesh = init_device_mesh("cpu", (1,))
    model = Model()
    model.net[2].weight = nn.Parameter(distribute_tensor(model.net[2].weight.detach(), mesh, [Replicate()]))
    message = refusal(reject_unsupported_model, model)
    assert "parameter 'net.2.weight' is a DTensor (sharded by fully_shard or tensor parallelism)" in message
    assert refusal(reject_dtensors, model) == message

    model = Model()
    model.net.register_buffer("scale", distribute_tensor(torch.ones(3), mesh, [Replicate()]))
    assert "buffer 'net.scale' is a DTensor" in refusal(reject_unsupported_model, model)


def test_deepspeed_engine_is_refused_without_deepspeed():
    # DeepSpeed cannot be installed here, so these stand-ins carry the names the real classes have
    # (deepspeed.runtime.engine.DeepSpeedEngine, and a subclass as deepspeed.runtime.pipe.engine.PipelineEngine):
    # the check reads the class hierarchy and never imports deepspeed.
    engine_class = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    pipeline_class = type("PipelineEngine", (engine_class,), {"__module__": "deepspeed.runtime.pipe.engine"})
    model = Model()
    model.engine = pipeline_class()
    message = refusal(reject_unsupported_model, model)
    assert "submodule 'engine' is already wrapped in DeepSpeedEngine; use the plain module" in message
    assert "submodule '(root)' is already wrapped in DeepSpeedEngine" in refusal(reject_wrapped_modules, engine_class())

    # A class of the same name outside DeepSpeed is the user's own.
    model.engine = type("DeepSpeedEngine", (nn.Module,), {"__module__": "my_project.engines"})()
    reject_unsupported_model(model)


def test_sharded_optimizer_is_refused(one_rank_group):
    model = Model()
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
    message = refusal(reject_sharded_optimizers, [torch.optim.SGD(model.parameters(), lr=0.1), optimizer])
    assert message == (
        "HPSGD: optimizer ZeroRedundancyOptimizer shards or averages state across ranks; use a plain optimizer such"
        " as torch.optim.SGD or AdamW."
    )


class FullyShardedRegressor(Regressor):
    """As a user of Lightning's ModelParallelStrategy would write it."""

    def configure_model(self) -> None:
        fully_shard(self.net, mesh=init_device_mesh("cpu", (1,)))


@needs_fully_shard
def test_fit_refuses_fully_shard_before_the_first_step():
    trainer = L.Trainer(strategy="hpsgd", accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = FullyShardedRegressor()
    # Lightning creates the default process group in this process and sets MASTER_PORT and friends: both are undone.
    try:
        with mock.patch.dict(os.environ), pytest.raises(ValueError) as err:
            trainer.fit(model, loader(make_batches(2, 4, seed=1)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert str(err.value) == (
        "HPSGD: submodule 'net' is already wrapped in FSDP2 (fully_shard); use the plain module and let"
        " strategy='hpsgd' handle communication."
    )
    assert trainer.global_step == 0
