"""JUnit XML, Markdown summary, and compare between runs."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import pytest

from mcaudit.testing import run_cli

ARGS = ["--model", "demo", "--data", "phantom:n=40", "--checks", "performance"]


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ci")
    gate = tmp / "g.toml"
    gate.write_text('"performance.accuracy" = ">= 0.5"\n"performance.auroc_macro" = { rule = ">= 0.9999", on = "value" }\n')
    out = run_cli(["run", "--quiet", *ARGS, "--gate", str(gate), "--junit-xml", str(tmp / "j.xml"), "--markdown", str(tmp / "s.md")], tmp / "o")
    return tmp, out


def test_junit_has_one_case_per_threshold(gated):
    tmp, out = gated
    assert out.exit_code == 1
    suite = ET.parse(tmp / "j.xml").getroot()
    cases = suite.findall("testcase")
    outcomes = out.results["gate"]["results"]  # the file's two and the check's default thresholds
    assert len(cases) == len(outcomes) == 5 and suite.get("failures") == "1"
    assert [c.find("properties/property").get("value") for c in cases] == [o["status"] for o in outcomes]
    failed = [c for c in cases if c.find("failure") is not None]
    assert failed[0].get("name").startswith("performance.auroc_macro >=")
    assert "needs >= 0.9999" in failed[0].find("failure").get("message")
    assert "verdict: fail" in suite.find("system-out").text


def test_markdown_summary_and_github_step_summary(gated, tmp_path, monkeypatch):
    tmp, _ = gated
    text = (tmp / "s.md").read_text()
    assert text.startswith("## mcaudit: ❌ **fail**")
    assert "Gate: **failed**" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| performance.auroc_macro |"))
    assert row.startswith("| performance.auroc_macro | &gt;= 0.9999 (on value) | 0.995 | ") and " | 40 | ❌ **fail** | " in row
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = run_cli(["gate", str(tmp / "o" / "results.json"), "--thresholds", str(tmp / "g.toml")])
    assert out.exit_code == 1
    content = summary.read_text()
    assert content.startswith("earlier step\n## mcaudit:")


def test_compare_flags_regressions(tmp_path):
    base = {"model": {"spec": "a"}, "dataset": {"path": "d"}, "finished_at": "t0", "checks": {"performance": {"metrics": {"accuracy": 0.90, "n_images": 10.0}},
                                                                     "calibration": {"metrics": {"ece": 0.02}}}}
    new = {"model": {"spec": "b"}, "dataset": {"path": "d"}, "finished_at": "t1", "checks": {"performance": {"metrics": {"accuracy": 0.86, "n_images": 10.0}},
                                                                    "calibration": {"metrics": {"ece": 0.09}}}}
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(new))
    ok = run_cli(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--max-drop", "0.1"])
    assert ok.exit_code == 0 and "0 regression(s)" in ok.output
    bad = run_cli(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--max-drop", "0.03", "--html", str(tmp_path / "c.html")])
    assert bad.exit_code == 1
    lines = {ln.split()[0]: ln for ln in bad.output.splitlines() if ln.strip() and not ln.startswith("metric")}
    assert "REGRESSION" in lines["performance.accuracy"] and "REGRESSION" in lines["calibration.ece"]
    assert "REGRESSION" not in lines["performance.n_images"]
    assert "calibration.ece" in (tmp_path / "c.html").read_text()
