"""An independent reference simulation of the rule in docs/algorithm.md: N workers in one process, plain torch.

It follows that page's rule line by line on per-worker model copies, so that the real strategy (many processes,
flat buffers, async all-reduce) can be compared against it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def _state(model: nn.Module) -> list[Tensor]:
    """R: trainable parameters and floating-point buffers, in the strategy's order."""
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return params + buffers


def simulate(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[Sequence[tuple[Tensor, Tensor]]],
    sync_every: int,
    merge: str,
    loss_fn: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor],
    outer_lr: float = 1.0,
    outer_momentum: float = 0.0,
    outer_nesterov: bool = True,
    node_size: int = 1,
) -> nn.Module:
    """Train ``len(batches)`` workers from copies of ``model`` with HPSGD; flush at the end.

    With ``node_size = L > 1`` (``hierarchy="node"``), ``batches`` holds every rank's stream, node by node
    (ranks ``n L .. n L + L - 1`` on node ``n``). The ranks of a node average their gradients at every step, so
    each node is one HPSGD worker whose gradient is the mean of its ranks' gradients; HPSGD runs across the nodes.

    Every merge of a round that contained optimizer steps goes through the outer optimizer of the rule on the
    trained parameters: ``M = mu M + g``, ``U = lr (g + mu M)`` (Nesterov) or ``lr M``, ``G = G + U``; the defaults
    make ``U = g``. Floating-point buffers (BatchNorm statistics) always take the plain mean: ``G = G + g``.
    The final flush's round is empty when the step count is a multiple of ``sync_every``: it adds nothing.

    Returns:
        The flushed model (every worker's replica equals it).
    """
    per_node = [batches[n : n + node_size] for n in range(0, len(batches), node_size)]
    workers = [copy.deepcopy(model) for _ in per_node]
    optimizers = [make_optimizer(w) for w in workers]
    world = len(workers)
    with torch.no_grad():
        G = [t.clone() for t in _state(workers[0])]
        S = [[t.clone() for t in _state(w)] for w in workers]
        M = [torch.zeros_like(t) for t in G]
    P: list[Tensor] | None = None  # the pending mean

    trained = sum(1 for p in model.parameters() if p.requires_grad)  # `_state` lists them first

    def merged(G: list[Tensor], mean: list[Tensor]) -> list[Tensor]:
        out = []
        for j, (g, change) in enumerate(zip(G, mean)):
            if j >= trained:
                out.append(g + change)
                continue
            M[j] = outer_momentum * M[j] + change
            step = outer_lr * (change + outer_momentum * M[j]) if outer_nesterov else outer_lr * M[j]
            out.append(g + step)
        return out

    steps = len(batches[0])
    for step in range(1, steps + 1):
        for w, opt, node in zip(workers, optimizers, per_node):
            opt.zero_grad()
            (sum(loss_fn(w, data[step - 1]) for data in node) / len(node)).backward()
            opt.step()
        if step % sync_every == 0:
            with torch.no_grad():
                deltas = [[r - s for r, s in zip(_state(w), S[i])] for i, w in enumerate(workers)]
                if P is not None:
                    G = merged(G, P)
                for i, w in enumerate(workers):
                    for r, g, d in zip(_state(w), G, deltas[i]):
                        r.copy_(g + d if merge == "replica" else g)
                    S[i] = [r.clone() for r in _state(w)]
                P = [sum(d[j] for d in deltas) / world for j in range(len(G))]
    with torch.no_grad():
        deltas = [[r - s for r, s in zip(_state(w), S[i])] for i, w in enumerate(workers)]
        if P is not None:
            G = merged(G, P)
        if steps % sync_every:
            G = merged(G, [sum(d[j] for d in deltas) / world for j in range(len(G))])
        for w in workers:
            for r, g in zip(_state(w), G):
                r.copy_(g)
    return workers[0]


def plain_training(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor],
) -> nn.Module:
    """Single-process training, no HPSGD at all."""
    model = copy.deepcopy(model)
    opt = make_optimizer(model)
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return model


def simulate_delayed(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[Sequence[tuple[Tensor, Tensor]]],
    sync_every: int,
    loss_fn: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor],
    sync_delay: int | None = None,
    fragments: int = 1,
    merge: str = "replica",
    outer_lr: float = 1.0,
    outer_momentum: float = 0.0,
    outer_nesterov: bool = True,
    node_size: int = 1,
) -> nn.Module:
    """The rule with a merge delay ``τ`` (``sync_delay``; ``None``: ``H``) and ``F`` fragments, written from the
    page's text on flat per-worker vectors, independently of ``simulate`` and of the engine.

    * Fragment ``f`` (elements ``[f·n, (f+1)·n)`` of the flat state, ``n = ⌈N/F⌉``) ends a round at the steps with
      ``step mod H = ⌊f·H/F⌋``: ``Δ = R − S``; the mean of ``Δ`` is launched; ``S ← R``.
    * ``τ`` steps after its launch, or at the fragment's next sync point (before its launch) if that comes first:
      ``d = R − S``; ``G ← G + U(mean Δ)``; ``R ← G + d``; ``S ← G``. ``merge="stale"`` (``τ = H`` only):
      ``R ← G`` at the sync point, and the launched ``Δ`` is the one measured before the merge.
    * The flush merges what is pending that way, then averages ``Δ = R − S`` and sets ``R = G``. A round with no
      optimizer step since the fragment's last launch takes the plain mean.
    """
    per_node = [batches[n : n + node_size] for n in range(0, len(batches), node_size)]
    workers = [copy.deepcopy(model) for _ in per_node]
    optimizers = [make_optimizer(w) for w in workers]
    world, H = len(workers), sync_every
    tau = H if sync_delay is None else sync_delay

    def read(w: nn.Module) -> Tensor:
        return torch.cat([t.detach().reshape(-1) for t in _state(w)]).clone()

    def write(w: nn.Module, flat: Tensor) -> None:
        offset = 0
        for t in _state(w):
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    G = read(workers[0])
    S = [read(w) for w in workers]
    M = torch.zeros_like(G)
    N = G.numel()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = -(-N // fragments)
    spans = [(f * size, min((f + 1) * size, N)) for f in range(fragments)]
    offsets = [(f * H) // fragments for f in range(fragments)]
    pending: dict[int, tuple[Tensor, int, int]] = {}  # fragment -> (mean Δ, merge step, steps in the round)
    unsent = [0] * fragments

    def add_to_global(f: int, mean: Tensor, outer: bool) -> None:
        a, b = spans[f]
        for i in range(a, b):  # element by element: slow and plain
            g = mean[i - a]
            if not outer or i >= trained:
                G[i] += g
                continue
            M[i] = outer_momentum * M[i] + g
            G[i] += outer_lr * (g + outer_momentum * M[i]) if outer_nesterov else outer_lr * M[i]

    def merge_pending(f: int) -> None:
        mean, _, steps = pending.pop(f)
        add_to_global(f, mean, outer=steps > 0)
        a, b = spans[f]
        for i, w in enumerate(workers):
            R = read(w)
            if merge == "replica":
                d = R[a:b] - S[i][a:b]
                R[a:b] = G[a:b] + d
                S[i][a:b] = G[a:b]
            else:
                R[a:b] = G[a:b]
                S[i][a:b] = G[a:b]
            write(w, R)

    def launch(f: int, step: int) -> None:
        a, b = spans[f]
        deltas = [read(w)[a:b] - S[i][a:b] for i, w in enumerate(workers)]
        pending[f] = (sum(deltas) / world, step + tau, unsent[f])
        unsent[f] = 0
        for i, w in enumerate(workers):
            S[i][a:b] = read(w)[a:b]

    with torch.no_grad():
        for step in range(1, len(batches[0]) + 1):
            for w, opt, node in zip(workers, optimizers, per_node):
                with torch.enable_grad():
                    opt.zero_grad()
                    (sum(loss_fn(w, data[step - 1]) for data in node) / len(node)).backward()
                opt.step()
            unsent = [u + 1 for u in unsent]
            for f in range(fragments):
                ends = step % H == offsets[f]
                if merge == "stale" and ends:
                    a, b = spans[f]
                    deltas = [read(w)[a:b] - S[i][a:b] for i, w in enumerate(workers)]
                    if f in pending:
                        mean, _, steps = pending.pop(f)
                        add_to_global(f, mean, outer=steps > 0)
                    for i, w in enumerate(workers):
                        R = read(w)
                        R[a:b] = G[a:b]
                        write(w, R)
                        S[i][a:b] = G[a:b]
                    pending[f] = (sum(deltas) / world, step + H, unsent[f])
                    unsent[f] = 0
                    continue
                if f in pending and (ends or pending[f][1] <= step):
                    merge_pending(f)
                if ends:
                    launch(f, step)
                    if tau == 0:
                        merge_pending(f)
        if merge == "stale":  # the stale rule's flush: Δ measured first, then P merged into G only
            deltas = [read(w) - S[i] for i, w in enumerate(workers)]
            for f in sorted(pending):
                mean, _, steps = pending.pop(f)
                add_to_global(f, mean, outer=steps > 0)
        else:
            for f in sorted(pending):
                merge_pending(f)
            deltas = [read(w) - S[i] for i, w in enumerate(workers)]
        mean = sum(deltas) / world
        for f, (a, b) in enumerate(spans):
            add_to_global(f, mean[a:b], outer=unsent[f] > 0)
        for w in workers:
            write(w, G)
    return workers[0]
