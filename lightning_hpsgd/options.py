"""The options of the rule and their checks: one ``ValueError`` naming the accepted values for each bad one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import torch

__all__ = [
    "COMM_DTYPES",
    "DEFAULT_MAX_SYNC_EVERY",
    "HIERARCHIES",
    "MERGE_MODES",
    "MergeMode",
    "START_METHODS",
    "RuleOptions",
    "SyncDelay",
    "SyncEvery",
    "resolve_comm_dtype",
    "validate_launch",
    "validate_options",
]

MergeMode = Literal["replica", "stale"]
"""What a replica becomes at a sync point: ``"replica"`` (HPSGD, ``R ← G + Δ``) or ``"stale"`` (``R ← G``)."""
MERGE_MODES: tuple[str, ...] = ("replica", "stale")
SyncEvery = int | Literal["auto"]
"""``H``, optimizer steps per round: an integer >= 1, or ``"auto"`` (chosen from measured times)."""
SyncDelay = int | Literal["auto"] | None
"""``τ``, steps from a round's launch to its merge: 0 to ``H``, ``"auto"``, or ``None`` (``H``)."""
HIERARCHIES: tuple[str | None, ...] = (None, "node")
DEFAULT_MAX_SYNC_EVERY = 32
"""The largest ``H`` that ``sync_every="auto"`` may choose unless ``max_sync_every`` says otherwise."""
START_METHODS: tuple[str, ...] = ("popen", "spawn", "fork", "forkserver")
COMM_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_comm_dtype(comm_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn the ``comm_dtype`` option into a dtype, or raise a ``ValueError`` naming the accepted values.

    Args:
        comm_dtype: ``None`` (full precision), ``torch.bfloat16`` / ``torch.float16`` / ``torch.float32``, or one
            of the strings ``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"float16"``, ``"half"``, ``"fp32"``,
            ``"float32"`` (also with a ``"torch."`` prefix). A wire dtype at least as wide as ``G`` means no
            compression.
    """
    if comm_dtype is None:
        return None
    if isinstance(comm_dtype, torch.dtype) and comm_dtype in COMM_DTYPES.values():
        return comm_dtype
    if isinstance(comm_dtype, str):
        key = comm_dtype.lower().removeprefix("torch.")
        if key in COMM_DTYPES:
            return COMM_DTYPES[key]
        if key in ("none", "null"):
            return None
    raise ValueError(
        "comm_dtype must be None (full precision), torch.bfloat16, torch.float16 or torch.float32 (or one of the"
        f" strings {sorted(COMM_DTYPES)}); received {comm_dtype!r}."
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_options(
    sync_every: object,
    merge: object,
    *,
    max_sync_every: object = DEFAULT_MAX_SYNC_EVERY,
    outer_lr: object = 1.0,
    outer_momentum: object = 0.0,
    outer_nesterov: object = True,
    hierarchy: object = None,
    sync_delay: object = None,
    fragments: object = 1,
) -> None:
    """Raise a ``ValueError`` naming the accepted values if an option of the rule is invalid."""
    if not (_is_count(sync_every) or sync_every == "auto"):
        raise ValueError(
            "sync_every must be an integer >= 1 (optimizer steps per round) or 'auto' (chosen from the measured"
            f" communication and compute times); received {sync_every!r}."
        )
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {list(MERGE_MODES)}; received {merge!r}.")
    if not _is_count(max_sync_every) or max_sync_every >= 1 << 20:
        raise ValueError(
            f"max_sync_every must be an integer from 1 to {(1 << 20) - 1} (the largest H 'auto' may choose);"
            f" received {max_sync_every!r}."
        )
    if not _is_real(outer_lr) or not 0 < outer_lr < float("inf"):
        raise ValueError(f"outer_lr must be a finite number > 0 (1.0: plain HPSGD); received {outer_lr!r}.")
    if not _is_real(outer_momentum) or not 0 <= outer_momentum < 1:
        raise ValueError(
            f"outer_momentum must be a number in [0, 1) (0.0: no momentum; 0.9 amplifies a steady step up to 10 x);"
            f" received {outer_momentum!r}."
        )
    if not isinstance(outer_nesterov, bool):
        raise ValueError(f"outer_nesterov must be True or False; received {outer_nesterov!r}.")
    _validate_delay(sync_every, merge, sync_delay, fragments)
    if hierarchy not in HIERARCHIES:
        raise ValueError(
            f"hierarchy must be None (flat HPSGD: every rank a worker) or 'node' (synchronous inside a node, HPSGD"
            f" across nodes); received {hierarchy!r}."
        )


def _validate_delay(sync_every: object, merge: object, sync_delay: object, fragments: object) -> None:
    fixed = sync_every if _is_count(sync_every) else None
    upper = f"sync_every (H = {fixed})" if fixed is not None else "the current H"
    delay_is_count = isinstance(sync_delay, int) and not isinstance(sync_delay, bool) and sync_delay >= 0
    if not (sync_delay is None or sync_delay == "auto" or delay_is_count) or (
        delay_is_count and fixed is not None and sync_delay > fixed
    ):
        raise ValueError(
            f"sync_delay must be an integer from 0 to {upper} (optimizer steps from a round's launch to its merge),"
            f" 'auto' (the smallest that hides the all-reduce) or None (= H: merge at the next sync point);"
            f" received {sync_delay!r}."
        )
    early = sync_delay == "auto" or (delay_is_count and (fixed is None or sync_delay < fixed))
    if merge == "stale" and early:
        raise ValueError(
            f"merge='stale' merges at the next sync point only (sync_delay=None); received sync_delay={sync_delay!r}."
            " Use merge='replica' with an earlier merge."
        )
    if not _is_count(fragments) or (fixed is not None and fragments > fixed):
        raise ValueError(
            f"fragments must be an integer from 1 to {upper} (parts of the model synced at different steps);"
            f" received {fragments!r}."
        )
    if fixed is None and fragments != 1:
        raise ValueError(
            f"fragments={fragments} needs a fixed sync_every (an integer H >= fragments), not 'auto'. Set sync_every"
            " and let sync_delay='auto' hide the link."
        )


def validate_launch(start_method: str, timeout: timedelta | float | None) -> timedelta | None:
    """Check the launcher's start method and the process-group timeout; returns the timeout as a ``timedelta``."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {list(START_METHODS)}; received {start_method!r}.")
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if timeout is not None and (not _is_real(seconds) or not 0 < seconds < timedelta.max.total_seconds()):
        raise ValueError(
            f"timeout must be a positive number of seconds or timedelta (the process group's, default 1800 s);"
            f" received {timeout!r}."
        )
    return timedelta(seconds=seconds) if isinstance(timeout, (int, float)) else timeout


class RuleOptions:
    """The rule's options that the Trainer's and Fabric's strategies both take, checked once, as attributes.

    Each strategy calls [`set_rule_options`][lightning_hpsgd.options.RuleOptions.set_rule_options] in its
    ``__init__`` and builds its engine with [`engine_options`][lightning_hpsgd.options.RuleOptions.engine_options].
    """

    sync_every: SyncEvery
    max_sync_every: int
    merge: MergeMode
    sync_delay: SyncDelay
    fragments: int
    comm_dtype: torch.dtype | None
    outer_lr: float
    outer_momentum: float
    outer_nesterov: bool
    hierarchy: Literal["node"] | None

    def set_rule_options(
        self,
        *,
        sync_every: SyncEvery,
        merge: MergeMode,
        comm_dtype: str | torch.dtype | None,
        outer_lr: float,
        outer_momentum: float,
        outer_nesterov: bool,
        max_sync_every: int | None,
        sync_delay: SyncDelay,
        fragments: int,
        hierarchy: Literal["node"] | None,
        warn: Callable[[str], Any],
    ) -> None:
        """Check the options (a ``ValueError`` naming the accepted values) and keep them; ``warn`` speaks once."""
        if max_sync_every is not None and sync_every != "auto":
            warn(f"HPSGD: max_sync_every={max_sync_every} has no effect with sync_every={sync_every!r}.")
        max_sync_every = DEFAULT_MAX_SYNC_EVERY if max_sync_every is None else max_sync_every
        validate_options(sync_every, merge, max_sync_every=max_sync_every, outer_lr=outer_lr,
                         outer_momentum=outer_momentum, outer_nesterov=outer_nesterov, hierarchy=hierarchy,
                         sync_delay=sync_delay, fragments=fragments)  # fmt: skip
        self.sync_every, self.max_sync_every, self.merge = sync_every, max_sync_every, merge
        self.sync_delay, self.fragments, self.hierarchy = sync_delay, fragments, hierarchy
        self.comm_dtype = resolve_comm_dtype(comm_dtype)
        self.outer_lr, self.outer_momentum, self.outer_nesterov = float(outer_lr), float(outer_momentum), outer_nesterov

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments of [`HPSGDEngine`][lightning_hpsgd.engine.HPSGDEngine] these options set."""
        return {
            "sync_every": self.sync_every,
            "max_sync_every": self.max_sync_every,
            "merge": self.merge,
            "comm_dtype": self.comm_dtype,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "outer_nesterov": self.outer_nesterov,
            "sync_delay": self.sync_delay,
            "fragments": self.fragments,
        }

    def rule_hyperparameters(self) -> dict[str, Any]:
        """The options as a run config for loggers (``comm_dtype`` as text)."""
        return {
            "name": "hpsgd" if self.merge == "replica" else "hpsgd_stale",
            **self.engine_options(),
            "comm_dtype": None if self.comm_dtype is None else str(self.comm_dtype).removeprefix("torch."),
            "hierarchy": self.hierarchy,
        }
