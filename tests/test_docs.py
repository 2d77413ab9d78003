"""Every snippet on the Quick start and Multi-node pages runs, as the pages show it."""

from __future__ import annotations

import math
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import ROOT, base_env, free_port, run_commands

SNIPPETS = ROOT / "docs" / "snippets"


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell: the venv's commands on PATH, no W&B credentials (so W&B runs offline), no test variables."""
    env = {k: v for k, v in base_env().items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["NETRC"] = str(tmp_path / "no-netrc")
    return env


# Limits on the snippets' commands, at least 10 times what they take on an idle 2-core machine running the suite two
# tests at a time, so that a machine busy with other work makes a test slow, never a failure: up to 25 s for a
# training script on 2-4 processes, about 55 s for the Quick start's train-then-test commands.
SNIPPET_TIMEOUT_S = 300
QUICKSTART_CLI_TIMEOUT_S = 600


def run_all(
    cmds: list[list[str]], envs: list[dict[str, str]], cwd: Path, timeout: float = SNIPPET_TIMEOUT_S
) -> list[str]:
    outs = []
    for done in run_commands(cmds, envs, cwd=cwd, timeout=timeout, merge_stderr=True):
        assert done.returncode == 0, done.stdout[-4000:]
        outs.append(done.stdout)
    return outs


def test_quickstart_script_trains_with_hpsgd_on_two_processes(tmp_path):
    (out,) = run_all([[sys.executable, str(SNIPPETS / "quickstart.py")]], [user_env(tmp_path)], tmp_path)
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in out


def test_configured_strategy_snippet_sets_the_options():
    trainer = runpy.run_path(str(SNIPPETS / "quickstart_configured.py"))["trainer"]
    assert type(trainer.strategy).__name__ == "HPSGDStrategy"
    assert trainer.strategy.sync_every == 4 and trainer.strategy.comm_dtype == torch.bfloat16
    assert trainer.num_devices == 2


def test_comm_hooks_snippet_builds_ddp_with_powersgd_and_bf16():
    """The comparison page's snippet: DDP with PowerSGD at rank 1 after 10 % of the steps, or with bf16 gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    names = runpy.run_path(str(SNIPPETS / "comm_hooks.py"))
    trainer, powersgd, bf16 = names["trainer"], names["powersgd"], names["bf16"]
    assert trainer.strategy is powersgd and trainer.max_steps == 10_000
    assert powersgd._ddp_comm_hook is powerSGD_hook.powerSGD_hook
    state = powersgd._ddp_comm_state
    assert state.matrix_approximation_rank == 1 and state.start_powerSGD_iter == 1000 and state.use_error_feedback
    assert bf16._ddp_comm_hook is default_hooks.bf16_compress_hook


@pytest.mark.timeout(QUICKSTART_CLI_TIMEOUT_S + 60)
def test_quickstart_commands_train_then_test_a_recipe(tmp_path):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    cmd = ["bash", "-e", str(SNIPPETS / "quickstart_cli.sh")]
    (out,) = run_all([cmd], [user_env(tmp_path)], tmp_path, QUICKSTART_CLI_TIMEOUT_S)
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in out
    accuracy = float(re.search(r"test/acc\s+│?\s*([0-9.]+)", out).group(1))
    # 2 epochs of MNIST-1D: above chance (0.1); the demo test checks the accuracy of a full run.
    assert accuracy > 0.2, out[-3000:]


def multinode_env(tmp_path: Path, port: int, **values: str) -> dict[str, str]:
    env = user_env(tmp_path)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DEVICES="1", **values)
    return env


def test_multinode_torchrun_commands(tmp_path):
    shutil.copy(SNIPPETS / "train.py", tmp_path / "train.py")
    port = free_port()
    envs = [multinode_env(tmp_path, port, NODE_RANK=str(n)) for n in range(2)]
    outs = run_all([["bash", "-e", str(SNIPPETS / "multinode_torchrun.sh")]] * 2, envs, tmp_path)
    assert any("trained on 2 processes, 2 nodes" in out for out in outs), outs[0][-3000:]


def test_multinode_plain_environment_commands(tmp_path):
    shutil.copy(SNIPPETS / "train.py", tmp_path / "train.py")
    port = free_port()
    envs = [multinode_env(tmp_path, port, NODE_RANK=str(n), LOCAL_RANK="0") for n in range(2)]
    outs = run_all([["bash", "-e", str(SNIPPETS / "multinode_env.sh")]] * 2, envs, tmp_path)
    assert any("trained on 2 processes, 2 nodes" in out for out in outs), outs[0][-3000:]


def test_multinode_slurm_command_with_the_variables_srun_sets(tmp_path):
    """`sbatch` cannot run here: each task runs the script's `srun` command with the variables SLURM would set."""
    shutil.copy(SNIPPETS / "train.py", tmp_path / "train.py")
    script = (SNIPPETS / "multinode_slurm.sbatch").read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", script).group(1))
    per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", script).group(1))
    (command,) = [line.split()[1:] for line in script.splitlines() if line.startswith("srun ")]
    port, tasks = str(free_port()), nodes * per_node
    envs = []
    for rank in range(tasks):
        env = user_env(tmp_path)
        env.update(SLURM_NTASKS=str(tasks), SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NNODES=str(nodes),
                   SLURM_JOB_NAME="train", SLURM_JOB_ID="4242", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank % per_node), SLURM_NODEID=str(rank // per_node),
                   SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        envs.append(env)
    command[0] = sys.executable if command[0] == "python" else command[0]
    assert command[-2:] == ["--hierarchy", "node"]
    outs = run_all([command] * tasks, envs, tmp_path)
    assert any(f"trained on {tasks} processes, {nodes} nodes" in out for out in outs), outs[0][-3000:]
    # hierarchy="node": each rank sends its 1/per_node share of the model between nodes.
    sent, model = map(int, re.search(r"each rank sent (\d+) of the model's (\d+) bytes", "".join(outs)).groups())
    assert sent == math.ceil(model / 4 / per_node) * 4


def test_make_demo_runs_the_demo_module():
    done = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "-m lightning_hpsgd.recipes.demo --config recipes/mnist1d.yaml" in done.stdout
