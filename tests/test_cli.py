"""The `hpsgd` command line and the YAML recipes: parsing, overrides, fast_dev_run, offline errors, the demo."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_hpsgd import HPSGDStrategy
from lightning_hpsgd.cli import HPSGDCLI, UsageError, check_command_line, expand_strategy_names
from lightning_hpsgd.wandb import find_run_files, read_run
from tests.launch import ROOT, base_env, run_command

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MNIST1D = str(ROOT / "recipes" / "mnist1d.yaml")


def test_there_is_a_recipe_and_three_baselines_per_data_set():
    names = {p.stem for p in RECIPES}
    for recipe in ("mnist1d", "cifar10_resnet18"):
        assert {recipe, f"{recipe}_ddp", f"{recipe}_localsgd", f"{recipe}_stale"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_prints_its_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        HPSGDCLI(args=["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_hpsgd.recipes." in printed
    assert "strategy:" in printed and "seed_everything: 0" in printed


def test_expand_strategy_names():
    assert expand_strategy_names(["fit", "--trainer.strategy", "hpsgd"]) == ["fit", "--trainer.strategy", "hpsgd"]
    expanded = expand_strategy_names(["--trainer.strategy=hpsgd_stale", "--trainer.strategy.sync_every", "4"])
    assert expanded == [
        "--trainer.strategy", "lightning_hpsgd.HPSGDStrategy",
        "--trainer.strategy.start_method", "popen",
        "--trainer.strategy.merge", "stale",
        "--trainer.strategy.sync_every", "4",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "strategy_args",
    [
        ["--trainer.strategy", "hpsgd_stale", "--trainer.strategy.sync_every", "4"],
        ["--trainer.strategy", "lightning_hpsgd.HPSGDStrategy", "--trainer.strategy.sync_every", "4",
         "--trainer.strategy.merge", "stale"],
    ],
    ids=["registered-name", "class-path"],
)  # fmt: skip
def test_strategy_options_on_the_command_line(strategy_args):
    cli = HPSGDCLI(run=False, args=["--config", MNIST1D, "--trainer.devices", "2", *strategy_args])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, HPSGDStrategy)
    assert (strategy.sync_every, strategy.merge) == (4, "stale")


def test_yaml_strategy_override_by_dotted_option():
    cli = HPSGDCLI(run=False, args=["--config", MNIST1D, "--trainer.strategy.sync_every", "3"])
    assert cli.trainer.strategy.sync_every == 3 and cli.trainer.strategy.merge == "replica"


def recipe_with_strategy_options(tmp_path: Path, **options: str) -> str:
    """MNIST1D's recipe with its strategy's init_args updated by ``options``, each value as written in the YAML."""
    recipe = (ROOT / "recipes" / "mnist1d.yaml").read_text()
    init_args = "      sync_every: 1\n      merge: replica\n"
    assert init_args in recipe
    init_args_after = {"sync_every": "1", "merge": "replica", **options}
    lines = "".join(f"      {key}: {value}\n" for key, value in init_args_after.items())
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.replace(init_args, lines, 1))
    return str(path)


# PyYAML's YAML 1.1 reads 1e-3 as a string (a float needs a dot); jsonargparse's loader, and so LightningCLI, reads
# a float. The pre-check must accept what LightningCLI accepts.
@pytest.mark.parametrize(("text", "value"), [("1e-3", 0.001), ("5e-1", 0.5)])
@pytest.mark.parametrize("where", ["command-line", "config"])
def test_outer_lr_in_exponent_notation_passes_the_check_and_reaches_the_strategy_as_a_float(
    where, text, value, tmp_path
):
    if where == "command-line":
        args = ["--config", MNIST1D, "--trainer.strategy.outer_lr", text]
    else:
        args = ["--config", recipe_with_strategy_options(tmp_path, outer_lr=text)]
    check_command_line(["fit", *args])
    strategy = HPSGDCLI(run=False, args=args).trainer.strategy
    assert isinstance(strategy, HPSGDStrategy)
    assert isinstance(strategy.outer_lr, float) and strategy.outer_lr == value


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("sync_every", "0", "--trainer.strategy.sync_every: sync_every must be an integer >= 1"),
        ("merge", "bogus", "--trainer.strategy.merge: merge must be one of ['replica', 'stale']; received 'bogus'."),
        ("outer_lr", "0e0", "--trainer.strategy.outer_lr: outer_lr must be a finite number > 0 (1.0: plain HPSGD);"
         " received 0.0."),
        ("sync_delay", "5", "--trainer.strategy.sync_delay: sync_delay must be an integer from 0 to sync_every"
         " (H = 1)"),
        ("fragments", "0", "--trainer.strategy.fragments: fragments must be an integer from 1 to sync_every (H = 1)"),
    ],
    ids=["sync_every-0", "merge-bogus", "outer_lr-0e0", "sync_delay-5", "fragments-0"],
)  # fmt: skip
@pytest.mark.parametrize("where", ["command-line", "config"])
def test_the_check_still_refuses_bad_strategy_options_in_one_line(where, option, value, message, tmp_path):
    if where == "command-line":
        args = ["fit", "--config", MNIST1D, f"--trainer.strategy.{option}", value]
    else:
        args = ["fit", "--config", recipe_with_strategy_options(tmp_path, **{option: value})]
    with pytest.raises(UsageError) as error:
        check_command_line(args)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


# Limits on the commands, at least 10 times what each takes on an idle 2-core machine running the suite two tests
# at a time, so that a machine busy with other work makes a test slow, never a failure: up to 10 s for a command
# that stops at its arguments (CLI_TIMEOUT_S), up to 45 s for a fast_dev_run on two processes (CIFAR-10's
# ResNet-18), about 95 s for the demo's 40 epochs.
CLI_TIMEOUT_S = 240
FAST_DEV_RUN_TIMEOUT_S = 450
DEMO_TIMEOUT_S = 1000


def run_cli(args: list[str], cwd: Path, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "lightning_hpsgd", *args], cwd=cwd, env=base_env(), timeout=timeout)


# The baselines' YAML files are parsed by test_every_recipe_prints_its_config, and their strategies run in
# test_baselines.py and test_features.py; running them here again would only repeat those launches.
# mnist1d.yaml runs through the command line, on 2 processes, in tests/test_flow.py (the Quick start's flow).
HPSGD_RECIPES = [p for p in RECIPES if not p.stem.endswith(("_ddp", "_localsgd", "_stale")) and p.stem != "mnist1d"]


@pytest.mark.timeout(FAST_DEV_RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("recipe", HPSGD_RECIPES, ids=lambda p: p.stem)
def test_every_hpsgd_recipe_runs_fast_dev_run_on_two_processes(recipe, tmp_path, tmp_path_factory):
    args = ["fit", "--config", str(recipe), "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2"]  # fmt: skip
    if recipe.stem.startswith("cifar10"):
        args += ["--data.fake", "true", "--data.batch_size", "4", "--data.num_workers", "0", "--data.fake_size", "16"]
    elif recipe.stem.startswith("mnist1d"):
        args += ["--data.data_dir", str(tmp_path_factory.getbasetemp() / "mnist1d")]
    done = run_cli(args, cwd=tmp_path, timeout=FAST_DEV_RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Running in `fast_dev_run` mode" in done.stderr + done.stdout
    if recipe.stem.startswith("cifar10"):
        assert "training on SYNTHETIC data" in done.stderr


def test_cifar10_offline_without_data_fails_at_once_and_says_where_to_put_it(tmp_path):
    recipe = str(ROOT / "recipes" / "cifar10_resnet18.yaml")
    done = run_cli(
        ["fit", "--config", recipe, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
         "--data.data_dir", str(tmp_path / "cifar")],
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"CIFAR-10 is not in {tmp_path / 'cifar' / 'cifar-10-batches-py'}" in done.stderr
    assert "--data.fake true" in done.stderr


# What `make demo` must not print before its result table: library warnings (a path:line prefix, or "Warning"),
# deprecations, advice and advertisements (Lightning's "Tip"), and W&B's console lines.
NOISE = re.compile(r"warn|deprecat|recommend|tip:|litlogger|^wandb:|\.py:\d+: ", re.IGNORECASE)


def noise_before_the_table(stdout: str, stderr: str) -> list[str]:
    """The lines of the demo's output, before its "Result:" table, that are warnings or advertisements."""
    before = stdout.split("\nResult: ")[0].splitlines() + stderr.splitlines()
    return [line for line in before if NOISE.search(line)]


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_demo_reaches_the_mnist1d_paper_accuracy(tmp_path):
    """`make demo`'s run: the MNIST-1D recipe with HPSGD on 2 processes must reach >= 94 % test accuracy, and
    print no library warning or advertisement before its table.

    Its logs land where the recipe says, relative to the working directory: CSV, and W&B offline (no API key here).
    """
    env = {k: v for k, v in base_env().items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    done = run_command(
        [sys.executable, "-m", "lightning_hpsgd.recipes.demo", "--config", MNIST1D,
         "--trainer.enable_progress_bar", "false", "--data.data_dir", str(tmp_path / "mnist1d"),
         "--trainer.default_root_dir", str(tmp_path)],
        cwd=tmp_path, env=env, timeout=DEMO_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert noise_before_the_table(done.stdout, done.stderr) == []
    accuracy = float(re.search(r"test accuracy\s+([0-9.]+)", done.stdout).group(1))
    assert accuracy >= 0.94, done.stdout
    # Its own checkpoint folder: the user's checkpoints/mnist1d_hpsgd/last.ckpt (the Quick start's) is not replaced.
    assert (tmp_path / "checkpoints" / "demo" / "mnist1d_hpsgd" / "last.ckpt").is_file()
    assert not (tmp_path / "checkpoints" / "mnist1d_hpsgd").exists()
    assert re.search(r"HPSGD rounds\s+\d+", done.stdout) and "mean wait per round" in done.stdout
    metrics = tmp_path / "lightning_logs" / "mnist1d_hpsgd" / "version_0" / "metrics.csv"
    # An accuracy curve, not 4 points: validation every 2 of the 40 epochs.
    assert sum(1 for row in csv.DictReader(metrics.open()) if row.get("val/acc")) == 20
    (run_file,) = find_run_files(tmp_path / "lightning_logs" / "mnist1d_hpsgd" / "wandb")
    run = read_run(run_file)
    assert (run.project, run.group, run.job_type) == ("lightning-hpsgd", "mnist1d", "hpsgd")
    assert run.config["strategy"]["name"] == "hpsgd" and run.config["lr"] == 0.01  # strategy and model options
    final = [row for row in run.history if "val/acc" in row][-1]
    assert final["val/acc"] >= 0.9 and final["time/wall_s"] > 0
    assert "W&B is offline" in done.stdout + done.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "hpsgd"
    done = run_command([str(script), "fit", "--help"], env=base_env(), timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--trainer.strategy" in done.stdout and "--config" in done.stdout


def test_top_level_help_names_the_project_every_subcommand_the_recipes_and_an_example(tmp_path):
    for command in ([sys.executable, "-m", "lightning_hpsgd", "--help"], [str(Path(sys.executable).parent / "hpsgd")]):
        done = run_command(command, cwd=tmp_path, env=base_env(), timeout=CLI_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-2000:]
        out = done.stdout
        assert out.startswith("usage: hpsgd {fit,validate,test,predict,plot,dashboard}") and "__main__" not in out
        assert "HPSGD (Hierarchical Parallel SGD)" in out
        for subcommand in ("fit", "validate", "test", "predict", "plot", "dashboard"):
            assert re.search(rf"^  {subcommand} ", out, re.MULTILINE), subcommand
        assert f"recipes ({ROOT / 'recipes'})" in out and "mnist1d.yaml" in out
        assert "hpsgd fit --config recipes/mnist1d.yaml" in out
        assert max(len(line) for line in out.splitlines()) <= 120


# One real command per kind of mistake (a value out of range, an unknown strategy, a missing recipe): the command's
# imports take most of its 10 s. The other values out of range run through the same entry point in this process.
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", MNIST1D, "--trainer.strategy.sync_every", "0", "--print_config"],
         "--trainer.strategy.sync_every: sync_every must be an integer >= 1 (optimizer steps per round) or 'auto'"
         " (chosen from the measured communication and compute times); received 0."),
        (["--config", MNIST1D, "--trainer.strategy", "hpsdg"],
         "--trainer.strategy: unknown strategy 'hpsdg'. Did you mean 'hpsgd'?"),
        (["--config", str(ROOT / "recipes" / "mnist1dd.yaml")],
         "--config: no such file: '" + str(ROOT / "recipes" / "mnist1dd.yaml") + "'. Did you mean recipes/mnist1d.yaml?"
         f" Recipes in {ROOT / 'recipes'}: cifar10_resnet18.yaml,"),
    ],
    ids=["sync_every-0", "misspelled-strategy", "misspelled-recipe"],
)  # fmt: skip
def test_user_errors_end_in_one_short_line(args, message, tmp_path):
    done = run_cli(["fit", *args], cwd=tmp_path)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    assert lines[0].startswith("hpsgd: error: " + message), lines[0]


def test_strategy_values_out_of_range_end_in_one_short_line(capsys):
    from tests.test_cli_errors import command_error

    cases = {
        ("--trainer.strategy.outer_momentum", "1.5"): "--trainer.strategy.outer_momentum: outer_momentum must be a"
        " number in [0, 1)",
        ("--trainer.strategy.hierarchy", "rack"): "--trainer.strategy.hierarchy: hierarchy must be None (flat HPSGD:"
        " every rank a worker) or 'node'",
        ("--trainer.strategy.merge", "foo"): "--trainer.strategy.merge: merge must be one of ['replica', 'stale'];"
        " received 'foo'.",
    }
    for args, message in cases.items():
        line = command_error(capsys, ["fit", "--config", MNIST1D, *args])
        assert line.startswith(message), line


def test_sync_every_0_in_a_yaml_recipe_is_refused_as_on_the_command_line(tmp_path):
    recipe = (ROOT / "recipes" / "mnist1d.yaml").read_text().replace("sync_every: 1", "sync_every: 0")
    (tmp_path / "bad.yaml").write_text(recipe)
    done = run_cli(["fit", "--config", str(tmp_path / "bad.yaml"), "--print_config"], cwd=tmp_path)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "hpsgd: error: --trainer.strategy.sync_every: sync_every must be an integer >= 1 (optimizer steps per round) or"
        " 'auto' (chosen from the measured communication and compute times); received 0."
    ]


def test_strategy_help_accepts_a_registered_name(tmp_path):
    done = run_cli(["fit", "--trainer.strategy.help", "hpsgd"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--trainer.strategy.sync_every SYNC_EVERY" in done.stdout
    assert "--trainer.strategy.merge {replica,stale}" in done.stdout
