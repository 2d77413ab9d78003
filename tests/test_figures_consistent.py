"""The figures the README and the Overview quote are the Benchmarks page's, from the same run; the memory they
state is what a real engine holds; the page's convergence charts are drawn from its own tables."""

from __future__ import annotations

import re
import runpy

import pytest
import torch

from tests.launch import ROOT

BENCHMARKS = (ROOT / "docs" / "benchmarks.md").read_text()
QUOTING = {"README.md": ROOT / "README.md", "Overview": ROOT / "docs" / "index.md"}
# A number as a reader sees it: 0.968, 1.7, 12, 1,000; not the digits inside a name (bf16, MNIST-1D, f8).
NUMBER = re.compile(r"(?<![\w.,])\d+(?:,\d{3})*(?:\.\d+)?(?![\w]|\.\d)")


def block(text: str, heading: str) -> str:
    """The text under the first heading that starts with ``heading``, up to the next heading of its level or
    above."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # a shell comment is no heading
    match = re.search(rf"^(#+) {re.escape(heading)}.*$", text, re.MULTILINE)
    assert match, f"no heading {heading!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def rows(text: str) -> dict[str, list[str]]:
    """The rows of the Markdown tables in ``text``, by their first cell."""
    table = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("| ---") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            table[cells[0]] = cells[1:]
    return table


def first(cell: str) -> float:
    return float(NUMBER.search(cell).group().replace(",", ""))


def quoted(page: str) -> str:
    """What a page quotes: its "Should I use it?" table, and the Overview's headline."""
    text = QUOTING[page].read_text()
    quote = block(text, "Should I use it?")
    headline = re.search(r"^On this project's 2-core test machine.*?\n\n", text, re.MULTILINE | re.DOTALL)
    return quote + (headline.group() if headline else "")


@pytest.mark.parametrize("page", list(QUOTING))
def test_every_figure_quoted_is_on_the_benchmarks_page(page):
    on_page = set(NUMBER.findall(BENCHMARKS))
    figures = NUMBER.findall(quoted(page))
    assert len(figures) > 30, figures  # the table is there, and the extraction finds its figures
    missing = sorted(set(figures) - on_page)
    assert not missing, f"{page} quotes {missing}, which docs/benchmarks.md does not show"
    assert "0.949" not in QUOTING[page].read_text() and "0.892" not in QUOTING[page].read_text()


def test_the_readme_and_the_overview_quote_the_same_figures():
    readme, overview = (NUMBER.findall(block(p.read_text(), "Should I use it?")) for p in QUOTING.values())
    assert readme == overview


def test_the_headline_is_the_ratio_1_run():
    run = rows(block(BENCHMARKS, "Communication as slow as compute"))
    hpsgd, ddp = run["hpsgd"], run["ddp"]
    equal_steps, equal_time = (f"{first(hpsgd[i]):.3f}" for i in (3, 4))
    headline = re.search(r"HPSGD reached ([\d.]+) validation accuracy in the time DDP reached ([\d.]+), at the same "
                         r"accuracy per step \(([\d.]+)\)", QUOTING["Overview"].read_text())  # fmt: skip
    assert headline, "the Overview's headline changed its wording: update this test"
    assert headline.groups() == (equal_time, f"{first(ddp[4]):.3f}", equal_steps)
    assert first(ddp[3]) == first(hpsgd[3])  # "the same accuracy per step"


def speedups() -> list[tuple[str, float, float, str, str]]:
    """(link, HPSGD's step time, DDP's, HPSGD's and DDP's accuracy at equal time), from the measured tables."""
    r1 = rows(block(BENCHMARKS, "Communication as slow as compute"))
    r4 = rows(block(BENCHMARKS, "Communication four times slower"))
    r8 = rows(block(BENCHMARKS, "Merge delay and fragments").split("| ratio 8 |")[1])
    f8 = r8["HPSGD, H = 16, F = 8, τ auto"]
    return [
        ("Ratio 1", first(r1["hpsgd_h4"][0]), first(r1["ddp"][0]), r1["hpsgd_h4"][4], r1["ddp"][4]),
        ("Ratio 4", first(r4["hpsgd_h4"][0]), first(r4["ddp"][0]), r4["hpsgd_h4"][4], r4["ddp"][4]),
        ("Ratio 8", first(f8[0]), first(r8["DDP"][0]), f8[4], r8["DDP"][4]),
    ]


@pytest.mark.parametrize("page", list(QUOTING))
def test_the_speedups_are_computed_from_the_step_time_tables(page):
    answer = rows(block(QUOTING[page].read_text(), "Should I use it?"))["Is it faster than DDP on my link?"][0]
    parts = dict(re.findall(r"(Ratio \d): (.*?)(?= Ratio \d:| Choose|$)", answer))
    assert set(parts) == {"Ratio 1", "Ratio 4", "Ratio 8"}, answer
    for link, hpsgd, ddp, hpsgd_acc, ddp_acc in speedups():
        said = parts[link]
        assert f"{ddp / hpsgd:.1f} x faster" in said and f"({hpsgd / ddp:.2f} x" in said, (link, said)
        assert f"{first(hpsgd_acc):.3f}" in said and f"{first(ddp_acc):.3f}" in said, (link, said)


def held_bytes_per_parameter(one_rank_group, **options) -> float:
    """Every tensor byte a real engine holds beyond the model's own tensors (found by walking its objects: no
    buffer is missed), per parameter, with a round in flight."""
    from lightning_hpsgd.engine import HPSGDEngine

    model = {"w": torch.zeros(300, 1000), "b": torch.zeros(1000)}
    engine = HPSGDEngine(model, **{"sync_every": 2, **options})
    for step in range(1, 6):
        model["w"].add_(0.01)
        engine.on_optimizer_step(step)
    assert engine.pending is not None
    own = {t.untyped_storage().data_ptr() for t in model.values()}
    storages: dict[int, int] = {}
    seen, stack = set(), [engine]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.dtype, torch.device)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in own:
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return sum(storages.values()) / sum(t.numel() for t in model.values())


@pytest.mark.parametrize(
    ("options", "gb", "setting"),
    [
        ({}, 12, "the default"),
        ({"comm_dtype": "bf16"}, 10, '`comm_dtype="bf16"`'),
        ({"outer_lr": 0.8, "outer_momentum": 0.6, "sync_every": 16, "fragments": 8, "sync_delay": "auto"}, 16,
         "the outer optimizer (`outer_momentum > 0`; the recommended slow-link setting)"),
        ({"outer_lr": 0.8, "outer_momentum": 0.6, "comm_dtype": "bf16"}, 14,
         'the outer optimizer and `comm_dtype="bf16"`'),
    ],
    ids=["default", "bf16-wire", "outer", "outer-bf16-wire"],
)  # fmt: skip
def test_the_memory_stated_is_what_the_engine_holds(one_rank_group, options, gb, setting):
    # 10⁹ parameters at this many bytes each are this many GB (10⁹ bytes); the side channel adds a few values.
    assert held_bytes_per_parameter(one_rank_group, **options) == pytest.approx(gb, abs=0.01)
    assert rows(block(BENCHMARKS, "Memory on the device"))[setting][0].strip("*") == f"{gb} GB"
    if gb in (12, 16, 10):
        for page in QUOTING.values():
            assert f"{gb} GB" in block(page.read_text(), "Should I use it?")


CONVERGENCE = runpy.run_path(str(ROOT / "docs" / "scripts" / "convergence_figures.py"))


def test_the_convergence_tables_are_read_row_by_row():
    config, table = CONVERGENCE["page_tables"]()
    for task in ("mnist1d", "reverse"):
        on_page = rows(block(BENCHMARKS, f"{task}: validation accuracy"))
        header = on_page.pop("method")
        assert len(on_page) == 13 and len(header) == 6, (task, list(on_page))  # ddp; 4 families at H = 1, 4, 16
        read = {key: value for key, value in table.items() if key[0] == task}
        assert len(read) == 13 * 6, task  # every row, every column
        for name, cells in on_page.items():
            for (w, steps), cell in zip(((w, s) for s in config.budgets[task] for w in config.workers), cells):
                assert f"W={w}, {steps} steps" in header
                budget = "short" if steps == config.budgets[task][0] else "long"
                found = read[(task, budget, w, *CONVERGENCE["method"](name))]
                assert cell == f"{found['acc']:.4f} ± {found['acc_std']:.4f}", (task, name, w, steps)
    assert config.workers == (2, 4, 8) and config.sync_every == (1, 4, 16)
    assert config.budgets == {"mnist1d": (300, 1000), "reverse": (200, 400)}
    assert table[("mnist1d", "short", 2, "ddp", None, None, 1)] == {"acc": 0.926, "acc_std": 0.0132}
    assert table[("mnist1d", "short", 8, "hpsgd_outer", 16, None, 1)] == {"acc": 0.8497, "acc_std": 0.0232}
    assert table[("mnist1d", "long", 8, "hpsgd_stale", 4, None, 1)] == {"acc": 0.353, "acc_std": 0.3515}
    assert table[("reverse", "short", 8, "hpsgd_outer", 16, None, 1)] == {"acc": 0.7138, "acc_std": 0.1505}
    assert table[("reverse", "long", 2, "hpsgd_stale", 16, None, 1)] == {"acc": 0.9649, "acc_std": 0.0604}
    assert CONVERGENCE["method"]("hpsgd_fragments H=16 τ=1 F=8") == ("hpsgd_fragments", 16, 1, 8)
    assert CONVERGENCE["method"]("diloco H=4") == ("diloco", 4, 0, 1)


@pytest.mark.parametrize("task", ["mnist1d", "reverse"])
def test_the_convergence_charts_keep_the_legend_off_the_panels_and_accuracy_at_most_1(task):
    from matplotlib import pyplot as plt

    from lightning_hpsgd.bench.convergence import figure

    config, table = CONVERGENCE["page_tables"]()
    fig = figure(config, table, task)
    try:
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["ddp", "localsgd", "hpsgd", "hpsgd_stale", "hpsgd_outer"]
        box = legend.get_window_extent(renderer)
        assert len(fig.axes) == 6
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
            assert box.y1 <= ax.get_tightbbox(renderer).y0, ax.get_title()  # below the tick labels too
            assert ax.get_ylim()[1] <= 1.0, (ax.get_title(), ax.get_ylim())
        # The page's numbers: W = 8, short budget, HPSGD with the outer optimizer at H = 1, 4, 16; DDP's line.
        panel = next(ax for ax in fig.axes if ax.get_title() == f"W=8, {config.budgets[task][0]} steps")
        (outer,) = [c for c in panel.containers if c.get_label() == "hpsgd_outer"]
        expected = [table[(task, "short", 8, "hpsgd_outer", h, None, 1)]["acc"] for h in (1, 4, 16)]
        assert list(outer.lines[0].get_ydata()) == expected
        (ddp,) = [line for line in panel.get_lines() if line.get_label() == "ddp"]
        assert ddp.get_ydata()[0] == table[(task, "short", 8, "ddp", None, None, 1)]["acc"]
    finally:
        plt.close(fig)
