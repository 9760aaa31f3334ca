"""`mcaudit run` end to end: outputs, schema, determinism, gating, one encoder pass."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import torch
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from mcaudit.plugins.checks.performance import PerformanceCheck
from mcaudit.testing import run_cli

SMALL = ["--model", "demo", "--data", "phantom:n=60", "--checks", "performance"]


def read_samples(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_demo_run_writes_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_cli(["run", "--quiet"])
    assert out.exit_code == 0, out.output
    folder = tmp_path / "mcaudit-report"
    assert "report: mcaudit-report/index.html" in out.output
    results = json.loads((folder / "results.json").read_text())
    html = (folder / "index.html").read_text()
    assert results["model"]["spec"] == "demo" and results["dataset"]["format"] == "phantom"
    assert results["dataset"]["group_columns"] == ["site", "sex"]
    # the demo model has learned its task
    assert results["checks"]["performance"]["metrics"]["accuracy"] > 0.75
    # one inline script, allowed by its hash in the page's content security policy
    assert html.count("<script") == 1 and "script-src 'sha256-" in html
    assert "http://" not in html.replace("http://www.w3.org", "")
    assert not list(folder.glob(".*.tmp"))
    # each check's own tables come first; its long flat metric list is folded away, a short one is not
    folds = {name: re.search(r'<details class="metrics"( open)?><summary>All metrics \((\d+)\)',
                             html[html.index(f'id="check-{name}"'):]).groups() for name in results["checks"]}
    for name, (is_open, count) in folds.items():
        assert int(count) == len(results["checks"][name]["metrics"])
        assert bool(is_open) == (int(count) <= 12), name
    assert not folds["fairness"][0] and folds["performance"][0]
    section = html[html.index('id="check-fairness"'):]
    assert section.index("<h3>") < section.index('<details class="metrics"')


def test_results_schema_and_samples_match_sklearn(tmp_path):
    out = run_cli(["run", "--quiet", *SMALL], tmp_path / "o")
    assert out.exit_code == 0, out.output
    r = out.results
    for key in ("schema_version", "mcaudit_version", "started_at", "finished_at", "model", "dataset", "config", "environment", "checks", "gate"):
        assert key in r
    assert len(r["model"]["weights_sha256"]) == 64 and len(r["dataset"]["sha256"]) == 64
    assert r["environment"]["device"] == "cpu" and r["environment"]["precision"] == "fp32"
    assert r["environment"]["cpu_threads"] == 1  # the tiny demo model runs single-threaded
    perf = r["checks"]["performance"]
    assert perf["execution"] == "completed" and perf["status"] == "pass" and perf["duration_s"] > 0
    assert set(perf["params"]) == set(PerformanceCheck.params)
    assert perf["params"]["n_bootstrap"] == PerformanceCheck.profiles.get("quick", {}).get("n_bootstrap", PerformanceCheck.params["n_bootstrap"].default)
    rows = read_samples(out.out_dir / "samples.csv")
    assert len(rows) == r["dataset"]["images"] == 60
    y = [row["label"] for row in rows]
    p = [row["prediction"] for row in rows]
    assert perf["metrics"]["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert perf["metrics"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p), abs=1e-12)
    score = np.array([float(row["p_opacity"]) for row in rows])
    assert perf["metrics"]["auroc_macro"] == pytest.approx(roc_auc_score(np.array(y) == "opacity", score), abs=1e-6)
    lo, hi = perf["intervals"]["accuracy"]
    assert lo <= perf["metrics"]["accuracy"] <= hi


def test_same_seed_same_metrics(tmp_path):
    a = run_cli(["run", "--quiet", *SMALL, "--seed", "3"], tmp_path / "a").results
    b = run_cli(["run", "--quiet", *SMALL, "--seed", "3"], tmp_path / "b").results
    assert a["checks"]["performance"]["metrics"] == b["checks"]["performance"]["metrics"]
    assert a["checks"]["performance"]["intervals"] == b["checks"]["performance"]["intervals"]


def test_one_image_encoder_pass_per_image(tmp_path, mcaudit_encoder_calls):
    out = run_cli(["run", "--quiet", *SMALL, "--batch-size", "16"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    assert sum(mcaudit_encoder_calls) == 60 and len(mcaudit_encoder_calls) == 4


def test_failing_check_is_marked_error_and_others_run(tmp_path, monkeypatch):
    (tmp_path / "boom_plugin.py").write_text(
        "from mcaudit import Check, hookimpl\n"
        "class Boom(Check):\n"
        "    name = 'boom'\n"
        "    description = 'always fails'\n"
        "    def run(self, ctx, params):\n"
        "        raise RuntimeError('planted failure')\n"
        "@hookimpl\n"
        "def mcaudit_register_checks(register):\n"
        "    register(Boom)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = run_cli(["run", "--quiet", "-p", "boom_plugin", "--model", "demo", "--data", "phantom:n=20", "--checks", "boom,performance"], tmp_path / "o")
    assert out.exit_code == 1
    checks = out.results["checks"]
    assert checks["boom"]["status"] == "error" and "planted failure" in checks["boom"]["error"]
    assert checks["boom"]["execution"] == "error"
    assert checks["performance"]["execution"] == "completed" and checks["performance"]["status"] != "error"
    assert out.results["verdict"]["status"] == "error"
    assert "planted failure" in out.html


def test_gate_pass_fail_and_regate(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[thresholds]\n"performance.accuracy" = ">= 0.5"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('"performance.accuracy" = ">= 0.999"\n"performance.n_images" = "== 60"\n')
    out = run_cli(["run", "--quiet", *SMALL, "--gate", str(good)], tmp_path / "o")
    assert out.exit_code == 0, out.output
    assert out.results["gate"]["passed"] is True
    out2 = run_cli(["run", "--quiet", *SMALL, "--gate", str(bad)], tmp_path / "o2")
    assert out2.exit_code == 1
    gate = {g["name"]: g for g in out2.results["gate"]["results"]}
    assert gate["performance.accuracy"]["passed"] is False and gate["performance.n_images"]["passed"] is True
    # re-apply without running
    results = out.out_dir / "results.json"
    assert run_cli(["gate", str(results), "--thresholds", str(good)]).exit_code == 0
    assert run_cli(["gate", str(results), "--thresholds", str(bad)]).exit_code == 1


def test_gate_from_pyproject(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.mcaudit.run]\nmodel = "demo"\ndata = "phantom:n=30"\nchecks = ["performance"]\n'
        '[tool.mcaudit.thresholds]\n"performance.accuracy" = ">= 0.99"\n'
    )
    out = run_cli(["run", "--quiet", "--gate"], tmp_path / "o")
    assert out.exit_code == 1
    assert out.results["gate"]["results"][0]["source"].endswith("pyproject.toml")


def test_report_rerenders_from_results(tmp_path):
    out = run_cli(["run", "--quiet", *SMALL], tmp_path / "o")
    target = tmp_path / "again.html"
    again = run_cli(["report", str(out.out_dir / "results.json"), "--out", str(target)])
    assert again.exit_code == 0, again.output
    assert 'id="check-performance"' in target.read_text()


def test_config_file_and_set(tmp_path):
    cfg = tmp_path / "audit.toml"
    cfg.write_text('[run]\nmodel = "demo"\ndata = "phantom:n=30"\nchecks = ["performance"]\n[checks.performance]\nn_bootstrap = 300\n')
    out = run_cli(["run", "--quiet", "--config", str(cfg)], tmp_path / "o")
    assert out.exit_code == 0, out.output
    assert out.results["checks"]["performance"]["params"] == {"n_bootstrap": 300}
    out = run_cli(["run", "--quiet", "--config", str(cfg), "--set", "performance.n_bootstrap=500"], tmp_path / "o")
    assert out.results["checks"]["performance"]["params"] == {"n_bootstrap": 500}
    # The check's own bound is checked before anything runs.
    out = run_cli(["run", "--quiet", "--config", str(cfg), "--set", "performance.n_bootstrap=50"], tmp_path / "o")
    assert out.exit_code == 2 and "performance.n_bootstrap" in out.output


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mcaudit", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "0.1.0" in proc.stdout


def test_subsample_images_are_decoded_once(mcaudit_demo_model, mcaudit_phantoms, mcaudit_context, monkeypatch):
    ctx = mcaudit_context(mcaudit_demo_model, mcaudit_phantoms(n=30))
    decoded = []
    original = type(ctx.dataset).load_pixels

    def counting(self, index):
        decoded.append(index)
        return original(self, index)

    monkeypatch.setattr(type(ctx.dataset), "load_pixels", counting)
    first = ctx.load_pixels([3, 5, 7])
    again = ctx.load_pixels([5, 7, 9])
    assert decoded == [int(ctx.forward.indices[r]) for r in (3, 5, 7, 9)]
    assert torch.equal(first[1:], again[:2])
