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
