"""Every way Lightning starts ranks: its own launchers, torchrun, SLURM and plain environment variables."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.launch import ROOT, base_env, free_port, run_commands

SCRIPT = str(ROOT / "tests" / "scripts" / "train_script.py")


# A launch here takes 10-32 s on an idle 2-core machine running the suite two tests at a time (the spawn launcher's
# and SLURM's four ranks are the longest): more than 10 times that, so that a machine busy with other work makes
# these tests slow, never a failure. The test's own limit leaves time to kill what is left.
LAUNCH_TIMEOUT_S = 400
pytestmark = pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)


def run(cmds: list[list[str]], envs: list[dict[str, str]]) -> None:
    for done in run_commands(cmds, envs, timeout=LAUNCH_TIMEOUT_S, merge_stderr=True):
        assert done.returncode == 0, done.stdout[-4000:]


def load_ranks(outdir, world_size: int) -> list[dict]:
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def assert_same_model(ranks: list[dict]) -> None:
    for r in ranks[1:]:
        for name, value in ranks[0]["state"].items():
            assert torch.equal(r["state"][name], value), name


@pytest.mark.parametrize(("strategy", "merge"), [("hpsgd", "replica"), ("hpsgd_stale", "stale")])
def test_popen_launcher_reruns_the_script(tmp_path, strategy, merge):
    run([[sys.executable, SCRIPT, str(tmp_path), strategy, "2", "1"]], [base_env()])
    ranks = load_ranks(tmp_path, 2)
    assert_same_model(ranks)
    assert {r["strategy"] for r in ranks} == {"HPSGDStrategy"} and {r["merge"] for r in ranks} == {merge}
    assert ranks[0]["rounds"] == 12 + 1  # 6 batches per rank and epoch, 2 epochs, H=1, plus the final flush
    # At exit HPSGD destroyed its own group and the default group Lightning made for it, so that gloo cannot free
    # work during interpreter shutdown (which aborts the process).
    for r in range(2):
        at_exit = json.loads((tmp_path / f"exit{r}.json").read_text())
        assert at_exit == {"hpsgd_group_destroyed": True, "default_group_destroyed": True}


@pytest.mark.parametrize("strategy", ["hpsgd_spawn", "hpsgd_fork"])
def test_multiprocessing_launchers_return_the_flushed_model(tmp_path, strategy):
    run([[sys.executable, SCRIPT, str(tmp_path), strategy, "2", "1"]], [base_env()])
    ranks = load_ranks(tmp_path, 2)
    assert_same_model(ranks)
    parent = torch.load(tmp_path / "parent.pt", weights_only=False)
    for name, value in ranks[0]["state"].items():
        assert torch.equal(parent["state"][name], value), name
    # The launching process never ran the engine: rank 0 sent its counters back with the model. The module's
    # on_train_end saw 13 rounds; the strategy flushes once more after every on_train_end hook (SWA writes there).
    assert ranks[0]["rounds"] == 12 + 1
    assert parent["stats"] is not None and parent["stats"]["rounds"] == 12 + 2 and parent["stats"]["flushes"] == 2


def test_torchrun_two_nodes(tmp_path):
    port = str(free_port())
    cmds = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={n}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            SCRIPT,
            str(tmp_path),
            "hpsgd",
            "1",
            "2",
        ]
        for n in range(2)
    ]
    run(cmds, [base_env(), base_env()])
    ranks = load_ranks(tmp_path, 2)
    assert_same_model(ranks)
    assert [r["environment"] for r in ranks] == ["TorchElasticEnvironment"] * 2
    assert [r["node_rank"] for r in ranks] == [0, 1]


def test_slurm_two_nodes_two_devices(tmp_path):
    port = str(free_port())
    envs = []
    for rank in range(4):
        env = base_env()
        env.update(
            SLURM_NTASKS="4",
            SLURM_NTASKS_PER_NODE="2",
            SLURM_NNODES="2",
            SLURM_JOB_NAME="hpsgd-test",
            SLURM_JOB_ID="4242",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank % 2),
            SLURM_NODEID=str(rank // 2),
            SLURM_NODELIST="127.0.0.1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        envs.append(env)
    run([[sys.executable, SCRIPT, str(tmp_path), "hpsgd", "2", "2"]] * 4, envs)
    ranks = load_ranks(tmp_path, 4)
    assert_same_model(ranks)
    assert {r["environment"] for r in ranks} == {"SLURMEnvironment"} and ranks[3]["world_size"] == 4
    assert [r["node_rank"] for r in ranks] == [0, 0, 1, 1]


def test_plain_environment_variables_two_nodes(tmp_path):
    port = str(free_port())
    envs = []
    for node in range(2):
        env = base_env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), LOCAL_RANK="0", WORLD_SIZE="2")
        envs.append(env)
    run([[sys.executable, SCRIPT, str(tmp_path), "hpsgd", "1", "2"]] * 2, envs)
    ranks = load_ranks(tmp_path, 2)
    assert_same_model(ranks)
    assert {r["environment"] for r in ranks} == {"LightningEnvironment"}
