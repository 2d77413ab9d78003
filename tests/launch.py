"""Start real multi-process runs for the tests: one OS process per rank, gloo on loopback.

Each rank runs ``python -m tests.worker SCENARIO OUTDIR ARGS_JSON`` with the environment variables of Lightning's
plain cluster environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``), the
way a user launches ranks by hand on several machines. Results come back as ``OUTDIR/rank{r}.pt``.

Ranks are forked from a fork server that has already imported torch and Lightning (``multiprocessing``'s
``forkserver``, which never runs a torch operation itself), so that each rank skips the 4-5 s of imports that
dominate a short test on 2 cores. Each is still a separate process with its own environment, working directory,
stdout and stderr files, signal handlers and gloo process groups; it runs ``tests.worker.main`` as ``python -m``
would, atexit handlers included. Runs inside network namespaces (``link``) start a fresh interpreter.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


def run_commands(
    cmds: list[list[str]],
    envs: list[dict[str, str] | None],
    *,
    timeout: float,
    cwd: Path = ROOT,
    merge_stderr: bool = False,
) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side until all have exited, as ``subprocess.run(capture_output=True, text=True)``
    would run each, but each in a process group of its own and with its output in files (a full pipe never blocks a
    rank that another one waits for). After ``timeout`` seconds for all of them together the test fails; then, as
    after any run, each group is killed whole, so that no launcher's rank outlives the test.

    ``timeout`` guards against a hang only: give it about 10 times what the commands take on an idle machine, so
    that a machine busy with other work makes the test slow, never a failure.
    """
    streams = [(tempfile.TemporaryFile("w+"), None if merge_stderr else tempfile.TemporaryFile("w+")) for _ in cmds]
    procs = [
        subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err or subprocess.STDOUT, text=True, start_new_session=True
        )
        for cmd, env, (out, err) in zip(cmds, envs, streams)
    ]
    deadline = time.monotonic() + timeout
    try:
        for proc, (out, err) in zip(procs, streams):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                output = f"{_read(out)[-3000:]}{_read(err)[-3000:]}"
                raise AssertionError(f"{proc.args} still running after {timeout} s:\n{output}") from None
        return [
            subprocess.CompletedProcess(proc.args, proc.returncode, _read(out), None if err is None else _read(err))
            for proc, (out, err) in zip(procs, streams)
        ]
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in its group: nothing, after a clean run
            except ProcessLookupError:
                pass
            proc.wait()
        for pair in streams:
            for stream in pair:
                if stream is not None:
                    stream.close()


def _read(stream: IO[str] | None) -> str:
    if stream is None:
        return ""
    stream.seek(0)
    return stream.read()


def run_command(
    cmd: list[str], *, timeout: float, cwd: Path = ROOT, env: dict[str, str] | None = None, merge_stderr: bool = False
) -> subprocess.CompletedProcess[str]:
    """One command, as :func:`run_commands` runs it."""
    (done,) = run_commands([cmd], [env], timeout=timeout, cwd=cwd, merge_stderr=merge_stderr)
    return done


_FORKSERVER: list[Any] = []


def _forkserver() -> Any:
    """This test process's fork server, started once with the imports every rank needs."""
    if not _FORKSERVER:
        os.environ["OMP_NUM_THREADS"] = "1"  # read by torch when the server imports it
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["tests.worker"])
        _FORKSERVER.append(context)
    return _FORKSERVER[0]


def _run_forked(argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    """A rank, in a process forked from the server: as ``python -m tests.worker ARGV`` with ``env``."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = ["tests.worker", *argv]
    code = 0
    try:
        from tests import worker

        worker.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, int | None):
            print(exit_.code, file=sys.stderr)  # as the interpreter prints a non-integer exit code
    except BaseException:
        sys.excepthook(*sys.exc_info())  # as the interpreter reports an uncaught exception (HPSGD may shorten it)
        code = 1
    atexit._run_exitfuncs()  # what the interpreter would run at exit (process groups are destroyed there)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Forked:
    """The part of ``subprocess.Popen`` that ``run_ranks`` uses, for a rank forked from the server."""

    def __init__(self, argv: list[str], env: dict[str, str], out: Path, err: Path) -> None:
        self._process = _forkserver().Process(target=_run_forked, args=(argv, env, str(out), str(err)))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        return self._process.exitcode


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
        argv = [scenario, str(outdir), json.dumps(args or {})]
        if link is None:
            procs.append(_Forked(argv, env, outdir / f"rank{rank}.out", outdir / f"rank{rank}.err"))
            continue
        with open(outdir / f"rank{rank}.out", "w") as out, open(outdir / f"rank{rank}.err", "w") as err:
            cmd = [*link.exec_prefix(rank), sys.executable, "-m", "tests.worker", *argv]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))
    started = time.monotonic()
    finished: dict[int, float] = {}
    while len(finished) < len(procs) and time.monotonic() - started < timeout:
        for rank, proc in enumerate(procs):
            if rank not in finished and proc.poll() is not None:
                finished[rank] = time.monotonic() - started
        if stop_after_rank is not None and stop_after_rank in finished:
            break
        time.sleep(0.05)
    results = []
    for rank, proc in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
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
