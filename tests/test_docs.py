"""Every snippet on the Quick start and Lightning Fabric pages runs, as the page shows it (the Multi-node page's:
test_multinode_docs.py)."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.launch import ROOT, base_env, free_port, run_commands, run_ranks

SNIPPETS = ROOT / "docs" / "snippets"


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell: the venv's commands on PATH, no W&B credentials (so W&B runs offline), no test variables."""
    env = {k: v for k, v in base_env().items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["NETRC"] = str(tmp_path / "no-netrc")
    return env


# Limits on the snippets' commands, at least 10 times what they take on an idle 2-core machine running the suite two
# tests at a time, so that a machine busy with other work makes a test slow, never a failure: up to 25 s for a
# training script on 2-4 processes.
SNIPPET_TIMEOUT_S = 300


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


# The Quick start's command-line snippet (train, test, baseline, plot) runs in tests/test_flow.py.


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


def test_make_demo_runs_the_demo_module():
    done = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "-m lightning_hpsgd.recipes.demo --config recipes/mnist1d.yaml" in done.stdout


# --- the Lightning Fabric page ---------------------------------------------------------------------------------------


def test_fabric_loop_on_two_nodes_with_torchrun_then_resumed_with_the_popen_launcher(tmp_path):
    """The page's torchrun command on two nodes of one CPU process each (2 epochs of 63 iterations), then the
    page's resume command on one machine (Fabric's popen launch of 2 processes): it goes on at epoch 2 from the
    checkpoint, evaluates the flushed model, and logs the test accuracy and ``hpsgd/*`` through ``log_dict``."""
    shutil.copy(SNIPPETS / "fabric_loop.py", tmp_path / "fabric_loop.py")
    port = str(free_port())
    node = {"HEAD": "127.0.0.1", "PORT": port, "DEVICES": "1", "ACCELERATOR": "cpu"}
    envs = [{**user_env(tmp_path), **node, "NODE_RANK": str(rank)} for rank in (0, 1)]
    outs = run_all([["bash", "-e", str(SNIPPETS / "fabric_torchrun.sh")]] * 2, envs, tmp_path)
    trained = [re.findall(r"after (\d+) iterations: test accuracy ([0-9.]+)", out) for out in outs]
    assert [steps for steps, _ in trained[0]] == ["63", "126"], outs[0][-3000:]
    assert trained[0] == trained[1]  # node 1's first process prints too (fabric.print: local rank 0)
    (resumed,) = run_all([[sys.executable, "fabric_loop.py", "--epochs", "3"]], [user_env(tmp_path)], tmp_path)
    assert "resumed at epoch 2, batch 0" in resumed, resumed[-3000:]
    ((steps, accuracy),) = re.findall(r"after (\d+) iterations: test accuracy ([0-9.]+)", resumed)
    assert steps == "189" and float(accuracy) > float(trained[0][0][1]) > 0.2  # learning; 10 classes: chance 0.1
    logged = [path.read_text() for path in sorted((tmp_path / "logs" / "fabric_loop").glob("version_*/metrics.csv"))]
    assert len(logged) == 2
    for text in logged:
        header = text.splitlines()[0].split(",")
        assert {"test_acc", "train_loss", "hpsgd/rounds", "hpsgd/bytes", "hpsgd/hidden"} <= set(header), header


def test_fabric_critic_snippet_ends_an_iteration_per_batch(tmp_path):
    """``iteration_end="manual"``: 40 batches are 40 iterations whatever steps in them; with sync_every=4, 10 rounds,
    the flush when the critic joins the engine and the final one."""
    first, second = run_ranks("script", tmp_path, {"path": str(SNIPPETS / "fabric_critic.py")})
    assert "40 iterations, 12 rounds" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    assert second.returncode == 0


def test_fabric_configured_snippet_sets_the_options():
    fabric = runpy.run_path(str(SNIPPETS / "fabric_configured.py"))["fabric"]
    strategy = fabric.strategy
    assert type(strategy).__module__ == "lightning_hpsgd.fabric"
    assert strategy.sync_every == 4 and strategy.outer_momentum == 0.9 and strategy.comm_dtype == torch.bfloat16
    assert fabric.world_size == 2
