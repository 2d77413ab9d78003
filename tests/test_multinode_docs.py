"""The Multi-node page's commands run as the page shows them, on one machine: nodes are process groups on
loopback. A preempted SLURM job resumes exactly, and a worker lost under torchrun's elastic agent costs a restart
and a resume from the last checkpoint, never a divergence."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.launch import ROOT, free_port, run_commands
from tests.test_docs import SNIPPET_TIMEOUT_S, SNIPPETS, run_all, user_env

TRAIN = SNIPPETS / "train.py"
SBATCH = SNIPPETS / "multinode_slurm.sbatch"

# A fault on one rank, injected into the unchanged train.py through Lightning's entry point for external callbacks
# ("lightning.pytorch.callbacks_factory"): FAULT="SIGNAL:RANK:STEP" sends SIGNAL to that rank before the batch that
# starts at global step STEP, on the first attempt only (TORCHELASTIC_RESTART_COUNT 0 or unset). Every rank prints
# the step its fit starts at.
FAULTS_PY = """
import os
import signal

from lightning.pytorch import Callback


class Fault(Callback):
    def on_train_start(self, trainer, pl_module):
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "-")
        print(f"rank {trainer.global_rank}: fit starts at step {trainer.global_step} (restart {restart})", flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        name, rank, step = os.environ.get("FAULT", "NONE:-1:-1").split(":")
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.global_rank == int(rank) and trainer.global_step == int(step):
            print(f"rank {rank}: {name} at step {step}", flush=True)
            os.kill(os.getpid(), getattr(signal, name))


def callbacks():
    return [Fault()]
"""


def fault_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """A user's shell, with the fault plugin importable (its package metadata names the entry point)."""
    plugin = tmp_path / "plugin"
    if not plugin.exists():
        (plugin / "faults-0.dist-info").mkdir(parents=True)
        (plugin / "faults.py").write_text(FAULTS_PY)
        (plugin / "faults-0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: faults\nVersion: 0\n")
        (plugin / "faults-0.dist-info" / "entry_points.txt").write_text(
            "[lightning.pytorch.callbacks_factory]\nfaults = faults:callbacks\n"
        )
    env = user_env(tmp_path)
    env["PYTHONPATH"] = f"{plugin}{os.pathsep}{env['PYTHONPATH']}"
    env.update(values)
    return env


def final_digests(outs: list[str]) -> dict[int, str]:
    """train.py's last line on each rank: the step and a hash of the parameters' bytes."""
    found = {
        int(r): f"{step} {digest}" for r, step, digest in re.findall(r"rank (\d+): step (\d+), (\w+)", "".join(outs))
    }
    assert found, "".join(outs)[-3000:]
    return found


def snippet_command(path: Path, start: str) -> str:
    """The command that starts with ``start`` in a snippet, its continuation lines joined."""
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    command = []
    for line in lines[first:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(command)


def replaced(command: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert old in command, f"{old!r} is no longer in {command!r}"
        command = command.replace(old, new)
    return command


# --- SLURM -----------------------------------------------------------------------------------------------------------


def srun_tasks(tmp_path: Path, nodes: int, per_node: int, **values: str) -> tuple[list[list[str]], list[dict]]:
    """The sbatch script's srun command, once per task, with the variables srun sets for that task."""
    command = snippet_command(SBATCH, "srun ").removeprefix("srun ").split(" || ")[0]
    port = str(free_port())
    envs = []
    for rank in range(nodes * per_node):
        env = fault_env(tmp_path, **values)
        env.update(SLURM_NTASKS=str(nodes * per_node), SLURM_NTASKS_PER_NODE=str(per_node),
                   SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes), SLURM_JOB_NAME="hpsgd",
                   SLURM_JOB_ID="4242", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                   SLURM_NODEID=str(rank // per_node), SLURM_NODELIST="127.0.0.1", SLURM_CPUS_PER_TASK="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        envs.append(env)
    return [["bash", "-c", command]] * len(envs), envs


def test_slurm_script_sets_what_preemption_needs():
    script = SBATCH.read_text()
    for option in ("--signal=SIGTERM@90", "--requeue", "--cpus-per-task=", "--ntasks-per-node=", "--gpus-per-node="):
        assert re.search(rf"^#SBATCH {re.escape(option)}", script, re.M), option
    stopped = re.search(r"^STOPPED = (\d+)", TRAIN.read_text(), re.M).group(1)
    assert f'if [ "$status" -eq {stopped} ]; then\n    scontrol requeue "$SLURM_JOB_ID"' in script
    assert "SLURMEnvironment(auto_requeue=False)" in TRAIN.read_text()


def test_slurm_command_on_two_nodes_of_two_tasks(tmp_path):
    """The srun command with the variables SLURM sets, 2 nodes x 2 tasks: hierarchy="node" sends 1/2 of the model."""
    shutil.copy(TRAIN, tmp_path / "train.py")
    outs = run_all(*srun_tasks(tmp_path, nodes=2, per_node=2), tmp_path)
    assert any("trained on 4 processes, 2 nodes" in out for out in outs), outs[0][-3000:]
    sent, model = map(int, re.search(r"each rank sent (\d+) of the model's (\d+) bytes", "".join(outs)).groups())
    assert sent == -(-model // 4 // 2) * 4
    assert len(set(final_digests(outs).values())) == 1


def test_preempted_slurm_job_resumes_exactly(tmp_path):
    """SIGTERM to rank 1 in step 4 of 24 (12 per epoch). The ranks agree to stop after step 8 (sync_every=4: the
    round launched at step 4 carries the request, its merge at step 8 reveals it), flush, write on_exception.ckpt
    and exit with train.py's STOPPED code. The same command again (the requeued job) resumes from it in mid-epoch
    and ends bit-identical, on both ranks, to an uninterrupted run that also saved at step 8: a checkpoint is a
    flush, which is part of HPSGD's run. The preempted run saves every 16 steps, so its only checkpoint at the stop
    is the one written on SIGTERM."""
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    for folder in (reference, preempted):
        folder.mkdir()
        shutil.copy(TRAIN, folder / "train.py")
    every = lambda n: ["--save-every-n-steps", str(n)]  # noqa: E731

    cmds, envs = srun_tasks(tmp_path, nodes=2, per_node=1)
    expected = final_digests(run_all([c[:2] + [f"{c[2]} {' '.join(every(8))}"] for c in cmds], envs, reference))
    assert set(expected) == {0, 1} and len(set(expected.values())) == 1 and expected[0].startswith("24 ")

    cmds, envs = srun_tasks(tmp_path, nodes=2, per_node=1, FAULT="SIGTERM:1:3")
    cmds = [c[:2] + [f"{c[2]} {' '.join(every(16))}"] for c in cmds]
    stopped = run_commands(cmds, envs, cwd=preempted, timeout=SNIPPET_TIMEOUT_S, merge_stderr=True)
    for done in stopped:
        assert done.returncode == 3, done.stdout[-3000:]
        assert "every rank stops after optimizer step 8" in done.stdout, done.stdout[-3000:]
    assert sorted(p.name for p in (preempted / "checkpoints").iterdir()) == ["on_exception.ckpt"]

    cmds, envs = srun_tasks(tmp_path, nodes=2, per_node=1)  # the requeued job: the same command
    outs = run_all([c[:2] + [f"{c[2]} {' '.join(every(16))}"] for c in cmds], envs, preempted)
    assert all("fit starts at step 8" in out for out in outs), outs[0][-3000:]
    assert final_digests(outs) == expected
    # Its fit ended: on_exception.ckpt is gone (OnExceptionCheckpoint's teardown), last.ckpt is the final model.
    assert not (preempted / "checkpoints" / "on_exception.ckpt").exists()


# --- torchrun --------------------------------------------------------------------------------------------------------


def torchrun_env(tmp_path: Path, port: int, devices: int, **values: str) -> dict[str, str]:
    return fault_env(tmp_path, HEAD="127.0.0.1", PORT=str(port), JOB_ID="test", DEVICES=str(devices), **values)


def test_a_worker_killed_under_torchrun_costs_a_restart_and_a_resume(tmp_path):
    """torchrun's elastic agent, 1 node x 2 workers of flat HPSGD, --max-restarts=1. On the first attempt rank 1
    kills itself with SIGKILL before step 13 (after the checkpoint at step 8). The agent stops the survivor and
    restarts both; they resume from last.ckpt at step 8 and end with the same parameters."""
    shutil.copy(TRAIN, tmp_path / "train.py")
    script = replaced(
        (SNIPPETS / "multinode_torchrun.sh").read_text(),
        ("--nnodes=2", "--nnodes=1"),
        ("--max-restarts=3", "--max-restarts=1"),
        ("--num-nodes 2", "--num-nodes 1"),
        (" --hierarchy node", ""),  # one node: flat HPSGD between its 2 workers
    )
    (tmp_path / "torchrun.sh").write_text(script)
    env = torchrun_env(tmp_path, free_port(), 2, FAULT="SIGKILL:1:12")
    cmd = ["bash", "-e", str(tmp_path / "torchrun.sh")]
    (done,) = run_commands([cmd], [env], cwd=tmp_path, timeout=SNIPPET_TIMEOUT_S, merge_stderr=True)
    out = done.stdout
    assert done.returncode == 0, out[-4000:]
    assert "rank 1: SIGKILL at step 12" in out, out[-4000:]
    assert "exitcode: -9" in out, out[-4000:]  # the agent saw the worker die, and restarted the group
    starts = re.findall(r"rank (\d): fit starts at step (\d+) \(restart (\d)\)", out)
    assert sorted(starts) == [("0", "0", "0"), ("0", "8", "1"), ("1", "0", "0"), ("1", "8", "1")], starts
    digests = final_digests([out])
    assert set(digests) == {0, 1} and len(set(digests.values())) == 1 and digests[0].startswith("24 "), digests


# --- plain environment variables -------------------------------------------------------------------------------------


def test_plain_environment_commands_on_two_nodes(tmp_path):
    shutil.copy(TRAIN, tmp_path / "train.py")
    port = str(free_port())
    values = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DEVICES="1", LOCAL_RANK="0")
    envs = [fault_env(tmp_path, NODE_RANK=str(n), **values) for n in range(2)]
    outs = run_all([["bash", "-e", str(SNIPPETS / "multinode_env.sh")]] * 2, envs, tmp_path)
    assert any("trained on 2 processes, 2 nodes" in out for out in outs), outs[0][-3000:]
    assert len(set(final_digests(outs).values())) == 1


# --- hpsgd fit across nodes ------------------------------------------------------------------------------------------


@pytest.mark.timeout(SNIPPET_TIMEOUT_S + 60)
def test_hpsgd_fit_across_two_nodes_with_torchrun(tmp_path):
    """The page's `torchrun ... -m lightning_hpsgd fit` on 2 "nodes" of 1 CPU process, with the offline MNIST-1D
    recipe in place of the GPU one, and a few steps: two elastic agents meet at the c10d endpoint. (The page's
    torchrun command for train.py runs in the test below, on one node of 2 workers.)"""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    command = replaced(
        snippet_command(SNIPPETS / "multinode_cli.sh", "torchrun "),
        ("recipes/cifar10_resnet18.yaml", "recipes/mnist1d.yaml"),
    )
    command += " --trainer.max_steps 6 --trainer.limit_val_batches 2"
    command += " --trainer.enable_progress_bar false"
    port = free_port()
    # W&B disabled: its offline runs are tested in test_cli and test_wandb.
    envs = [{**torchrun_env(tmp_path, port, 1), "WANDB_MODE": "disabled"} for _ in range(2)]
    outs = run_all([["bash", "-c", command]] * 2, envs, tmp_path)
    assert "`Trainer.fit` stopped: `max_steps=6` reached." in "".join(outs), outs[0][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in "".join(outs), outs[0][-3000:]
