"""Mistakes on the `hpsgd` command line end in one line: option-name typos (with the closest valid name), values out of
range, prefixes of option names, and the strategy name without the import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_hpsgd.cli import HPSGDCLI, UsageError, check_command_line, main
from tests.launch import ROOT, base_env, run_command

MNIST1D = str(ROOT / "recipes" / "mnist1d.yaml")

# At least 10 times what a command that stops at its arguments takes on an idle 2-core machine (about 10 s, the
# imports), so that a busy machine makes the test slow, never a failure.
CLI_TIMEOUT_S = 240


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "lightning_hpsgd", *args], cwd=cwd, env=base_env(), timeout=CLI_TIMEOUT_S)


def recipe_with(tmp_path: Path, old: str, new: str) -> str:
    """MNIST-1D's recipe with one line's ``old`` text replaced by ``new`` (a misspelled key)."""
    recipe = Path(MNIST1D).read_text()
    assert old in recipe
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.replace(old, new, 1))
    return str(path)


def assert_one_line(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode != 0, done.stdout[-2000:]
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    assert lines[0] == f"hpsgd: error: {expected}", lines[0]


# One real command per kind of mistake: the command's imports take most of its 10 s. The variants (a --config file,
# other groups and subcommands) run in this process below, through the same entry point.
# --print_config ends a command that parses without an error at once (exit 0), so that a typo that is not refused
# fails the test instead of starting a 40-epoch fit.
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.strategy.sync_evry", "2"], "--trainer.strategy.sync_evry: no such option of"
         " lightning_hpsgd.HPSGDStrategy. Did you mean --trainer.strategy.sync_every?"),
        # argparse would take it as --trainer.max_epochs, its only completion
        (["--trainer.max_epoch", "2"], "--trainer.max_epoch: no such option. Did you mean --trainer.max_epochs?"),
        (["--trainer.strategy.comm_dtype", "bf17"], "--trainer.strategy.comm_dtype: comm_dtype must be None (full"
         " precision), torch.bfloat16, torch.float16 or torch.float32 (or one of the strings ['bf16', 'bfloat16',"
         " 'float16', 'float32', 'fp16', 'fp32', 'half']); received 'bf17'."),
    ],
    ids=["typo", "prefix", "comm_dtype-bf17"],
)  # fmt: skip
def test_the_command_ends_a_mistake_in_one_line_that_names_the_option_and_the_fix(args, expected, tmp_path):
    assert_one_line(run_cli(["fit", "--config", MNIST1D, *args, "--print_config"], cwd=tmp_path), expected)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("comm_dtype", "bf17", "--trainer.strategy.comm_dtype: comm_dtype must be None (full precision)"),
        ("timeout", "0", "--trainer.strategy.timeout: timeout must be a positive number of seconds or timedelta"),
        ("start_method", "fok", "--trainer.strategy.start_method: start_method must be one of ['popen', 'spawn',"
         " 'fork', 'forkserver']; received 'fok'."),
    ],
    ids=["comm_dtype-bf17", "timeout-0", "start_method-fok"],
)  # fmt: skip
def test_the_check_refuses_launch_options_from_a_config_file_too(option, value, message, tmp_path):
    config = recipe_with(tmp_path, "      merge: replica\n", f"      merge: replica\n      {option}: {value}\n")
    with pytest.raises(UsageError) as error:
        check_command_line(["fit", "--config", config])
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("value", ["0:30:00", "90", "2.5"])
def test_the_check_leaves_valid_timeouts_to_the_strategy(value):
    check_command_line(["fit", "--config", MNIST1D, "--trainer.strategy.timeout", value])
    strategy = HPSGDCLI(run=False, args=["--config", MNIST1D, "--trainer.strategy.timeout", value]).trainer.strategy
    assert strategy._timeout.total_seconds() == {"0:30:00": 1800, "90": 90, "2.5": 2.5}[value]


def command_error(capsys, args: list[str]) -> str:
    """The one line that the ``hpsgd`` command's entry point ends ``args`` with, run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])  # a command that parses ends at once, as its own error
    code = exit_info.value.code
    err = code if isinstance(code, str) else capsys.readouterr().err  # the check's exit, or the parser's (2)
    assert code not in (0, None), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hpsgd: error: "), err
    return err.strip().removeprefix("hpsgd: error: ")


# The command's entry point, in this process (the imports are already paid): typos in a --config file and in each
# group, prefixes refused in every subcommand, values out of range or of the wrong type.
def test_typos_in_every_group_and_subcommand_end_in_one_line_with_the_closest_name(capsys, tmp_path):
    for subcommand in ("fit", "validate", "test", "predict"):
        line = command_error(capsys, [subcommand, "--config", MNIST1D, "--trainer.max_epoch", "2"])
        assert line == "--trainer.max_epoch: no such option. Did you mean --trainer.max_epochs?", subcommand
    cases = {
        ("--model.lr_typo", "2"): "--model.lr_typo: no such option of lightning_hpsgd.recipes.MNIST1DClassifier."
        " Did you mean --model.lr?",
        ("--data.batch_siz", "2"): "--data.batch_siz: no such option of lightning_hpsgd.recipes.MNIST1DDataModule."
        " Did you mean --data.batch_size?",
        ("--max_epochs", "2"): "--max_epochs: no such option. Did you mean --trainer.max_epochs?",
        ("--trainer.strategy", "hpsgd", "--trainer.strategy.outer_lrr", "2"): "--trainer.strategy.outer_lrr: no such"
        " option of lightning_hpsgd.HPSGDStrategy. Did you mean --trainer.strategy.outer_lr?",
        ("--trainer.strategy.zzzz", "2"): "--trainer.strategy.zzzz: no such option of lightning_hpsgd.HPSGDStrategy."
        " `hpsgd fit --trainer.strategy.help lightning_hpsgd.HPSGDStrategy` lists its options.",
        ("--trainer.max_epochs", "abc"): "--trainer.max_epochs: expected int or None; received 'abc'. `hpsgd fit"
        " --help` describes it.",
        ("--trainer.strategy.timeout", "abc"): "--trainer.strategy.timeout: expected timedelta, float or None;"
        " received 'abc'. `hpsgd fit --help` describes it.",
    }
    for args, expected in cases.items():
        assert command_error(capsys, ["fit", "--config", MNIST1D, *args]) == expected
    assert command_error(capsys, ["fit", "--config", MNIST1D, "--trainer.strategy.timeout", "-5"]) == (
        "--trainer.strategy.timeout: timeout must be a positive number of seconds or timedelta (the process group's,"
        " default 1800 s); received -5."
    )
    config = recipe_with(tmp_path, "sync_every: 1", "sync_evry: 1")
    assert command_error(capsys, ["fit", "--config", config]) == (
        f"trainer.strategy.init_args.sync_evry (in {config}): no such option of lightning_hpsgd.HPSGDStrategy."
        " Did you mean sync_every?"
    )
    config = recipe_with(tmp_path, "max_epochs: 40", "max_epoch: 40")
    assert command_error(capsys, ["fit", "--config", config]) == (
        f"trainer.max_epoch (in {config}): no such option. Did you mean trainer.max_epochs?"
    )
    config = recipe_with(tmp_path, "seed_everything: 0", "seed_everythin: 0")
    assert command_error(capsys, ["fit", "--config", config]) == (
        f"seed_everythin (in {config}): no such option. Did you mean seed_everything?"
    )
    config = recipe_with(tmp_path, "save_last: true", "save_lats: true")
    assert command_error(capsys, ["fit", "--config", config]) == (
        f"trainer.callbacks.init_args.save_lats (in {config}): no such option of"
        " lightning.pytorch.callbacks.ModelCheckpoint. Did you mean save_last?"
    )
    assert command_error(capsys, ["fitt", "--config", MNIST1D]) == "subcommand: no subcommand 'fitt'. Did you mean fit?"


def test_hpsgd_debug_prints_the_parsers_whole_message(capsys, monkeypatch):
    monkeypatch.setenv("HPSGD_DEBUG", "1")
    with pytest.raises(SystemExit) as error:
        HPSGDCLI(args=["fit", "--config", MNIST1D, "--trainer.strategy.sync_evry", "2"])
    shown = capsys.readouterr().err
    assert error.value.code == 2 and "hpsgd: error:" not in shown
    assert "Option 'sync_evry' is not accepted" in shown and "usage: hpsgd" in shown


def test_the_strategy_name_without_the_import_fails_as_the_faq_says(tmp_path):
    """Lightning has no entry point that registers a strategy name: its only plugin group,
    ``lightning.pytorch.callbacks_factory``, is loaded after the strategy name is checked. The FAQ lists the error."""
    code = "from lightning.pytorch import Trainer\nTrainer(strategy='hpsgd', logger=False)"
    done = run_command([sys.executable, "-c", code], cwd=tmp_path, env=base_env(), timeout=CLI_TIMEOUT_S)
    assert done.returncode != 0
    assert "ValueError: You selected an invalid strategy name: `strategy='hpsgd'`" in done.stderr, done.stderr[-2000:]
    faq = (ROOT / "docs" / "faq.md").read_text()
    row = next(line for line in faq.splitlines() if "You selected an invalid strategy name" in line)
    assert "`import lightning_hpsgd`" in row and "class_path: lightning_hpsgd.HPSGDStrategy" in row
