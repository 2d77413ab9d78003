"""Which tensors of a model the engine averages, and where each lies in the flat buffers.

* *Trained*: averaged in every round, and the only ones the outer optimizer steps (laid out first).
* *Averaged*: every other tensor averaged in every round (floating-point buffers that change, such as BatchNorm
  statistics).
* *Promoted*: frozen tensors found changed at a flush (an EMA teacher, a target network): averaged from then on.
* *Frozen*: the other floating-point tensors, checked at every flush and sending nothing per round.
* Non-floating tensors (``num_batches_tracked``) are only broadcast at setup.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_hpsgd.tensor_utils import FlatLayout, accumulation_dtype, differs_across_ranks

log = logging.getLogger(__name__)

__all__ = ["TrackedTensors"]


class TrackedTensors:
    """The model's tensors by name, sorted into the sets above, and the flat layout of the averaged ones.

    Args:
        tensors: every tensor of the model's state by name (any dtype, on one device), or a sequence (named
            ``tensor{i}``).
        averaged: the names averaged in every round; floating-point only (default: every floating-point tensor).
        trained: the names among ``averaged`` that the optimizers train (default: all of ``averaged``).
        promoted: frozen names already found changed.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor] | Sequence[Tensor],
        averaged: Collection[str] | None = None,
        trained: Collection[str] | None = None,
        promoted: Collection[str] = (),
    ) -> None:
        if not isinstance(tensors, Mapping):
            tensors = {f"tensor{i}": t for i, t in enumerate(tensors)}
        self.tensors: dict[str, Tensor] = {name: t.detach() for name, t in tensors.items()}
        floating = [name for name, t in self.tensors.items() if t.is_floating_point()]
        self.always = frozenset(floating if averaged is None else averaged)
        self.trained = frozenset(self.always if trained is None else trained) & self.always
        unknown = sorted(self.always - set(self.tensors))
        if unknown:
            raise ValueError(f"averaged names {unknown} that are not among the tensors.")
        for name in sorted(self.always - set(floating)):
            raise ValueError(
                f"HPSGD averages floating-point tensors only; {name!r} has dtype {self.tensors[name].dtype}. Leave"
                " it out of `averaged`: it is broadcast at setup and stays local after that."
            )
        self.promoted = set(promoted) & set(floating)
        averaged_now = self.always | self.promoted
        first = [n for n in self.tensors if n in self.trained]
        self.names = first + [n for n in self.tensors if n in averaged_now and n not in self.trained]
        self.num_trained = len(first)
        self.frozen_names = [n for n in floating if n not in averaged_now]
        if not self.names:
            raise ValueError("HPSGD found no tensor to average: give it at least one trainable floating-point tensor.")
        self.replica = [self.tensors[n] for n in self.names]
        self.frozen = [self.tensors[n] for n in self.frozen_names]
        self.layout = FlatLayout(self.replica, accumulation_dtype(self.replica))
        # Some tensor of R is narrower than G (bf16-true), so G holds bits R cannot. Set once per layout: a
        # replaced tensor keeps its dtype, and anything else builds a new TrackedTensors.
        self.replica_is_narrow = any(t.dtype != self.layout.dtype for t in self.replica)

    def same_layout(self, tensors: Mapping[str, Tensor], averaged: Collection[str], trained: Collection[str]) -> bool:
        """Whether ``tensors`` have the same names, shapes and dtypes, and the same sets, as these."""
        return (
            list(tensors) == list(self.tensors)
            and frozenset(averaged) == self.always
            and frozenset(trained) & self.always == self.trained
            and all(t.shape == self.tensors[n].shape and t.dtype == self.tensors[n].dtype for n, t in tensors.items())
        )

    def repoint(self, tensors: Mapping[str, Tensor]) -> None:
        """Follow tensors replaced by new objects of the same shape and dtype (no collective)."""
        for name, tensor in tensors.items():
            old = self.tensors.get(name)
            if old is None or tensor.shape != old.shape or tensor.dtype != old.dtype:
                continue
            if tensor.data_ptr() != old.data_ptr():
                log.debug("HPSGD: following the new tensor behind %r", name)
                self.tensors[name] = tensor.detach()
        self.replica = [self.tensors[n] for n in self.names]
        self.frozen = [self.tensors[n] for n in self.frozen_names]

    def name_at(self, flat_index: int) -> str:
        """The name of the averaged tensor that holds element ``flat_index`` of the flat buffers."""
        return self.names[self.layout.index_of(flat_index)]

    def first_non_finite(self, flat: Tensor, begin: int = 0) -> str:
        """The name of the first averaged tensor whose part of ``flat`` (the flat layout's elements from ``begin``)
        holds NaN or inf."""
        bad = (~torch.isfinite(flat)).nonzero()
        return self.name_at(begin + int(bad[0])) if bad.numel() else "(unknown)"

    def check_same_structure(self, group: dist.ProcessGroup | None, object_group: dist.ProcessGroup | None) -> None:
        """Raise on every rank, naming the first difference, if ranks hold tensors of different names or shapes."""
        signature = [(name, tuple(t.shape), str(t.dtype), name in self.names) for name, t in self.tensors.items()]
        digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
        code = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=self.device)
        if not differs_across_ranks(code, group)[0]:
            return
        signatures: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(signatures, signature, group=object_group)
        reference = signatures[0]
        for rank, other in enumerate(signatures[1:], start=1):
            for i in range(max(len(reference), len(other))):
                ours = reference[i] if i < len(reference) else None
                theirs = other[i] if i < len(other) else None
                if ours != theirs:
                    raise ValueError(
                        "HPSGD: ranks hold different models, so their tensors cannot be averaged. First difference,"
                        f" at tensor #{i}: rank 0 has {_describe(ours)}, rank {rank} has {_describe(theirs)}. Build"
                        " the same model on every rank (same architecture, dtype and frozen parameters)."
                    )

    @property
    def device(self) -> torch.device:
        """The device of the averaged tensors."""
        return self.layout.device


def _describe(entry: tuple | None) -> str:
    if entry is None:
        return "no tensor"
    name, shape, dtype, averaged = entry
    return f"{name!r} shape={list(shape)} dtype={dtype} averaged={averaged}"
