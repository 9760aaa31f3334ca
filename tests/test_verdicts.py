"""The status model: thresholds decided on intervals, not-evaluated never passing, worst first,
and every output (terminal, results.json, HTML, Markdown, JUnit) telling the same story."""

from __future__ import annotations

import json
import re
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import torch
from conftest import PNEUMONIA_PROMPTS, shared, train_pneumonia_clip

from mcaudit import Check, CheckResult, Finding, InputError, hookimpl
from mcaudit.gating import apply_gate, collect_thresholds, decide, parse_threshold
from mcaudit.testing import run_cli
from mcaudit.verdict import GatePolicy


def _results(**checks):
    return {"checks": {name: {"execution": "completed", "summary": "", **entry} for name, entry in checks.items()}}


def _gate(results, thresholds, **kw):
    parsed = [parse_threshold(name, spec, "test") for name, spec in thresholds.items()]
    return apply_gate(results, parsed, **kw)


# -- deciding one threshold -----------------------------------------------------------------


@pytest.mark.parametrize("op,bound,value,interval,on,expected", [
    ("<=", 0.15, 0.1515, (0.143, 0.156), "interval", "inconclusive"),  # the ECE case
    ("<=", 0.15, 0.10, (0.08, 0.12), "interval", "pass"),
    ("<=", 0.15, 0.20, (0.17, 0.23), "interval", "fail"),
    (">=", 0.90, 0.92, (0.85, 0.96), "interval", "inconclusive"),
    (">=", 0.90, 0.92, (0.85, 0.96), "lower", "fail"),
    (">=", 0.90, 0.92, (0.85, 0.96), "value", "pass"),
    (">=", 0.90, 0.88, (0.85, 0.93), "upper", "pass"),
    (">", 0.5, 0.51, None, "lower", "inconclusive"),  # no interval to take the lower bound of
    (">", 0.1667, 0.1559, (0.1721, 0.4077), "lower", "inconclusive"),  # HAM10000: the bound clears, the value does not
    (">", 0.5, 0.51, None, "interval", "pass"),
])
def test_decide_on_value_and_interval(op, bound, value, interval, on, expected):
    assert decide(op, bound, value, interval, on)[0] == expected


def test_straddling_interval_is_inconclusive_and_fails_the_gate_by_default():
    results = _results(calibration={"metrics": {"ece": 0.1515}, "intervals": {"ece": [0.143, 0.156]}, "sample_size": 624})
    gate = _gate(results, {"calibration.ece": "<= 0.15"})
    (o,) = gate["results"]
    assert o["status"] == "inconclusive" and o["n"] == 624
    assert results["checks"]["calibration"]["status"] == "inconclusive"
    assert gate["passed"] is False
    assert "n = 624" in o["sentence"] and "0.143" in o["sentence"]
    lenient = _gate(_results(calibration=results["checks"]["calibration"]), {"calibration.ece": "<= 0.15"},
                    policy=GatePolicy(inconclusive="pass"))
    assert lenient["passed"] is True


def test_wildcards_metric_bounds_and_counts():
    results = _results(performance={
        "metrics": {"recall.normal": 1.0, "recall.pneumonia": 5 / 390, "balanced_accuracy": 0.506, "chance_level": 0.5},
        "intervals": {"recall.normal": [0.98, 1.0], "recall.pneumonia": [0.005, 0.03], "balanced_accuracy": [0.49, 0.52]},
        "counts": {"recall.normal": [234, 234], "recall.pneumonia": [5, 390]},
        "declared_metrics": ["balanced_accuracy", "recall.<class>", "chance_level"],
    })
    gate = _gate(results, {"performance.recall.*": ">= 0.9",
                           "performance.balanced_accuracy": {"rule": "> chance_level", "on": "lower"}})
    by_name = {o["name"]: o for o in gate["results"]}
    assert by_name["performance.recall.normal"]["status"] == "pass"
    assert by_name["performance.recall.pneumonia"]["status"] == "fail"
    assert by_name["performance.balanced_accuracy"]["status"] == "fail"  # lower bound 0.49 is not above chance
    assert by_name["performance.balanced_accuracy"]["bound"] == 0.5
    assert by_name["performance.recall.pneumonia"]["sentence"] == (
        "recall of pneumonia 1.3% (5 of 390, 95% CI 0.5% to 3.0%), needs >= 90.0%")


def test_not_evaluated_is_never_pass_and_strict_fails_it():
    results = _results(
        backdoor_scan={"metrics": {"n_flagged": 0.0}, "not_evaluated": {"n_flagged": "the MAD rule needs at least 3 classes"}},
        performance={"metrics": {"accuracy": 0.9}, "intervals": {"accuracy": [0.85, 0.94]}},
    )
    gate = _gate(results, {"backdoor_scan.n_flagged": "<= 0", "performance.accuracy": ">= 0.8"})
    outcome = {o["name"]: o for o in gate["results"]}["backdoor_scan.n_flagged"]
    assert outcome["status"] == "not_evaluated" and "3 classes" in outcome["reason"]
    assert results["checks"]["backdoor_scan"]["status"] == "not_evaluated"
    assert gate["passed"] is True  # shown, not failing, by default ...
    assert "backdoor_scan" in results["verdict"]["headline"] or results["verdict"]["counts"]["not_evaluated"] == 1
    strict = _gate(_results(**{k: {kk: vv for kk, vv in v.items() if kk in ("metrics", "intervals", "not_evaluated")}
                               for k, v in results["checks"].items()}),
                   {"backdoor_scan.n_flagged": "<= 0", "performance.accuracy": ">= 0.8"},
                   policy=GatePolicy(not_evaluated="fail"))
    assert strict["passed"] is False  # ... and failing under --strict


def test_a_gate_with_nothing_evaluated_does_not_pass():
    results = _results(fairness={"execution": "skipped", "summary": "no subgroup columns"})
    gate = _gate(results, {"fairness.max_accuracy_gap": "<= 0.1"})
    assert gate["results"][0]["status"] == "not_evaluated"
    assert gate["passed"] is False


def test_misspelt_metric_is_an_input_error_but_a_declared_absent_one_is_not_evaluated():
    results = _results(performance={"metrics": {"accuracy": 0.9}, "declared_metrics": ["accuracy", "recall.<class>"]})
    with pytest.raises(InputError, match="reports no metric 'acuracy'"):
        _gate(results, {"performance.acuracy": ">= 0.8"})
    gate = _gate(results, {"performance.recall.melanoma": ">= 0.8"})
    assert gate["results"][0]["status"] == "not_evaluated"


def test_findings_are_ordered_worst_first_and_the_headline_names_the_worst():
    results = _results(
        calibration={"metrics": {"ece": 0.12}, "intervals": {"ece": [0.11, 0.13]}},
        performance={"metrics": {"recall.pneumonia": 0.013, "accuracy": 0.79},
                     "intervals": {"recall.pneumonia": [0.005, 0.03], "accuracy": [0.75, 0.78]},
                     "counts": {"recall.pneumonia": [5, 390]}, "declared_metrics": ["accuracy", "recall.<class>"]},
        adversarial={"metrics": {}, "findings": [{"status": "warn", "message": "gradient masking suspected", "metric": None}]},
        fairness={"metrics": {"max_accuracy_gap": 0.12}, "intervals": {"max_accuracy_gap": [0.02, 0.25]}},
    )
    _gate(results, {"calibration.ece": "<= 0.1", "performance.recall.pneumonia": ">= 0.9",
                    "performance.accuracy": ">= 0.8", "fairness.max_accuracy_gap": "<= 0.1"})
    verdict = results["verdict"]
    statuses = [f["status"] for f in verdict["findings"]]
    assert statuses == ["fail", "fail", "fail", "inconclusive", "warn"]
    assert verdict["findings"][0]["name"] == "performance.recall.pneumonia"  # 97% short of its bound
    assert verdict["headline"].startswith("Fail: recall of pneumonia 1.3% (5 of 390")
    assert results["checks"]["adversarial"]["status"] == "warn"
    assert results["checks"]["fairness"]["status"] == "inconclusive"


# -- whole runs -----------------------------------------------------------------------------


def test_gate_with_no_thresholds_anywhere_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plugin = tmp_path / "bare_check.py"
    plugin.write_text(
        "from mcaudit import Check, CheckResult, hookimpl\n"
        "class Bare(Check):\n    name = 'bare'\n    description = 'no thresholds'\n"
        "    def run(self, ctx, params):\n        return CheckResult(metrics={'x': 1.0})\n"
        "@hookimpl\ndef mcaudit_register_checks(register):\n    register(Bare)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = run_cli(["run", "--quiet", "--data", "phantom:n=20", "--model", "demo", "-p", "bare_check",
                   "--checks", "bare", "--gate"], tmp_path / "o")
    assert out.exit_code == 2 and "no thresholds apply" in out.output
    ungated = run_cli(["run", "--quiet", "--data", "phantom:n=20", "--model", "demo", "-p", "bare_check",
                       "--checks", "bare"], tmp_path / "o2")
    assert ungated.exit_code == 0
    assert ungated.results["checks"]["bare"]["status"] == "not_evaluated"


class OwnFindingCheck(Check):
    """A third-party check that raises its own finding through the public API."""

    name = "own_finding"
    description = "raises a warning finding"
    metrics = {"value": "a number"}
    default_thresholds = {"value": ">= 0"}

    def run(self, ctx, params):
        result = CheckResult(metrics={"value": 1.0}, summary="value 1")
        result.warn("gradient masking suspected: planted for the test")
        return result


class OwnFindingPlugin:
    @hookimpl
    def mcaudit_register_checks(self, register):
        register(OwnFindingCheck)


def test_a_plugin_finding_sets_the_status_through_the_public_api():
    from mcaudit.plugin_manager import make_plugin_manager

    assert Finding("warn", "x").status == "warn"
    with pytest.raises(ValueError):
        Finding("ok", "no such finding status")
    manager = make_plugin_manager(autoload=False)
    manager.pm.register(OwnFindingPlugin(), "own-finding-test")
    from mcaudit.config import RunConfig
    from mcaudit.runner import run_audit

    cfg = RunConfig(model="demo", data="phantom:n=24", checks=["own_finding"], quiet=True)
    results = run_audit(cfg, manager).results
    entry = results["checks"]["own_finding"]
    assert entry["status"] == "warn" and "gradient masking suspected" in entry["status_reason"]
    assert results["verdict"]["status"] == "warn"


# -- PneumoniaMNIST: a chance-level model fails, a trained one passes --------------------------


def _statuses_everywhere(out_dir, terminal: str):
    """Every check's status as the terminal, results.json, HTML, Markdown and JUnit show it."""
    results = json.loads((out_dir / "results.json").read_text())
    words = {"not_evaluated": "not evaluated"}
    from_json = {n: c["status"] for n, c in results["checks"].items()}
    from_terminal = {}
    for name in from_json:
        line = next(ln for ln in terminal.splitlines() if ln.startswith(f"  {name} "))
        from_terminal[name] = next(s for s in ("not evaluated", "inconclusive", "error", "fail", "warn", "pass")
                                   if line[2 + len(name):].lstrip().startswith(s))
    html = (out_dir / "index.html").read_text()
    from_html = {n: re.search(rf'<a href="#check-{n}">{n}</a></td><td><span class="badge b-(\w+)"', html).group(1)
                 for n in from_json}
    md = (out_dir / "summary.md").read_text()
    from_md = {}
    for name in from_json:
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {name.replace('_', chr(95))} | "))
        from_md[name] = next(s for s in ("not evaluated", "inconclusive", "error", "fail", "warn", "pass") if s in row.split("|")[2])
    suite = ET.parse(out_dir / "junit.xml").getroot()
    junit = {}
    for case in suite.iter("testcase"):
        status = case.find("properties/property[@name='status']").get("value")
        junit.setdefault(case.get("classname").split(".", 1)[1], []).append(status)
    return results, {n: words.get(s, s) for n, s in from_json.items()}, from_terminal, \
        {n: words.get(s, s) for n, s in from_html.items()}, from_md, junit


def test_chance_level_model_fails_pneumoniamnist_by_default_and_all_outputs_agree(tmp_path):
    npz = shared("pneumoniamnist/pneumoniamnist.npz")
    out_dir = tmp_path / "out"
    out = run_cli(["run", "--model", "demo", "--data", npz, "--split", "test",
                   "--checks", "performance,calibration,fairness,backdoor_scan", "--set", "backdoor_scan.n_images=4",
                   "--set", "backdoor_scan.max_steps=2", "--gate", "--junit-xml", out_dir / "junit.xml",
                   "--markdown", out_dir / "summary.md"], out_dir)
    assert out.exit_code == 1, out.output
    results, from_json, terminal, html, md, junit = _statuses_everywhere(out_dir, out.output)
    assert from_json["performance"] == "fail"
    assert from_json["fairness"] == "not evaluated"  # no --group
    assert from_json["backdoor_scan"] == "not evaluated"  # two classes: MAD cannot decide
    assert terminal == from_json == html == md
    # JUnit: each check's cases carry statuses whose worst is the check's status.
    from mcaudit.verdict import worst

    for name, status in from_json.items():
        if name in junit:
            assert worst(junit[name]).replace("_", " ") == status or status == "not evaluated", (name, junit[name])
    # The first finding is the worst: the missed pneumonias, in words, with n.
    first = results["verdict"]["findings"][0]
    assert first["name"] == "performance.recall.pneumonia"
    assert re.match(r"Fail: recall of pneumonia \d+\.\d% \(\d+ of 390", results["verdict"]["headline"])
    assert results["verdict"]["headline"] in out.output
    # Fairness' thresholds are listed as not evaluated, with the reason, in every output.
    gate = {o["name"]: o for o in results["gate"]["results"]}
    assert gate["fairness.max_accuracy_gap"]["status"] == "not_evaluated"
    assert "fairness.max_accuracy_gap" in (out_dir / "summary.md").read_text()
    skipped = [c for c in ET.parse(out_dir / "junit.xml").getroot().iter("testcase")
               if c.get("name").startswith("fairness.max_accuracy_gap")]
    assert skipped and skipped[0].find("skipped") is not None and "--group" in skipped[0].find("skipped").get("message")
    assert "fairness.max_accuracy_gap" in out.html


@pytest.mark.slow
def test_trained_model_passes_pneumoniamnist_with_no_threshold_file(tmp_path, monkeypatch):
    from mcaudit.testing import save_openclip_folder

    npz = shared("pneumoniamnist/pneumoniamnist.npz")
    folder = save_openclip_folder(train_pneumonia_clip(npz, steps=200, balanced=True), tmp_path / "model", mean=(0.5,) * 3, std=(0.25,) * 3)
    (folder / "prompts.toml").write_text(PNEUMONIA_PROMPTS)
    monkeypatch.chdir(tmp_path)  # no mcaudit.toml here: the checks' defaults alone
    out = run_cli(["run", "--model", folder, "--data", npz, "--split", "test", "--checks", "performance", "--gate"],
                  tmp_path / "out")
    perf = out.results["checks"]["performance"]
    assert out.exit_code == 0, (out.output, perf["status_reason"])
    assert perf["status"] == "pass" and out.results["verdict"]["status"] == "pass"
    assert all(o["status"] == "pass" for o in out.results["gate"]["results"])
    assert perf["metrics"]["balanced_accuracy"] > 0.7


# -- nothing silently passed --------------------------------------------------------------


def test_malformed_pyproject_with_mcaudit_settings_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.mcaudit.thresholds]\n"performance.accuracy" = ">= 0.99"\n[broken\n')
    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=20", "--checks", "performance", "--gate"],
                  tmp_path / "o")
    assert out.exit_code == 2 and "pyproject.toml: malformed TOML" in out.output


def test_a_check_calling_sys_exit_is_an_error_not_a_pass(tmp_path, monkeypatch):
    (tmp_path / "exiting_check.py").write_text(
        "import sys\nfrom mcaudit import Check, hookimpl\n"
        "class Exits(Check):\n    name = 'exits'\n    description = 'calls sys.exit(0)'\n"
        "    def run(self, ctx, params):\n        sys.exit(0)\n"
        "@hookimpl\ndef mcaudit_register_checks(register):\n    register(Exits)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = run_cli(["run", "--quiet", "-p", "exiting_check", "--model", "demo", "--data", "phantom:n=20",
                   "--checks", "exits,performance", "--gate"], tmp_path / "o")
    assert out.exit_code == 1
    assert out.results["checks"]["exits"]["status"] == "error"
    assert out.results["checks"]["performance"]["execution"] == "completed"


def test_nan_weights_stop_the_run_with_the_count(tmp_path):
    from mcaudit.testing import save_openclip_folder, tiny_openclip

    model = tiny_openclip(0)
    with torch.no_grad():
        model.visual.proj[:, :3] = float("nan")  # one projection's columns: every image's logits become NaN
    folder = save_openclip_folder(model, tmp_path / "nan-model")
    out = run_cli(["run", "--quiet", "--model", folder, "--data", "phantom:n=12", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 2, out.output
    assert "non-finite logits (NaN or inf) for 12 of 12 images" in out.output
    assert not (tmp_path / "o" / "results.json").exists()


def test_gate_reapplies_the_defaults_recorded_in_results_not_todays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=40", "--checks", "performance"], tmp_path / "o")
    results_file = tmp_path / "o" / "results.json"
    recorded = {t["name"]: t for t in out.results["thresholds_in_force"]}
    assert recorded["performance.recall.*"]["rule"] == ">= 0.5" and recorded["performance.recall.*"]["source"] == "default"
    # Tamper with the installed check's defaults: the same results.json must gate as it was judged.
    from mcaudit.plugins.checks.performance import PerformanceCheck

    monkeypatch.setattr(PerformanceCheck, "default_thresholds", {"accuracy": ">= 0.9999"})
    again = run_cli(["gate", str(results_file)])
    assert again.exit_code == 0, again.output
    assert "performance.accuracy" not in again.output  # today's tampered default was not applied
