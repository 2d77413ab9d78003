"""The lifetime of the process groups an HPSGD run creates: destroyed at interpreter exit while it is still whole.

Otherwise gloo's worker threads can release a finished all-reduce (and its tensors) during interpreter shutdown,
when they can no longer take the GIL, and the process aborts at exit ("terminate called without an active
exception") although training succeeded. PyTorch asks every script to call ``destroy_process_group()``; Lightning
does not. Groups with abandoned work are left to the OS: destroying them would wait for the stuck collective.
"""

from __future__ import annotations

import atexit
import logging
from datetime import timedelta

import torch.distributed as dist

from lightning_hpsgd.wire import NodeGroups

log = logging.getLogger(__name__)

__all__ = ["destroy_default_group_at_exit", "forget", "new_group", "node_groups"]

# Groups this module created whose collectives all completed: destroyed at exit.
_OWN_GROUPS: dict[int, dist.ProcessGroup] = {}
# Whether the default group was created for an HPSGD run that has not failed: then it is destroyed at exit too.
_DEFAULT_GROUP = {"destroy_at_exit": False}


def new_group(backend: str | None, timeout: timedelta | None) -> dist.ProcessGroup:
    """A new process group over every rank, destroyed at interpreter exit unless [`forget`][] is called."""
    group = dist.new_group(backend=backend, timeout=timeout)
    _OWN_GROUPS[id(group)] = group
    return group


def forget(*groups: dist.ProcessGroup | None) -> None:
    """After an error: leave these groups, and the default group, to the OS (their work may never finish)."""
    _DEFAULT_GROUP["destroy_at_exit"] = False
    for group in groups:
        _OWN_GROUPS.pop(id(group), None)


def destroy_default_group_at_exit() -> None:
    """The default group was created for an HPSGD run (by Lightning): destroy it at exit unless the run fails."""
    _DEFAULT_GROUP["destroy_at_exit"] = True


@atexit.register
def _destroy_at_exit() -> None:
    groups = list(_OWN_GROUPS.values())
    _OWN_GROUPS.clear()
    for group in groups:
        if dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError) as err:  # already destroyed with the default group
                log.debug("HPSGD: could not destroy its process group at exit: %s", err)
    if _DEFAULT_GROUP["destroy_at_exit"] and dist.is_initialized():
        _DEFAULT_GROUP["destroy_at_exit"] = False
        dist.destroy_process_group()


def node_groups(node_rank: int, backend: str | None, timeout: timedelta | None) -> NodeGroups:
    """The groups of ``hierarchy="node"``: this rank's node, and its peers of the same local rank on other nodes.

    Every rank calls it with its node's index (any labels, for example ``NODE_RANK``); ranks are grouped by it, in
    global rank order. A collective on the default group. Destroyed at interpreter exit unless `forget` is called.

    Raises:
        ValueError: if the nodes have different numbers of ranks.
    """
    labels: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(labels, node_rank)
    members: dict[int, list[int]] = {}
    for rank, label in enumerate(labels):
        members.setdefault(label, []).append(rank)
    nodes = [members[label] for label in sorted(members)]
    sizes = {len(ranks) for ranks in nodes}
    if len(sizes) != 1:
        counts = ", ".join(f"node {label}: {len(members[label])}" for label in sorted(members))
        raise ValueError(
            f"HPSGD: hierarchy='node' needs the same number of ranks on every node; found {counts}. Start the same"
            " number of processes (devices) on every node, or use hierarchy=None."
        )
    local_size = sizes.pop()
    node_group = None
    if local_size > 1:
        node_group, _ = dist.new_subgroups_by_enumeration(nodes, timeout=timeout, backend=backend)
        _OWN_GROUPS[id(node_group)] = node_group
    across = [[ranks[i] for ranks in nodes] for i in range(local_size)]
    across_group, _ = dist.new_subgroups_by_enumeration(across, timeout=timeout, backend=backend)
    _OWN_GROUPS[id(across_group)] = across_group
    rank = dist.get_rank()
    local_rank = next(ranks.index(rank) for ranks in nodes if rank in ranks)
    return NodeGroups(node_group, across_group, local_rank, local_size, len(nodes))


class RunGroups:
    """The groups of one HPSGD run: its rounds', a gloo group for pickled objects (with NCCL), and the node groups.

    Args:
        backend: the rounds' backend (``"gloo"`` or ``"nccl"``).
        timeout: every group's timeout.
        node_rank: with ``hierarchy="node"``, this rank's node index; ``None`` for flat HPSGD.
    """

    def __init__(self, backend: str | None, timeout: timedelta | None, node_rank: int | None) -> None:
        self.rounds = new_group(backend, timeout)
        # Checkpoint state is gathered as pickled CPU objects: over gloo, never through rank 0's GPU memory.
        self.objects = new_group("gloo", timeout) if backend != "gloo" else None
        self.nodes = node_groups(node_rank, backend, timeout) if node_rank is not None else None

    def forget(self) -> None:
        """After an error: leave every group (and the default one) to the OS; see [`forget`][]."""
        nodes = self.nodes
        forget(self.rounds, self.objects, *((nodes.node, nodes.across) if nodes is not None else ()))
