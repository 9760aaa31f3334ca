"""How long the HTML report of a 1,000-image audit takes to load in a headless browser.

    python benchmarks/bench_report.py [--n 1000]

Needs Debian's chromium and the playwright package (both installed by .ci/run). Prints the
report's size and the browser's load time (navigation start to the load event). Target:
under 2 seconds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--checks", default="")
    args = ap.parse_args()
    from click.testing import CliRunner
    from playwright.sync_api import sync_playwright

    from mcaudit.cli import cli

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report"
        cmd = ["run", "--quiet", "--model", "demo", "--data", f"phantom:n={args.n}", "--group", "site", "--group", "sex", "--out", str(out)]
        if args.checks:
            cmd += ["--checks", args.checks]
        result = CliRunner().invoke(cli, cmd, catch_exceptions=False)
        if result.exit_code not in (0, 1):
            raise SystemExit(result.output)
        html = out / "index.html"
        times = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            for _ in range(3):
                page = browser.new_page()
                page.goto(html.as_uri(), wait_until="load")
                times.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
                page.close()
            browser.close()
        size = html.stat().st_size
    print(f"machine: {machine()}")
    print(f"report of a {args.n}-image audit: {size / 1e6:.2f} MB")
    print(f"load time (median of 3): {sorted(times)[1]:.0f} ms (target < 2000 ms)")


if __name__ == "__main__":
    main()
