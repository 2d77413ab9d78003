"""The ``sync_every`` a run's measured link calls for, in words: the lines ``HPSGDMonitor`` prints at the end of fit.

The rule is the one ``sync_every="auto"`` follows ([`hiding_sync_every`][lightning_hpsgd.schedule.hiding_sync_every]):
the smallest ``H`` whose ``H`` steps of the slowest rank's compute hide one all-reduce, with a 25 % margin.
"""

from __future__ import annotations

import math

from lightning_hpsgd.schedule import AUTO_MARGIN, hiding_sync_every

__all__ = ["BF16_ABOVE_RATIO", "recommendation"]

# Above this ratio the Configuration page's table also suggests a bf16 wire (half the bytes, half the ratio).
BF16_ABOVE_RATIO = 8.0


def recommendation(
    step_seconds: float,
    comm_seconds: float,
    *,
    fragments: int = 1,
    wait_fraction: float | None = None,
    max_sync_every: int = 32,
    compressed: bool = False,
) -> str:
    """Two lines: what was measured, and the ``sync_every`` (and ``fragments``) that hides this link.

    Args:
        step_seconds: compute time of one optimizer step (of the slowest rank), seconds.
        comm_seconds: time of one round's all-reduce (the smallest any rank measured), seconds; with ``fragments``
            > 1, of one fragment's all-reduce (``1/F`` of the model), scaled here to the whole model.
        fragments: ``F`` of the measured run.
        wait_fraction: the share of its training time that rank 0 waited at merges (``None``: not stated).
        max_sync_every: the cap of ``sync_every="auto"``, named when the link needs more (default 32, the
            strategy's default ``max_sync_every``).
        compressed: whether the run already sent a 16-bit wire (no ``comm_dtype="bf16"`` advice then).

    The ratio is rounded to two decimals before the rule is applied, so that the printed ratio gives the printed
    ``sync_every``.
    """
    comm_seconds *= fragments  # the whole model's all-reduce: each fragment carries 1/F of it
    ratio = round(comm_seconds / step_seconds, 2)
    wanted = hiding_sync_every(ratio)
    model = "the model" if fragments == 1 else f"the model (its {fragments} fragments together)"
    measured = (
        f"HPSGD: measured {_ms(step_seconds)} of compute per step (slowest rank) and {_ms(comm_seconds)} to"
        f" all-reduce {model}: ratio {ratio:.2f}"
    )
    if wait_fraction is not None:
        measured += f"; rank 0 waited {100 * wait_fraction:.1f} % of its training time for all-reduces"
    if ratio < 1:
        advice = (
            f"HPSGD: the link is not the bottleneck (an all-reduce takes less than a step): DDP, or"
            f" sync_every={wanted}, already hides it."
        )
    elif wanted > max_sync_every:
        advice = (
            f"HPSGD: sync_every={wanted} would hide this link, above max_sync_every={max_sync_every} (where"
            f" sync_every='auto' stops)"
        )
        advice += "." if compressed else "; comm_dtype='bf16' halves the bytes, and the ratio."
    else:
        advice = (
            f"HPSGD: sync_every={wanted} hides this link ({AUTO_MARGIN:g} x the ratio, rounded up, as"
            " sync_every='auto' does)"
        )
        split = min(math.ceil(ratio), wanted)
        if split > 1:
            advice += (
                f"; with fragments={split} and sync_delay='auto' each average also arrives sooner (one fragment's"
                " all-reduce takes about a step)"
            )
        if ratio > BF16_ABOVE_RATIO and not compressed:
            advice += "; comm_dtype='bf16' halves the bytes, and the ratio"
        advice += "."
    return f"{measured}.\n{advice}"


def _ms(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"
