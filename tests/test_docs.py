"""Every snippet on the Quick start page runs, as the page shows it (the Multi-node page's: test_multinode_docs.py)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch

from tests.launch import ROOT, base_env, run_commands

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
