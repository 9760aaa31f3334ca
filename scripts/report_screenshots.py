"""Regenerate docs/screenshots/: the demo report at 1400 px (desktop) and 390 px (phone).

    .venv/bin/python scripts/report_screenshots.py [REPORT_FOLDER]

Without a folder it runs the demo audit in a temporary folder first. Needs Chromium
(/usr/bin/chromium) and playwright (in the test extras). The screenshots show the top of the
page (verdict, findings, summary table) and, at 1400 px, also one check with its galleries.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
SHOTS = [  # (file, viewport width, viewport height, element to scroll to or None)
    ("report-1400.png", 1400, 1100, None),
    ("report-1400-drilldown.png", 1400, 1100, "#check-performance"),
    ("report-390.png", 390, 844, None),
]


def demo_report(folder: Path) -> Path:
    mcaudit = Path(sys.executable).with_name("mcaudit")
    subprocess.run([str(mcaudit), "run", "--quiet", "--out", str(folder / "report")], cwd=folder, check=False)
    return folder / "report"


def shoot(report: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    OUT.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for name, width, height, anchor in SHOTS:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.goto((report / "index.html").as_uri(), wait_until="load")
            if anchor:
                page.locator(anchor).scroll_into_view_if_needed()
                page.evaluate(f"document.querySelector('{anchor}').scrollIntoView()")
            page.screenshot(path=str(OUT / name))
            written.append(OUT / name)
            page.close()
        browser.close()
    return written


def main() -> None:
    if len(sys.argv) > 1:
        paths = shoot(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            paths = shoot(demo_report(Path(tmp)))
    for path in paths:
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
