"""Configuration: names in Lightning's registry, constructor validation, and LightningCLI YAML."""

from __future__ import annotations

from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import StrategyRegistry

from lightning_hpsgd import HPSGDStrategy
from tests.models import Regressor


@pytest.mark.parametrize(
    ("name", "start_method", "merge"),
    [
        ("hpsgd", "popen", "replica"),
        ("hpsgd_spawn", "spawn", "replica"),
        ("hpsgd_fork", "fork", "replica"),
        ("hpsgd_notebook", "fork", "replica"),
        ("hpsgd_stale", "popen", "stale"),
    ],
)
def test_registered_names_build_the_strategy(name, start_method, merge):
    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, HPSGDStrategy)
    assert (strategy._start_method, strategy.merge, strategy.sync_every) == (start_method, merge, 1)
    assert strategy.comm_dtype is None


def test_registering_twice_is_harmless():
    before = {k: dict(StrategyRegistry[k]["init_params"]) for k in StrategyRegistry if k.startswith("hpsgd")}
    HPSGDStrategy.register_strategies(StrategyRegistry)  # what a second import does
    after = {k: dict(StrategyRegistry[k]["init_params"]) for k in StrategyRegistry if k.startswith("hpsgd")}
    assert after == before and len(after) == 5
    assert isinstance(L.Trainer(strategy="hpsgd", accelerator="cpu", devices=2, logger=False).strategy, HPSGDStrategy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync_every": 0}, "sync_every must be an integer >= 1"),
        ({"sync_every": 2.5}, "sync_every must be an integer >= 1"),
        ({"sync_every": True}, "sync_every must be an integer >= 1"),
        ({"merge": "average"}, "merge must be one of ['replica', 'stale']; received 'average'"),
        ({"comm_dtype": "int8"}, "comm_dtype must be None (full precision), torch.bfloat16, torch.float16 or"),
        ({"comm_dtype": torch.float64}, "received torch.float64"),
        ({"start_method": "thread"}, "start_method must be one of ['popen', 'spawn', 'fork', 'forkserver']"),
        ({"timeout": -1}, "timeout must be a positive number of seconds or timedelta"),
        ({"sync_every": "fast"}, "sync_every must be an integer >= 1 (optimizer steps per round) or 'auto'"),
        ({"max_sync_every": 0}, "max_sync_every must be an integer from 1 to"),
        ({"outer_lr": 0}, "outer_lr must be a finite number > 0 (1.0: plain HPSGD); received 0"),
        ({"outer_lr": float("inf")}, "outer_lr must be a finite number > 0"),
        ({"outer_momentum": 1.0}, "outer_momentum must be a number in [0, 1)"),
        ({"outer_momentum": -0.1}, "outer_momentum must be a number in [0, 1)"),
        ({"outer_nesterov": "yes"}, "outer_nesterov must be True or False; received 'yes'"),
    ],
)
def test_invalid_arguments_name_the_accepted_values(kwargs, message):
    with pytest.raises(ValueError) as err:
        HPSGDStrategy(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [("bf16", torch.bfloat16), ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16), (None, None)],
)
def test_comm_dtype_spellings(value, dtype):
    assert HPSGDStrategy(comm_dtype=value).comm_dtype == dtype


def test_timeout_in_seconds():
    assert HPSGDStrategy(timeout=90)._timeout == timedelta(seconds=90)


def test_lightning_cli_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  accelerator: cpu
  devices: 2
  logger: false
  strategy:
    class_path: lightning_hpsgd.HPSGDStrategy
    init_args:
      sync_every: 4
      merge: stale
      comm_dtype: bf16
      timeout: 120
      outer_lr: 0.7
      outer_momentum: 0.9
      outer_nesterov: false
      hierarchy: node
model:
  hidden: 8
"""
    )
    cli = LightningCLI(Regressor, run=False, args=["--config", str(config)])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, HPSGDStrategy)
    assert (strategy.sync_every, strategy.merge, strategy.comm_dtype) == (4, "stale", torch.bfloat16)
    assert strategy._timeout == timedelta(seconds=120)
    assert (strategy.outer_lr, strategy.outer_momentum, strategy.outer_nesterov) == (0.7, 0.9, False)
    assert strategy.hierarchy == "node"
    assert cli.model.hparams.hidden == 8
    # The run config that HPSGDMonitor gives every logger names every option of the rule.
    config = strategy.hyperparameters
    names = ("sync_every", "merge", "outer_lr", "outer_momentum", "outer_nesterov", "hierarchy")
    assert {k: config[k] for k in names} == {
        "hierarchy": "node",
        "sync_every": 4,
        "merge": "stale",
        "outer_lr": 0.7,
        "outer_momentum": 0.9,
        "outer_nesterov": False,
    }


def test_lightning_cli_sync_every_auto_from_yaml_and_the_command_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 2\n  logger: false\n  strategy:\n"
        "    class_path: lightning_hpsgd.HPSGDStrategy\n    init_args:\n      sync_every: auto\n"
        "      max_sync_every: 16\n"
    )
    cli = LightningCLI(Regressor, run=False, args=["--config", str(config)])
    assert (cli.trainer.strategy.sync_every, cli.trainer.strategy.max_sync_every) == ("auto", 16)
    cli = LightningCLI(Regressor, run=False, args=["--config", str(config), "--trainer.strategy.sync_every", "8"])
    assert cli.trainer.strategy.sync_every == 8


def test_lightning_cli_sync_delay_and_fragments_from_yaml_and_the_command_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 2\n  logger: false\n  strategy:\n"
        "    class_path: lightning_hpsgd.HPSGDStrategy\n    init_args:\n      sync_every: 16\n"
        "      sync_delay: auto\n      fragments: 4\n"
    )
    cli = LightningCLI(Regressor, run=False, args=["--config", str(config)])
    strategy = cli.trainer.strategy
    assert (strategy.sync_every, strategy.sync_delay, strategy.fragments) == (16, "auto", 4)
    cli = LightningCLI(Regressor, run=False, args=["--config", str(config), "--trainer.strategy.sync_delay", "3"])
    assert cli.trainer.strategy.sync_delay == 3
    assert cli.trainer.strategy.hyperparameters["sync_delay"] == 3


def test_lightning_cli_strategy_by_name():
    cli = LightningCLI(
        Regressor,
        run=False,
        args=[
            "--trainer.strategy=hpsgd_stale",
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.logger=false",
        ],
    )
    assert isinstance(cli.trainer.strategy, HPSGDStrategy) and cli.trainer.strategy.merge == "stale"


def test_max_sync_every_with_a_fixed_sync_every_warns_and_ddp_options_without_hierarchy_warn():
    with pytest.warns(UserWarning, match="max_sync_every=8 has no effect with sync_every=4"):
        HPSGDStrategy(sync_every=4, max_sync_every=8)
    with pytest.warns(UserWarning, match=r"DDP options \['find_unused_parameters'\] have no effect"):
        HPSGDStrategy(find_unused_parameters=True)
    strategy = HPSGDStrategy(hierarchy="node", find_unused_parameters=True, static_graph=False)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True, "static_graph": False}


def test_ddp_options_from_a_lightningcli_config_reach_the_node_wrapper_and_defaults_do_not_warn():
    """jsonargparse passes every DDP keyword with its default: only options set to something else warn."""
    import warnings

    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")

    def build(init_args):
        strategy = {"class_path": "lightning_hpsgd.HPSGDStrategy", "init_args": init_args}
        config = parser.parse_object({"strategy": strategy})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            strategy = parser.instantiate(config).strategy
        return strategy, [str(w.message) for w in caught if "HPSGD" in str(w.message)]

    strategy, warned = build({"sync_every": 2})
    assert warned == [] and strategy.sync_every == 2
    strategy, warned = build({"hierarchy": "node", "find_unused_parameters": True})
    assert warned == [] and strategy._ddp_kwargs["find_unused_parameters"] is True
    _, warned = build({"find_unused_parameters": True})
    assert warned == ["HPSGD: DDP options ['find_unused_parameters'] have no effect without hierarchy='node'."]
