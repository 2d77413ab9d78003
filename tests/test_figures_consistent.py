"""The figures the README and the Overview quote are the Benchmarks page's, from the same run; the memory they
state is what a real engine holds."""

from __future__ import annotations

import re

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
