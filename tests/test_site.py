"""The built documentation site shows what the Markdown means to show (checked on the HTML, not the Markdown)."""

from __future__ import annotations

import html
import inspect
import json
import os
import re
import shutil
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


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The site, built once per run: the pytest-xdist workers share one build (under a lock, in the directory that
    holds every worker's temporary directory), since each build takes half a minute of a core."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's directory, above the workers' own
    out = shared / "site"
    with FileLock(str(shared / "site.lock")):
        if not (out / "built").exists():
            env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
            mkdocs = Path(sys.executable).parent / "mkdocs"
            done = subprocess.run([str(mkdocs), "build", "--strict", "--quiet", "-d", str(out)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            (out / "built").touch()
    return out


def built_page(site: Path, page: Path) -> Path:
    """The HTML file built from ``docs/<page>``."""
    return site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")


def as_text(markup: str) -> str:
    """HTML as a reader sees it: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def page_text(site: Path, page: Path) -> str:
    """What a reader sees on the page built from ``docs/<page>``: its HTML without tags, entities decoded."""
    return as_text(built_page(site, page).read_text())


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


# The content column is 688 px wide at 1280 px, and code blocks are sized so that 84 characters of a wide monospace
# font fit in it (docs/stylesheets/extra.css); a longer line is cut off on screen.
CODE_LINE_MAX = 84


def test_every_line_of_every_code_block_fits_the_content_column(site):
    too_long = []
    for page in PAGES:
        for block in re.findall(r"<pre[^>]*>(.*?)</pre>", built_page(site, page).read_text(), re.DOTALL):
            too_long += [
                f"{page.name}: {len(line)} characters: {line}"
                for line in as_text(block).splitlines()
                if len(line) > CODE_LINE_MAX
            ]
    assert not too_long, f"code lines over {CODE_LINE_MAX} characters:\n" + "\n".join(too_long)


# Run in Chromium after the page has loaded: every code block and table that scrolls sideways (part of it hidden),
# and every table cell squeezed to a word or two a line (or to under 40 px), written into a <pre> that --dump-dom
# prints.
LAYOUT_PROBE = """
window.addEventListener("load", () => {
  const found = [];
  const name = (el) => `${el.tagName.toLowerCase()} "${el.innerText.trim().split("\\n")[0].slice(0, 60)}"`;
  const scrollers = ".md-content pre, .md-content pre > code, .md-content table, " +
    ".md-typeset__table, .md-typeset__scrollwrap";
  for (const el of document.querySelectorAll(scrollers)) {
    if (el.scrollWidth > el.clientWidth + 1) {
      found.push(`overflows (${el.scrollWidth} px in ${el.clientWidth} px): ${name(el)}`);
    }
  }
  for (const cell of document.querySelectorAll(".md-content td, .md-content th")) {
    const text = document.createRange();
    text.selectNodeContents(cell);
    const lines = Math.round(text.getBoundingClientRect().height / parseFloat(getComputedStyle(cell).lineHeight));
    const width = cell.getBoundingClientRect().width;
    const perLine = cell.innerText.trim().length / lines;
    if ((lines >= 4 && perLine < 10) || (width < 40 && lines > 1)) {
      found.push(`squeezed (${Math.round(width)} px, ${lines} lines): ${name(cell)}`);
    }
  }
  const out = document.createElement("pre");
  out.id = "layout-findings";
  out.textContent = JSON.stringify({width: document.documentElement.clientWidth, found});
  document.body.appendChild(out);
});
"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_page_fits_the_content_column_at_1280_px(site, page, tmp_path):
    """In a real browser at 1280 px, no code block or table scrolls sideways and no table cell is squeezed."""
    built = built_page(site, page)
    # Beside the page, so that the theme's CSS and JS load by the same relative paths.
    probe = built.with_name("layout-probe.html")
    probe.write_text(built.read_text().replace("</body>", f"<script>{LAYOUT_PROBE}</script></body>"))
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                           "--window-size=1280,4000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    result = re.search(r'<pre id="layout-findings">(.*?)</pre>', done.stdout, re.DOTALL)
    assert result, f"the probe did not run on {page.name}: {done.stderr[-2000:]}"
    layout = json.loads(html.unescape(result.group(1)))
    assert layout["width"] == 1280, layout
    assert not layout["found"], f"{page.name} at 1280 px:\n" + "\n".join(layout["found"])


def shown_signature(api_page: str, name: str) -> dict[str, str]:
    """The defaults the API page shows in the signature under the heading of ``name``, by parameter."""
    heading = api_page.index(f'<h3 id="{name}"')
    block = re.search(r'<div class="doc-signature[^>]*><pre>(.*?)</pre>', api_page[heading:], re.DOTALL)
    assert block, f"no signature under {name}"
    text = as_text(block.group(1))
    return dict(re.findall(r"^\s+\**(\w+):[^\n]*? = (.+?),?$", text, re.MULTILINE))


def test_api_reference_shows_plain_formulas_and_the_values_of_defaults_and_types(site):
    """No raw reST maths or LaTeX; defaults show as values, not as the constant that holds them; the option types
    that signatures name (SyncEvery) are shown with their definition."""
    from datetime import timedelta

    from lightning_hpsgd import HPSGDStrategy, compat
    from lightning_hpsgd.engine import HPSGDEngine
    from lightning_hpsgd.options import DEFAULT_MAX_SYNC_EVERY
    from lightning_hpsgd.recommend import recommendation

    api_page = (site / "api" / "index.html").read_text()
    text = as_text(api_page)
    assert ".. math::" not in text and ":math:" not in text
    latex = re.findall(r".{0,40}\\(?:leftarrow|Delta|frac|tfrac|sum|text|quad|big)\b.{0,40}", text)
    assert not latex, latex
    assert "R ← G + Δ" in text
    shown_as_names = re.findall(r"(?:default:|\s=)\s*(DEFAULT_\w+|default_pg_timeout|\w+\.\w+_timeout)\b", text)
    assert not shown_as_names, shown_as_names
    for heading, cls in [
        ("lightning_hpsgd.HPSGDStrategy", HPSGDStrategy),
        ("lightning_hpsgd.engine.HPSGDEngine", HPSGDEngine),
    ]:
        shown = shown_signature(api_page, heading)
        defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
        assert shown.keys() == defaults.keys(), (cls.__name__, shown)
        for name, value in shown.items():
            assert eval(value, {"timedelta": timedelta}) == defaults[name], (cls.__name__, name, value)
    assert shown_signature(api_page, "lightning_hpsgd.HPSGDStrategy")["timeout"] == "timedelta(minutes=30)"
    # The literal defaults are the values the package's constants and Lightning's DDP use.
    assert inspect.signature(HPSGDEngine).parameters["max_sync_every"].default == DEFAULT_MAX_SYNC_EVERY
    assert inspect.signature(recommendation).parameters["max_sync_every"].default == DEFAULT_MAX_SYNC_EVERY
    assert inspect.signature(HPSGDStrategy).parameters["timeout"].default == compat.default_pg_timeout
    for alias, definition in [("SyncEvery", "int | Literal['auto']"), ("SyncDelay", "int | Literal['auto'] | None"),
                              ("MergeMode", "Literal['replica', 'stale']")]:  # fmt: skip
        assert f"{alias} = {definition}" in text, alias
        assert f'href="#lightning_hpsgd.options.{alias}"' in api_page, f"{alias} in signatures links to nothing"
