"""Redraw the Benchmarks page's convergence charts from its own tables: ``python docs/scripts/convergence_figures.py
[OUT_DIR]`` (``make docs`` runs it).

The tables "### mnist1d: validation accuracy" and "### reverse: validation accuracy" on ``docs/benchmarks.md``
(mean ± standard deviation per method, W, H and budget) are read back into the summary table that
``lightning_hpsgd.bench.convergence.summarize`` returns, and ``convergence.plot_table`` draws
``convergence_mnist1d.png`` and ``convergence_reverse.png`` from them: the charts always show the page's numbers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lightning_hpsgd.bench.convergence import FAMILIES, Method, StudyConfig, plot_table

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks.md"
TASKS = ("mnist1d", "reverse")
COLUMN = re.compile(r"^W=(\d+), (\d+) steps$")
# The inverse of convergence.method_name: "ddp", "hpsgd_outer H=16", "hpsgd_fragments H=16 τ=1 F=8".
METHOD = re.compile(r"^(\w+)(?: H=(\d+))?(?: τ=(\d+))?(?: F=(\d+))?$")
CELL = re.compile(r"^(\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)$")

Table = dict[tuple, dict[str, float]]


def method(name: str) -> Method:
    """``(family, H, sync_delay, fragments)`` from a row's name, as ``convergence.methods`` spells the method."""
    match = METHOD.match(name)
    if not match or match.group(1) not in ("ddp", *FAMILIES):
        raise ValueError(f"unknown method {name!r}")
    family, h, tau, fragments = match.groups()
    if family == "diloco":  # the blocking average: τ = 0, not written in the name
        tau = "0"
    return family, None if h is None else int(h), None if tau is None else int(tau), int(fragments or 1)


def section(text: str, heading: str) -> str:
    """The lines under ``heading`` up to the next heading."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


def accuracy_table(text: str, task: str) -> tuple[Table, list[tuple[int, int]]]:
    """One task's "validation accuracy" table: the summary table (``acc``, ``acc_std``) keyed as ``summarize``
    keys it, ``(task, budget, W, *method)``, and the columns as ``(W, steps)``."""
    rows = [line for line in section(text, f"### {task}: validation accuracy").splitlines() if line.startswith("|")]
    if len(rows) < 3:
        raise ValueError(f"no table under '### {task}: validation accuracy'")
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    header, body = cells[0], cells[2:]
    if header[0] != "method":
        raise ValueError(f"{task}: the table's first column is {header[0]!r}, not 'method'")
    columns = []
    for title in header[1:]:
        match = COLUMN.match(title)
        if not match:
            raise ValueError(f"{task}: column {title!r} is not 'W=<workers>, <steps> steps'")
        columns.append((int(match.group(1)), int(match.group(2))))
    steps = list(dict.fromkeys(s for _, s in columns))  # in the page's order: the short budget, then the long
    budgets = dict(zip(steps, ("short", "long"), strict=True))
    table: Table = {}
    for row in body:
        if len(row) != len(header):
            raise ValueError(f"{task}: row {row[0]!r} has {len(row) - 1} values for {len(columns)} columns")
        for (w, s), cell in zip(columns, row[1:]):
            if cell == "–":  # not run
                continue
            match = CELL.match(cell)
            if not match:
                raise ValueError(f"{task}, {row[0]}, W={w}, {s} steps: {cell!r} is not 'mean ± std'")
            table[(task, budgets[s], w, *method(row[0]))] = {"acc": float(match[1]), "acc_std": float(match[2])}
    return table, columns


def page_tables(text: str | None = None) -> tuple[StudyConfig, Table]:
    """The study's configuration (workers, H, methods and budgets the tables show) and both tasks' summary table."""
    text = BENCHMARKS.read_text() if text is None else text
    table: Table = {}
    budgets: dict[str, tuple[int, ...]] = {}
    workers: dict[int, None] = {}
    for task in TASKS:
        found, columns = accuracy_table(text, task)
        table |= found
        budgets[task] = tuple(dict.fromkeys(s for _, s in columns))
        workers |= dict.fromkeys(w for w, _ in columns)
    families = {key[3] for key in table}
    config = StudyConfig(
        workers=tuple(workers),
        tasks=TASKS,
        sync_every=tuple(sorted({key[4] for key in table if key[4] is not None})),
        families=tuple(f for f in ("ddp", *FAMILIES) if f in families),
        budgets=budgets,
    )
    return config, table


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else BENCHMARKS.parent / "img")
    out.mkdir(parents=True, exist_ok=True)
    config, table = page_tables()
    for path in plot_table(config, table, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
