"""The demo report as readers use it, in Chromium: on a phone, printed, sorted and filtered,
with scripts off, under an accessibility scan (axe-core), with legible figures.

One demo audit is shared by every test here. axe-core comes from npm (``npm install --no-save
--no-package-lock axe-core`` in the repository, as the README's set-up says); without it the
accessibility test is skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mcaudit.testing import run_cli

from report_pdf import page_fills

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
ROOT = Path(__file__).resolve().parent.parent
AXE = Path(os.environ.get("MCAUDIT_AXE", ROOT / "node_modules" / "axe-core" / "axe.min.js"))
# The demo report printed on A4 with the template before issue 17 (its folds closed, so
# without the content they hid): 21 pages.
PAGES_BEFORE = 21
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        out = run_cli(["run", "--quiet"], folder / "report")
    finally:
        os.chdir(cwd)
    assert out.exit_code == 0, out.output
    return out.out_dir / "index.html"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def open_page(browser, html: Path, width: int = 1400, height: int = 1000, **context):
    ctx = browser.new_context(viewport={"width": width, "height": height}, **context)
    page = ctx.new_page()
    events = {"console": [], "requests": []}
    page.on("console", lambda m: events["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: events["console"].append(("pageerror", str(e))))
    page.on("request", lambda r: events["requests"].append(r.url))
    page.goto(html.as_uri(), wait_until="load")
    return page, events


def test_no_sideways_scroll_on_a_phone(browser, demo):
    page, events = open_page(browser, demo, 390, 844)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # the threshold table's status column is reachable: inside its own scrolling box
    assert page.locator("table.checks .badge").first.is_visible()
    assert [c for c in events["console"] if c[0] in ("error", "pageerror")] == []
    page.context.close()


def test_figures_are_shown_at_a_legible_scale(browser, demo):
    """Figure text is at least 10 pt at 110 dpi (15 px); shown at 1400 px, no figure is shrunk
    below two thirds, so no figure text falls under 10 px."""
    page, _ = open_page(browser, demo, 1400)
    scales = page.evaluate("Array.from(document.querySelectorAll('figure.plot img')).map(i => i.clientWidth / i.naturalWidth)")
    assert scales and min(scales) >= 10 / 15.2, sorted(scales)[:3]
    page.context.close()


def test_sort_filter_and_offline(browser, demo):
    page, events = open_page(browser, demo)
    table = page.locator("table.samples")
    col = [c.strip() for c in table.locator("thead th").all_inner_texts()].index("confidence") + 1
    header = table.locator(f"thead th:nth-child({col})")
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "ascending"
    values = [float(v) for v in table.locator(f"tbody tr td:nth-child({col})").all_inner_texts()]
    assert values == sorted(values) and values[0] < values[-1]
    header.locator("button").click()
    values = [float(v) for v in table.locator(f"tbody tr td:nth-child({col})").all_inner_texts()]
    assert values == sorted(values, reverse=True)
    rows = table.locator("tbody tr")
    total = rows.count()
    page.locator("#images input.filter").fill("opacity")
    shown = page.evaluate("Array.from(document.querySelectorAll('table.samples tbody tr')).filter(r => !r.hidden).length")
    assert 0 < shown < total
    assert [c for c in events["console"] if c[0] in ("error", "pageerror")] == []
    assert all(url.startswith(("file://", "data:")) for url in events["requests"]), events["requests"]
    page.context.close()


def test_tables_stay_without_scripts(browser, demo):
    page, _ = open_page(browser, demo, java_script_enabled=False)
    assert page.locator("table.samples tbody tr").count() > 100
    assert page.locator("button.sort").count() == 0 and page.locator("input.filter").count() == 0
    assert page.locator("figure.thumb img").count() > 0
    page.context.close()


def test_print_has_fewer_pages_and_none_nearly_empty(browser, demo, tmp_path):
    page, _ = open_page(browser, demo)
    pdf = page.pdf(format="A4")
    page.context.close()
    fills = page_fills(pdf)
    (tmp_path / "report.pdf").write_bytes(pdf)
    assert 0 < len(fills) < PAGES_BEFORE, len(fills)
    assert min(fills) >= 0.10, [round(f, 2) for f in fills]


@pytest.mark.skipif(not AXE.is_file(), reason="axe-core is not installed (npm install --no-save --no-package-lock axe-core)")
@pytest.mark.parametrize("width", [1400, 390])
def test_accessibility_scan(browser, demo, width):
    page, _ = open_page(browser, demo, width, bypass_csp=True)  # axe is injected; the report's own CSP stays
    page.add_script_tag(path=str(AXE))
    found = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
                          ".map(v => ({id: v.id, impact: v.impact, n: v.nodes.length, help: v.help}))")
    page.context.close()
    bad = [v for v in found if v["impact"] in ("serious", "critical")]
    assert bad == [], bad


def test_compare_page_shows_statuses_and_changes(browser, demo, tmp_path):
    import json

    base = json.loads((demo.parent / "results.json").read_text())
    new = json.loads(json.dumps(base))
    new["checks"]["performance"]["status"] = "fail"
    new["checks"]["performance"]["metrics"]["accuracy"] -= 0.2
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(new))
    out = run_cli(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--max-drop", "0.05",
                   "--html", str(tmp_path / "c.html")])
    assert out.exit_code == 1, out.output
    page, events = open_page(browser, tmp_path / "c.html", 390, 844)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    row = page.locator("table.statuses tbody tr", has_text="performance")
    assert row.locator(".badge").all_inner_texts() == ["PASS", "FAIL"] and "yes" in row.inner_text()
    bad = page.locator("table.metrics tbody tr.s-fail").all_inner_texts()
    assert len(bad) == 1 and bad[0].startswith("performance.accuracy") and "REGRESSION" in bad[0]
    page.locator("table.metrics thead th").first.locator("button").click()
    names = page.locator("table.metrics tbody tr td:first-child").all_inner_texts()
    assert names == sorted(names, key=str.lower)
    assert [c for c in events["console"] if c[0] in ("error", "pageerror")] == []
    page.context.close()
