"""Several audit runs compared pair by pair (mcaudit.comparison): known answers (a model
against an exact copy of itself, copies damaged on purpose in one respect), cross-checks of
the paired numbers against statsmodels, scikit-learn and an independent DeLong written here,
runs that cannot be paired, and the per-image columns the built-in checks declare."""

from __future__ import annotations

import csv
import json
import math
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm, rankdata

from mcaudit.comparison import (
    ComparedRun,
    check_param_mismatches,
    compare_runs,
    comparison_text,
    load_run,
    pairing_problems,
)
from mcaudit.comparison.statistics import WALD_METHOD, wald_difference
from mcaudit.errors import InputError
from mcaudit.paired import MCNEMAR_CLUSTER_METHOD
from mcaudit.testing import load_adapter, run_cli, save_openclip_folder

BASE = ["--checks", "performance,calibration,adversarial", "--set", "adversarial.n_images=16"]
N_BOOT = 1000


def read_samples(folder: Path) -> list[dict[str, str]]:
    with open(folder / "samples.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def demo_copy(folder: Path, change) -> Path:
    """The demo model, changed in place by ``change``, saved as an open_clip folder."""
    demo = Path(str(resources.files("mcaudit.demo")))
    cfg = json.loads((demo / "open_clip_config.json").read_text())
    model = load_adapter("demo").model
    with torch.no_grad():
        change(model)
    pre = cfg["preprocess_cfg"]
    save_openclip_folder(model, folder, cfg["model_cfg"], pre["mean"], pre["std"])
    shutil.copy(demo / "prompts.toml", folder / "prompts.toml")
    return folder


def hotter(model):
    model.logit_scale.fill_(math.log(1000.0))  # same ranking and answers, overconfident


def noisier(model):
    generator = torch.Generator().manual_seed(0)
    for p in model.visual.parameters():
        if p.ndim >= 2:
            p.add_(1.5 * p.std() * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders by name: the demo model twice, a hotter and a noisier copy, on the same
    1200 images; and small runs on other data, another seed and other settings."""
    root = tmp_path_factory.mktemp("comparison")
    models = {"hot": demo_copy(root / "models" / "hot", hotter), "noisy": demo_copy(root / "models" / "noisy", noisier)}
    plan = {
        "demo": ["--model", "demo", "--data", "phantom:n=1200", *BASE],
        "demo_again": ["--model", "demo", "--data", "phantom:n=1200", *BASE],
        "hot": ["--model", models["hot"], "--data", "phantom:n=1200", *BASE],
        "noisy": ["--model", models["noisy"], "--data", "phantom:n=1200", *BASE],
        "n100": ["--model", "demo", "--data", "phantom:n=100", "--checks", "performance,calibration"],
        "n120": ["--model", "demo", "--data", "phantom:n=120", "--checks", "performance,calibration"],
        "n100_seed1": ["--model", "demo", "--data", "phantom:n=100", "--checks", "performance,calibration",
                       "--seed", "1"],
        "n100_bins10": ["--model", "demo", "--data", "phantom:n=100", "--checks", "performance,calibration",
                        "--set", "calibration.n_bins=10"],
    }
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD", "1")
        for name, args in plan.items():
            done = run_cli(["run", "--quiet", *args], root / name)
            assert done.exit_code in (0, 1), done.output
            out[name] = root / name
    return out


def by_metric(result: dict, a: str | None = None, b: str | None = None) -> dict[str, dict]:
    return {c["metric"]: c for c in result["comparisons"] if (a is None or c["a"] == a) and (b is None or c["b"] == b)}


# --- known answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("twice", ["same run twice", "one folder under two labels"])
def test_a_model_against_an_exact_copy_of_itself_differs_by_nothing(runs, twice):
    second = runs["demo_again"] if twice == "same run twice" else runs["demo"]
    found = compare_runs([load_run(runs["demo"], "one"), load_run(second, "two")], n_boot=N_BOOT)
    json.dumps(found, allow_nan=False)
    assert found["paired"] and found["problems"] == [] and found["skipped_checks"] == {}
    comparisons = by_metric(found)
    assert {"performance.accuracy", "performance.auroc_macro", "calibration.ece",
            "adversarial.robust_accuracy_at_smallest_eps"} <= set(comparisons)
    for c in found["comparisons"]:
        assert c["difference"] == 0, c
        if c["interval"] is not None:
            assert c["interval"][0] <= 0 <= c["interval"][1], c
        assert c["better"] is None
    # the paired methods were used where they exist, the declared column for adversarial
    assert comparisons["performance.accuracy"]["method"].startswith("McNemar")
    assert comparisons["performance.auroc_macro"]["method"].startswith("DeLong")
    assert comparisons["calibration.ece"]["method"].startswith("paired percentile bootstrap")
    assert "adversarial.robust.linf.1/255" in comparisons["adversarial.robust_accuracy_at_smallest_eps"]["method"]
    for dimension in found["ranking"]:
        assert not dimension["decided"]
        assert [m["rank"] for m in dimension["models"]] == [1, 1]
    assert {d["dimension"] for d in found["ranking"]} == {"performance", "calibration", "robustness"}
    assert found["statuses"]["performance"] == {"one": "pass", "two": "pass"}
    text = comparison_text(found)
    assert "Decided differences: none" in text and "undecided" in text


def test_a_hotter_logit_scale_is_worse_calibrated_and_answers_the_same(runs):
    found = compare_runs([load_run(runs["demo"]), load_run(runs["hot"])], n_boot=2000)
    json.dumps(found, allow_nan=False)
    comparisons = by_metric(found)
    ece = comparisons["calibration.ece"]
    assert ece["method"].startswith("paired percentile bootstrap")
    assert ece["value_a"] < ece["value_b"] and ece["p_adjusted"] < 0.05 and ece["better"] == "demo"
    accuracy = comparisons["performance.accuracy"]
    assert accuracy["difference"] == 0 and accuracy["p_value"] == 1.0 and accuracy["better"] is None
    ranks = {d["dimension"]: d for d in found["ranking"]}
    assert ranks["calibration"]["decided"] and ranks["calibration"]["models"][0]["label"] == "demo"
    assert ranks["calibration"]["models"][0]["rank"] == 1 and ranks["calibration"]["models"][1]["rank"] == 2
    assert "calibration.ece: demo better" in comparison_text(found)


def test_noisy_weights_lose_accuracy_against_the_original(runs):
    found = compare_runs([load_run(runs["noisy"]), load_run(runs["demo"])], n_boot=N_BOOT)
    accuracy = by_metric(found)["performance.accuracy"]
    assert accuracy["difference"] < 0 and accuracy["p_value"] < 0.05 and accuracy["p_adjusted"] < 0.05
    assert accuracy["better"] == "demo" and accuracy["higher_is_better"]
    performance = next(d for d in found["ranking"] if d["dimension"] == "performance")
    assert performance["decided"] and performance["models"][0]["label"] == "demo"
    assert performance["models"][0]["wins"] > 0 and performance["models"][1]["losses"] > 0


def test_holm_covers_every_pair_and_metric_of_the_output(runs):
    from mcaudit.paired import holm

    found = compare_runs([load_run(runs[n]) for n in ("demo", "hot", "noisy")], n_boot=200)
    tested = [c for c in found["comparisons"] if c["p_value"] is not None]
    assert len({(c["a"], c["b"]) for c in tested}) == 3
    assert [c["p_adjusted"] for c in tested] == pytest.approx(list(holm([c["p_value"] for c in tested])))
    for c in found["comparisons"]:
        if c["better"] is not None:
            assert c["p_adjusted"] < 0.05 and (c["interval"][0] > 0 or c["interval"][1] < 0)


# --- cross-checks from samples.csv ------------------------------------------------------------


def test_mcnemar_agrees_with_statsmodels_on_the_samples(runs):
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = (np.array([int(r["correct"]) for r in read_samples(runs[n])]) for n in ("demo", "noisy"))
    table = np.array([[np.sum((a == 1) & (b == 1)), np.sum((a == 1) & (b == 0))],
                      [np.sum((a == 0) & (b == 1)), np.sum((a == 0) & (b == 0))]])
    exact = mcnemar(table, exact=True).pvalue
    found = by_metric(compare_runs([load_run(runs["demo"]), load_run(runs["noisy"])], n_boot=200))["performance.accuracy"]
    assert found["n"] == len(a) and found["difference"] * len(a) == pytest.approx(table[0, 1] - table[1, 0])
    assert found["p_value"] <= exact
    from scipy.stats import binom

    low, total = min(table[0, 1], table[1, 0]), table[0, 1] + table[1, 0]
    assert found["p_value"] == pytest.approx(min(1.0, exact - binom.pmf(low, total, 0.5)), rel=1e-9, abs=1e-300)


def sun_xu_delong(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of several score rows and the covariance of their estimates by DeLong's
    structural components, computed from midranks as in Sun and Xu (2014)."""
    m, n = int(positive.sum()), int((~positive).sum())
    aucs, v10, v01 = [], [], []
    for s in scores:
        x, y = s[positive], s[~positive]
        tz, tx, ty = rankdata(np.r_[x, y]), rankdata(x), rankdata(y)
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1 - (tz[m:] - ty) / m)
    cov = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    return np.array(aucs), cov


def test_auroc_difference_agrees_with_sklearn_and_an_independent_delong(runs):
    from sklearn.metrics import roc_auc_score

    found = by_metric(compare_runs([load_run(runs["demo"]), load_run(runs["noisy"])], n_boot=200))["performance.auroc_macro"]
    assert found["method"].startswith("DeLong")
    samples = [read_samples(runs[n]) for n in ("demo", "noisy")]
    positive = np.array([r["label"] == "opacity" for r in samples[0]])
    scores = np.array([[float(r["p_opacity"]) for r in s] for s in samples])
    assert found["value_a"] == pytest.approx(roc_auc_score(positive, scores[0]), abs=1e-12)
    assert found["value_b"] == pytest.approx(roc_auc_score(positive, scores[1]), abs=1e-12)
    for name, value in (("demo", found["value_a"]), ("noisy", found["value_b"])):
        reported = json.loads((runs[name] / "results.json").read_text())["checks"]["performance"]["metrics"]["auroc_macro"]
        assert value == pytest.approx(reported, abs=1e-6)
    aucs, cov = sun_xu_delong(positive, scores)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    half = (found["interval"][1] - found["interval"][0]) / 2
    assert half == pytest.approx(norm.ppf(0.975) * math.sqrt(variance), rel=1e-9)
    assert found["p_value"] == pytest.approx(2 * norm.sf(abs(aucs[0] - aucs[1]) / math.sqrt(variance)), rel=1e-6)


def test_a_subject_column_clusters_the_paired_accuracy(runs, tmp_path):
    copies = []
    for name in ("demo", "noisy"):
        folder = tmp_path / name
        shutil.copytree(runs[name], folder, ignore=shutil.ignore_patterns("figures", "*.html"))
        rows = read_samples(folder)
        with open(folder / "samples.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*rows[0], "subject"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(dict(r, subject=f"s{i // 3}") for i, r in enumerate(rows))
        copies.append(load_run(folder))
    found = by_metric(compare_runs(copies, n_boot=200))
    assert found["performance.accuracy"]["method"] == MCNEMAR_CLUSTER_METHOD
    assert found["calibration.ece"]["method"].endswith("over subjects")


# --- runs that cannot be paired ---------------------------------------------------------------


def test_runs_on_other_images_are_compared_unpaired_and_the_problems_named(runs):
    a, b = load_run(runs["n100"]), load_run(runs["n120"])
    problems = pairing_problems([a, b])
    assert any(p.startswith("dataset sha256 differs") and "n100" in p and "n120" in p for p in problems)
    assert any("samples.csv rows differ" in p and "100 images" in p and "120" in p for p in problems)
    found = compare_runs([a, b], n_boot=200)
    json.dumps(found, allow_nan=False)
    assert not found["paired"] and found["problems"] == problems
    for c in found["comparisons"]:
        if c["interval"] is not None:
            assert c["method"].startswith(WALD_METHOD) and "cannot be paired" in c["method"]
            assert c["n"] is None
        if c["better"] is not None:
            assert c["interval"][0] > 0 or c["interval"][1] < 0
    assert "Why the runs cannot be paired" in comparison_text(found)


def test_another_seed_or_no_samples_prevents_pairing(runs, tmp_path):
    problems = pairing_problems([load_run(runs["n100"]), load_run(runs["n100_seed1"])])
    assert len(problems) == 1 and problems[0].startswith("seed differs") and "has 0" in problems[0] and "has 1" in problems[0]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs["n100"] / "results.json", bare / "results.json")
    without = load_run(bare / "results.json")
    assert without.samples is None and without.label == "bare"
    problems = pairing_problems([load_run(runs["n100"]), without])
    assert problems == [f"bare ({bare / 'results.json'}) has no samples.csv beside its results.json"]


def test_checks_run_with_other_settings_are_not_compared(runs):
    a, b = load_run(runs["n100"]), load_run(runs["n100_bins10"])
    skipped = check_param_mismatches([a, b])
    assert list(skipped) == ["calibration"] and "n_bins=15" in skipped["calibration"] and "n_bins=10" in skipped["calibration"]
    found = compare_runs([a, b], n_boot=200)
    assert found["paired"] and found["skipped_checks"] == skipped
    assert not any(c["check"] == "calibration" for c in found["comparisons"])
    assert by_metric(found)["performance.accuracy"]["difference"] == 0


def test_unpaired_wald_difference_from_two_intervals():
    z = norm.ppf(0.975)
    c = wald_difference("m", 0.5, 0.3, (0.5 - 0.1, 0.5 + 0.1), (0.3 - 0.05, 0.3 + 0.05), 0.95, True)
    se = math.sqrt((0.1 / z) ** 2 + (0.05 / z) ** 2)
    assert c.difference == pytest.approx(0.2) and c.interval == pytest.approx((0.2 - z * se, 0.2 + z * se))
    assert c.p_value == pytest.approx(2 * norm.sf(0.2 / se)) and c.better == "a"
    assert wald_difference("m", 0.1, 0.1, (0.1, 0.1), (0.1, 0.1), 0.95, True).p_value == 1.0


def test_a_metric_without_a_value_or_interval_is_kept_with_a_reason(runs):
    a = load_run(runs["n100"], "x")
    b = load_run(runs["n100"], "x")  # a clashing label is made unique
    b.results = json.loads(json.dumps(b.results))
    del b.results["checks"]["calibration"]["metrics"]["ece"]
    b.samples = None  # unpaired: the interval is the only way left, and accuracy has one
    del b.results["checks"]["performance"]["intervals"]["accuracy"]
    found = compare_runs([a, b], n_boot=200)
    assert [m["label"] for m in found["models"]] == ["x", "x-2"]
    comparisons = by_metric(found)
    assert comparisons["calibration.ece"]["better"] is None and "x-2 reports no calibration.ece" in comparisons["calibration.ece"]["reason"]
    accuracy = comparisons["performance.accuracy"]
    assert accuracy["interval"] is None and accuracy["difference"] == 0 and "no interval" in accuracy["reason"]
    json.dumps(found, allow_nan=False)


def test_a_metric_a_run_does_not_evaluate_decides_nothing(runs):
    """A check may report a number it marks not evaluated (backdoor attack success when the
    model already sends most images to the target): that number must not rank the models."""
    a, b = load_run(runs["n100"], "a"), load_run(runs["n100"], "b")
    b.results = json.loads(json.dumps(b.results))
    calibration = b.results["checks"]["calibration"]
    calibration["metrics"]["ece"], calibration["intervals"]["ece"] = 0.9, [0.89, 0.91]
    calibration.setdefault("not_evaluated", {})["ece"] = "planted: too few images in the bins"
    b.samples = None
    found = compare_runs([a, b], n_boot=200)
    ece = by_metric(found)["calibration.ece"]
    assert ece["better"] is None and ece["interval"] is None and ece["value_b"] is None
    assert ece["reason"] == "b does not evaluate calibration.ece (planted: too few images in the bins)"
    ranking = {row["dimension"]: row for row in found["ranking"]}
    assert ranking["calibration"]["not_compared"] == ece["reason"] and not ranking["calibration"]["decided"]
    assert ranking["performance"]["not_compared"] is None
    assert f"calibration: 1. a (+0/-0), 1. b (+0/-0)  [not compared: {ece['reason']}]" in comparison_text(found)


# --- reading runs -----------------------------------------------------------------------------


def test_load_run_names_the_file_it_cannot_read(tmp_path):
    with pytest.raises(InputError, match="nowhere.json: no such file"):
        load_run(tmp_path / "nowhere.json")
    with pytest.raises(InputError, match="no such file"):
        load_run(tmp_path)  # a folder without results.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not JSON"):
        load_run(bad)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(InputError, match="other.json: not a mcaudit results.json"):
        load_run(other)
    try:
        load_run(bad)
    except InputError as exc:
        assert "\n" not in str(exc)


def test_compared_run_is_a_plain_record(runs):
    run = load_run(runs["demo"] / "results.json")
    assert isinstance(run, ComparedRun) and run.label == "demo" and len(run.samples) == 1200
    assert run.source.endswith("results.json")


# --- the per-image columns the built-in checks declare ----------------------------------------


@pytest.fixture(scope="module")
def declared_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("declared") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD", "1")
        done = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=300",
                        "--checks", "adversarial,certified,saliency"], out)
    assert done.exit_code in (0, 1), done.output
    return out


@pytest.mark.parametrize("check,metrics", [
    ("adversarial", ["robust_accuracy_at_smallest_eps"]),
    ("certified", ["certified_accuracy_at_radius"]),
    ("saliency", ["recommended_deletion_gain", "recommended_insertion_gain"]),
])
def test_a_declared_metric_is_the_mean_of_its_per_image_column(declared_run, check, metrics):
    results = json.loads((declared_run / "results.json").read_text())
    entry = results["checks"][check]
    declared = entry["details"]["paired_columns"]
    if check == "saliency" and not entry["details"]["recommended"]:
        assert declared == {}
        pytest.skip("no saliency method was recommended on this run")
    assert set(metrics) <= set(declared)
    rows = read_samples(declared_run)
    for metric in metrics:
        cells = [r[f"{check}.{declared[metric]}"] for r in rows]
        values = np.array([float(v) for v in cells if v != ""])
        assert len(values) == entry["metrics"]["n_images"]
        assert values.mean() == pytest.approx(entry["metrics"][metric], abs=1e-6)


def test_certified_declares_no_column_when_it_picks_the_best_of_several_noise_levels(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD", "1")
        done = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=20", "--checks", "certified",
                        "--set", "certified.sigmas=[0.25,0.5]"], tmp_path / "o")
    assert done.exit_code in (0, 1), done.output
    entry = done.results["checks"]["certified"]
    assert entry["details"]["paired_columns"] == {}
    sigma = entry["details"]["gate_sigma"]
    header = (tmp_path / "o" / "samples.csv").read_text().splitlines()[0]
    assert f"certified.certified_at_gate_radius.sigma={sigma:g}" in header
