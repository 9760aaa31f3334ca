"""The HTML report in a real browser: renders, no console errors, no network, escaped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from mcaudit.testing import run_cli, save_openclip_folder, tiny_openclip

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")

HOSTILE = '<img src=x onerror="document.title=\'pwned\'">'


def open_in_browser(html_file: Path, screenshot: Path):
    from playwright.sync_api import sync_playwright

    console, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda msg: console.append((msg.type, msg.text)))
        page.on("pageerror", lambda err: console.append(("pageerror", str(err))))
        page.on("request", lambda req: requests.append(req.url))
        page.goto(html_file.as_uri(), wait_until="load")
        title = page.title()
        headings = page.locator("h2").all_inner_texts()
        verdict = page.locator("#verdict").inner_text()
        badges = page.locator("table .badge").all_inner_texts()
        broken_images = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return console, requests, title, headings, broken_images, verdict, badges


def test_demo_report_renders_offline_without_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_cli(["run", "--quiet", "--data", "phantom:n=80", "--model", "demo"], tmp_path / "report")
    assert out.exit_code == 0, out.output
    shot = tmp_path / "report.png"
    console, requests, title, headings, broken, verdict, badges = open_in_browser(out.out_dir / "index.html", shot)
    assert [c for c in console if c[0] in ("error", "pageerror")] == []
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
    assert title.startswith("mcaudit report")
    assert "Summary" in headings and any("performance" in h.split() for h in headings)
    assert broken == 0
    assert shot.stat().st_size > 10_000
    # The headline the browser shows is the verdict's, and every status shown is one of the model's.
    results = out.results
    assert verdict.split(None, 1)[1].startswith(results["verdict"]["status"].replace("_", " ").upper()) or \
        results["verdict"]["headline"] in verdict
    assert results["verdict"]["headline"] in verdict
    words = {"PASS", "WARN", "FAIL", "INCONCLUSIVE", "NOT EVALUATED", "ERROR"}
    assert badges and set(badges) <= words, set(badges) - words
    shown = {c["status"].replace("_", " ").upper() for c in results["checks"].values()}
    assert shown <= set(badges)


def test_user_strings_are_escaped(tmp_path):
    folder = save_openclip_folder(tiny_openclip(0), tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("L", (16, 16), 40 * i).save(data / f"{i}.png")
    (data / "m.csv").write_text(
        "path,label,site\n" + "".join(f'{i}.png,"{HOSTILE if i % 2 else "<b>plain</b>"}","<script>x</script>"\n' for i in range(4))
    )
    out = run_cli(["run", "--quiet", "--model", str(folder), "--data", str(data / "m.csv"), "--group", "site", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    html = out.html
    assert HOSTILE not in html and "<b>plain</b>" not in html
    assert "&lt;img src=x onerror=" in html and "&lt;b&gt;plain&lt;/b&gt;" in html
    console, requests, title, *_ = open_in_browser(out.out_dir / "index.html", tmp_path / "esc.png")
    assert title != "pwned"
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
