"""A real slow link between benchmark workers: one network namespace per worker, rate-limited veth links.

Layout for ``N`` workers (all names carry the orchestrator's PID, so concurrent runs never collide)::

    worker namespace i:  eth0 (10.213.0.<i+1>/24, tbf egress)  ──veth──  v<i> (tbf egress) ┐
                                                                                            ├ br0 in the hub namespace
    worker namespace j:  eth0 (10.213.0.<j+1>/24, tbf egress)  ──veth──  v<j> (tbf egress) ┘

Each worker's link is limited to the same rate in both directions (``tc qdisc ... tbf``), like a machine's network
card. Nothing is created in the root namespace. Needs root and iproute2 (``ip``, ``tc``). [`SlowLink`][] removes
everything on exit, on errors and on Ctrl-C; [`remove_stale`][] removes what a killed run left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence

PREFIX = "hpsgdb"
SUBNET = "10.213.0"
INTERFACE = "eth0"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, or the kernel refused)."""


def _run(args: Sequence[str]) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Delete benchmark namespaces whose orchestrator process is gone; return their names."""
    removed = []
    if shutil.which("ip") is None:
        return removed
    for name in _names():
        match = re.fullmatch(rf"{PREFIX}(\d+)[hw]\d*", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def tbf_args(mbit: float) -> list[str]:
    """``tc`` arguments for a token bucket at ``mbit`` megabits per second.

    The bucket holds about 2 ms of traffic (at least 32 KiB, so that one 64 KiB GSO segment is not dropped as
    oversize at low rates), and packets queue at most 200 ms before tbf drops them (TCP then backs off).
    """
    rate_bytes = mbit * 1e6 / 8
    burst = max(32 * 1024, int(rate_bytes * 0.002))
    return ["tbf", "rate", f"{mbit:.3f}mbit", "burst", str(burst), "latency", "200ms"]


class SlowLink:
    """Network namespaces for ``workers`` processes joined by a bridge, each link limited to ``mbit``.

    Use as a context manager. [`address`][] is a worker's IP, [`exec_prefix`][] the command prefix that runs a
    program inside its namespace, and [`set_rate`][] changes every link's speed in place.

    Raises:
        NetnsUnavailable: if the namespaces cannot be made (whatever was made is removed first).
    """

    def __init__(self, workers: int, mbit: float) -> None:
        if workers < 1 or workers > 250:
            raise ValueError(f"workers must be between 1 and 250; received {workers}.")
        self.workers = workers
        self.mbit = mbit
        tag = f"{PREFIX}{os.getpid()}"
        self.hub = f"{tag}h"
        self.namespaces = [f"{tag}w{i}" for i in range(workers)]
        self._made: list[str] = []

    def __enter__(self) -> SlowLink:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (this process is not root).")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"`{tool}` (iproute2) is not installed.")
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        remove_stale()
        for name in [self.hub, *self.namespaces]:
            _run(["ip", "netns", "add", name])
            self._made.append(name)
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.namespaces):
            peer = f"v{i}"
            _run(["ip", "-n", ns, "link", "add", INTERFACE, "type", "veth", "peer", "name", peer, "netns", self.hub])
            _run(["ip", "-n", self.hub, "link", "set", peer, "master", "br0"])
            _run(["ip", "-n", self.hub, "link", "set", peer, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", INTERFACE])
            _run(["ip", "-n", ns, "link", "set", INTERFACE, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.set_rate(self.mbit, add=True)

    def set_rate(self, mbit: float, add: bool = False) -> None:
        """Limit every link to ``mbit`` in both directions."""
        if mbit <= 0:
            raise ValueError(f"The link speed must be positive; received {mbit} Mbit/s.")
        verb = "add" if add else "change"
        for i, ns in enumerate(self.namespaces):
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", verb, "dev", INTERFACE, "root", *tbf_args(mbit)])
            _run(["ip", "netns", "exec", self.hub, "tc", "qdisc", verb, "dev", f"v{i}", "root", *tbf_args(mbit)])
        self.mbit = mbit

    def address(self, worker: int) -> str:
        return f"{SUBNET}.{worker + 1}"

    def exec_prefix(self, worker: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[worker]]

    def close(self) -> None:
        """Delete the namespaces (their links go with them). Safe to call twice."""
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)
