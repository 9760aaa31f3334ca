"""The example plugin package: pip-installed, found through its entry point, run, reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mcaudit.testing import run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mcaudit-plugin-example"


@pytest.fixture(scope="module")
def installed_example():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(EXAMPLE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    yield
    subprocess.run([*pip, "uninstall", "-y", "mcaudit-plugin-example"], capture_output=True, text=True)


def test_installed_plugin_is_listed_run_and_reported(installed_example, tmp_path, monkeypatch):
    monkeypatch.delenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    info = json.loads(run_cli(["plugins", "--json"]).output)
    plugin = next(p for p in info["plugins"] if p["name"] == "corruptions")
    assert plugin["source"].startswith("entry point mcaudit_corruptions")
    check = next(c for c in info["checks"] if c["name"] == "corruptions")
    assert check["default_thresholds"] == {"relative_mce": "<= 0.25"}

    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=60", "--checks", "performance,corruptions",
                   "--set", "corruptions.n_images=24", "--set", 'corruptions.corruptions=["gaussian_noise", "contrast", "jpeg"]'],
                  tmp_path / "o")
    assert out.exit_code == 0, out.output
    m = out.results["checks"]["corruptions"]["metrics"]
    assert m["clean_accuracy"] > 0.8
    # heavy noise on faint opacities must cost accuracy; severity 1 costs less than severity 5
    assert m["gaussian_noise.s5"] < m["clean_accuracy"]
    assert m["gaussian_noise.s1"] >= m["gaussian_noise.s5"]
    assert 'id="check-corruptions"' in out.html and "Accuracy per corruption and severity" in out.html
    # blocked by its entry-point name
    blocked = json.loads(run_cli(["plugins", "--json", "-p", "no:corruptions"]).output)
    assert all(c["name"] != "corruptions" for c in blocked["checks"])
