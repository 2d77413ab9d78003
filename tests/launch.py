"""Start real multi-process runs for the tests: one OS process per rank, gloo on loopback.

Each rank runs ``python -m tests.worker SCENARIO OUTDIR ARGS_JSON`` with the environment variables of Lightning's
plain cluster environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``), the
way a user launches ranks by hand on several machines. Results come back as ``OUTDIR/rank{r}.pt``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("LOCAL_RANK", None)
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str
    result: dict[str, Any] | None
    seconds: float | None  # from launch to exit; None if it was killed at the timeout


def run_ranks(
    scenario: str,
    outdir: Path,
    args: dict[str, Any] | None = None,
    world_size: int = 2,
    num_nodes: int = 1,
    timeout: float = 180.0,
    check: bool = True,
    extra_env: dict[str, str] | None = None,
    stop_after_rank: int | None = None,
    link: Any = None,
) -> list[RankResult]:
    """Run ``scenario`` on ``world_size`` ranks spread over ``num_nodes`` simulated nodes; wait for all of them.

    If ``stop_after_rank`` is given, the other ranks are killed as soon as that rank has exited. With ``link`` (a
    ``lightning_hpsgd.bench.netns.SlowLink``), rank ``i`` runs in namespace ``i`` and talks over its throttled link.

    Raises:
        AssertionError: if ``check`` and any rank exited non-zero (with that rank's stderr).
    """
    outdir.mkdir(parents=True, exist_ok=True)
    per_node = world_size // num_nodes
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = base_env()
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(world_size),
            NODE_RANK=str(rank // per_node),
            LOCAL_RANK=str(rank % per_node),
            HPSGD_TEST_DEVICES=str(per_node),
            HPSGD_TEST_NODES=str(num_nodes),
        )
        if link is not None:
            env.update(MASTER_ADDR=link.address(0), GLOO_SOCKET_IFNAME="eth0")
        env.update(extra_env or {})
        out = open(outdir / f"rank{rank}.out", "w")
        err = open(outdir / f"rank{rank}.err", "w")
        cmd = [sys.executable, "-m", "tests.worker", scenario, str(outdir), json.dumps(args or {})]
        if link is not None:
            cmd = link.exec_prefix(rank) + cmd
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err), out, err))
    started = time.monotonic()
    finished: dict[int, float] = {}
    while len(finished) < len(procs) and time.monotonic() - started < timeout:
        for rank, (proc, _, _) in enumerate(procs):
            if rank not in finished and proc.poll() is not None:
                finished[rank] = time.monotonic() - started
        if stop_after_rank is not None and stop_after_rank in finished:
            break
        time.sleep(0.05)
    results = []
    for rank, (proc, out, err) in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()
        results.append(collect(rank, proc.returncode, outdir, finished.get(rank)))
    if check:
        for r in results:
            assert r.returncode == 0, f"rank {r.rank} exited with {r.returncode}:\n{r.stderr[-4000:]}"
    return results


def collect(rank: int, returncode: int, outdir: Path, seconds: float | None) -> RankResult:
    path = outdir / f"rank{rank}.pt"
    result = torch.load(path, weights_only=False) if path.exists() else None
    return RankResult(
        rank=rank,
        returncode=returncode,
        stdout=(outdir / f"rank{rank}.out").read_text() if (outdir / f"rank{rank}.out").exists() else "",
        stderr=(outdir / f"rank{rank}.err").read_text() if (outdir / f"rank{rank}.err").exists() else "",
        result=result,
        seconds=seconds,
    )
