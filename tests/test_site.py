"""The built documentation site shows what the Markdown means to show (checked on the HTML, not the Markdown)."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT

INCLUDE = re.compile(r'^-+8\s*<\s*-+\s*"([^"]+)"', re.MULTILINE)


def as_shown(line: str, markdown: bool) -> str:
    """A source line as the page shows it: Markdown's inline markup dropped (code, emphasis, links)."""
    if markdown:
        line = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line).replace("`", "").replace("**", "").lstrip("#- ").strip()
    return line


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run([str(mkdocs), "build", "--strict", "--quiet", "-d", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def page_text(site: Path, page: Path) -> str:
    """What a reader sees on the page built from ``docs/<page>``: its HTML without tags, entities decoded."""
    built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
    return html.unescape(re.sub(r"<[^>]+>", "", built.read_text()))


PAGES = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", [p for p in PAGES if INCLUDE.search(p.read_text())], ids=lambda p: p.stem)
def test_every_included_file_appears_on_its_page(site, page):
    text = page_text(site, page)
    for included in INCLUDE.findall(page.read_text()):
        markdown = included.endswith(".md")
        lines = [as_shown(line.strip(), markdown) for line in (ROOT / included).read_text().splitlines()]
        longest = max(lines, key=len)
        assert longest[:80] in text, f"{page.name}: {included} is not on the built page ({longest[:80]!r})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_no_page_shows_a_raw_include_line(site, page):
    text = page_text(site, page)
    raw = [line for line in text.splitlines() if re.match(r"\s*-+8\s*<", line)]
    assert not raw, f"{page.name} shows {raw}"


def test_api_reference_shows_no_raw_sphinx_roles_or_unresolved_references(site):
    """Cross-references render as links: no `:class:`/`:meth:` text, and no `[name][target]` left unresolved."""
    text = page_text(site, ROOT / "docs" / "api.md")
    assert "HPSGDStrategy" in text and "RanksDivergedError" in text
    roles = re.findall(r".{0,40}:(?:class|meth|func|attr|mod|exc):.{0,40}", text)
    assert not roles, roles
    unresolved = re.findall(r".{0,40}\]\[[\w.]*\].{0,20}", text)
    assert not unresolved, unresolved
    links = (site / "api" / "index.html").read_text().count('class="autorefs autorefs-internal"')
    assert links >= 20, f"only {links} cross-reference links on the API page"


def test_every_tracked_image_is_shown_on_a_page(site):
    shown = set()
    for built in site.rglob("*.html"):
        shown |= {Path(src).name for src in re.findall(r'<img[^>]+src="([^"]+)"', built.read_text())}
    images = {p.name for p in (ROOT / "docs" / "img").iterdir() if p.suffix in (".png", ".svg", ".jpg")}
    assert images <= shown, f"in docs/img but on no page: {sorted(images - shown)}"


def test_api_parameters_are_lists_and_no_table_header_is_empty(site):
    """Parameter tables overflowed the page at 1280 px: the API page lists them instead. Every table header names
    its column."""
    assert "<table" not in (site / "api" / "index.html").read_text()
    for built in site.rglob("*.html"):
        empty = re.findall(r"<th[^>]*>\s*</th>", built.read_text())
        assert not empty, f"{built.relative_to(site)} has a table column without a header"


def test_benchmarks_page_leads_with_the_result(site):
    page = (site / "benchmarks" / "index.html").read_text()
    headings = [
        html.unescape(re.sub(r"<[^>]+>", "", h)).rstrip("¶").strip() for h in re.findall(r"<h2[^>]*>(.*?)</h2>", page)
    ]
    assert headings[0] == "The result in short", headings
    article = page[page.index("<article") : page.index("</article>")]
    text = html.unescape(re.sub(r"<[^>]+>", "", article))
    first_section = text.split("Results on this machine")[0]
    assert "sync_every" in first_section and "accuracy at equal steps" in first_section
    # The cost of a large H is in the summary, with the worst case and what the recommended setting recovers.
    assert all(s in first_section for s in ("H = 16", "0.714", "0.939", "Not yet measured on GPUs"))
    # The tables, then how to run and how it measures; the targets and the work log live on the Development page.
    assert headings.index("How to run it") > headings.index("Merge delay and fragments")
    assert headings.index("How it measures") > headings.index("How to run it")
    for internal in ("fixed on the way", "missed", "not met", "targets", "session", "2026-"):
        assert internal not in text, internal


def test_the_project_cites_only_its_own_files():
    """The rule is stated in docs/algorithm.md; nothing points at a reference outside the repository."""
    outside = ("HPSGD" + ".md", "../" + "shared")  # spelled in two parts, so this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    offenders = [
        name
        for name in tracked
        if Path(name).suffix in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg")
        and any(needle in (ROOT / name).read_text(errors="replace") for needle in outside)
    ]
    assert tracked and not offenders, offenders
