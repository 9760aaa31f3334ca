"""The forward cache and --resume (mcaudit.forward_cache): a second identical run encodes no
image, a changed prompt re-encodes text only, a changed image re-encodes that image only, and
an interrupted run resumes with the metrics of an uninterrupted one."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mcaudit.models.adapter import ModelAdapter
from mcaudit.testing import run_cli

CHECKS = "performance,calibration"


def audit(out, cache, *extra):
    outcome = run_cli(["run", "--quiet", "--checks", CHECKS, "--cache-dir", cache, *extra], out)
    assert outcome.exit_code in (0, 1), outcome.output
    return outcome.results


def measured(results):
    return {name: (c["metrics"], c["intervals"], c["status"]) for name, c in results["checks"].items()}


@pytest.fixture
def text_calls(monkeypatch):
    calls: list[int] = []
    original = ModelAdapter.encode_text

    def counting(self, prompts, batch_size=256):
        calls.append(len(prompts))
        return original(self, prompts, batch_size)

    monkeypatch.setattr(ModelAdapter, "encode_text", counting)
    return calls


def test_a_second_identical_run_encodes_no_image(tmp_path, mcaudit_encoder_calls):
    first = audit(tmp_path / "a", tmp_path / "cache")
    assert sum(mcaudit_encoder_calls) >= first["dataset"]["images"]
    mcaudit_encoder_calls.clear()
    second = audit(tmp_path / "b", tmp_path / "cache")
    assert sum(mcaudit_encoder_calls) == 0
    assert measured(second) == measured(first)
    mcaudit_encoder_calls.clear()
    audit(tmp_path / "c", tmp_path / "cache", "--no-cache")
    assert sum(mcaudit_encoder_calls) >= first["dataset"]["images"]


def test_changed_prompts_re_encode_the_text_only(tmp_path, mcaudit_encoder_calls, text_calls):
    audit(tmp_path / "a", tmp_path / "cache")
    results = audit(tmp_path / "a", tmp_path / "cache")
    prompts = tmp_path / "prompts.toml"
    classes = results["dataset"]["classes"]
    prompts.write_text("[classes]\n" + "".join(f'"{c}" = ["an x-ray showing {c}", "{c}"]\n' for c in classes))
    mcaudit_encoder_calls.clear()
    text_calls.clear()
    changed = audit(tmp_path / "b", tmp_path / "cache", "--prompts", prompts)
    assert sum(mcaudit_encoder_calls) == 0 and sum(text_calls) > 0
    assert changed["prompts"]["source"] != results["prompts"]["source"]
    fresh = audit(tmp_path / "c", tmp_path / "fresh-cache", "--prompts", prompts)
    for name, (metrics, _, _) in measured(fresh).items():
        assert changed["checks"][name]["metrics"] == pytest.approx(metrics, rel=1e-6, abs=1e-9)


def write_image_set(folder, n=12, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = ["path,label"]
    for i in range(n):
        label = ["normal", "pneumonia"][i % 2]
        pixels = (rng.uniform(size=(40, 40)) * (90 if label == "normal" else 250)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,{label}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def test_a_changed_image_re_encodes_that_image_only(tmp_path, mcaudit_encoder_calls):
    manifest = write_image_set(tmp_path / "data")
    args = ["--model", "demo", "--data", manifest, "--checks", "performance"]
    run_cli(["run", "--quiet", "--cache-dir", tmp_path / "cache", *args], tmp_path / "a")
    assert sum(mcaudit_encoder_calls) == 12
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(tmp_path / "data" / "img3.png")
    mcaudit_encoder_calls.clear()
    outcome = run_cli(["run", "--quiet", "--cache-dir", tmp_path / "cache", *args], tmp_path / "b")
    assert sum(mcaudit_encoder_calls) == 1, outcome.output
    fresh = run_cli(["run", "--quiet", "--no-cache", *args], tmp_path / "c")
    assert measured(outcome.results) == measured(fresh.results)


def test_an_interrupted_run_resumes_with_the_metrics_of_an_uninterrupted_one(tmp_path, monkeypatch):
    from mcaudit.plugins.checks.calibration import CalibrationCheck
    from mcaudit.plugins.checks.performance import PerformanceCheck

    whole = audit(tmp_path / "whole", tmp_path / "other-cache")
    original = CalibrationCheck.run

    def interrupted(self, ctx, params):
        raise KeyboardInterrupt

    monkeypatch.setattr(CalibrationCheck, "run", interrupted)
    outcome = run_cli(["run", "--quiet", "--checks", CHECKS, "--cache-dir", tmp_path / "cache"], tmp_path / "out")
    assert outcome.exit_code != 0 and not (tmp_path / "out" / "results.json").exists()
    monkeypatch.setattr(CalibrationCheck, "run", original)
    ran = []
    performance = PerformanceCheck.run
    monkeypatch.setattr(PerformanceCheck, "run", lambda self, ctx, params: ran.append(1) or performance(self, ctx, params))
    resumed = audit(tmp_path / "out", tmp_path / "cache", "--resume")
    assert ran == []  # finished before the interruption: taken, not run again
    assert measured(resumed) == measured(whole)


def test_resume_needs_the_cache(tmp_path):
    outcome = run_cli(["run", "--quiet", "--checks", "performance", "--no-cache", "--resume"], tmp_path / "out")
    assert outcome.exit_code == 2 and "--resume" in outcome.output


def test_finished_checks_are_read_only_from_files_this_user_alone_could_write(tmp_path, capsys):
    from mcaudit.forward_cache import CheckStore

    store = CheckStore(tmp_path / "cache", "run-key", resume=True)
    store.save("performance", {"a": 1}, {"status": "pass"}, {"metrics": {"accuracy": 0.5}})
    path = store._path("performance", {"a": 1})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert store.load("performance", {"a": 1}) == ({"status": "pass"}, {"metrics": {"accuracy": 0.5}})
    assert CheckStore(tmp_path / "cache", "run-key", resume=False).load("performance", {"a": 1}) is None

    path.chmod(0o666)  # anyone on a shared disk could have replaced it
    assert store.load("performance", {"a": 1}) is None
    assert "not resuming performance" in capsys.readouterr().err
    path.chmod(0o600)
    assert store.load("performance", {"a": 1}) is not None

    elsewhere = tmp_path / "elsewhere.pkl"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    assert store.load("performance", {"a": 1}) is None
    path.unlink()
    elsewhere.rename(path)
    if os.getuid() == 0:  # as root the test can give the file to another user
        os.chown(path, 12345, -1)
        assert store.load("performance", {"a": 1}) is None
