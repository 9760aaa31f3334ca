"""Fairness check: group metrics and gaps against fairlearn and scikit-learn; a planted bias is
found, random group labels are not flagged; real data sets show every group with its interval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equal_opportunity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from conftest import shared
from mcaudit import InputError
from mcaudit.plugins.checks.fairness import FairnessCheck
from mcaudit.plugins.checks.fairness.inference import holm_adjust
from mcaudit.testing import make_context, phantom_dataset, run_cli, save_openclip_folder, tiny_openclip


def synthetic_context(probs, labels, groups, classes=None, seed=0):
    """An AuditContext whose shared forward pass gave ``probs`` (logits = log probs)."""
    from mcaudit.context import AuditContext
    from mcaudit.data.dataset import AuditDataset, Record
    from mcaudit.forward import ForwardOutputs
    from mcaudit.prompts import PromptSet

    n, k = probs.shape
    records = [Record(f"img{i}", int(labels[i]), {c: str(v[i]) for c, v in groups.items()}) for i in range(n)]
    dataset = AuditDataset(spec="synthetic", records=records, classes=classes or [f"class{j}" for j in range(k)],
                           image_size=(8, 8), fingerprint="synthetic", format_name="synthetic", group_columns=tuple(groups))
    forward = ForwardOutputs(indices=np.arange(n), labels=np.asarray(labels, dtype=np.int64), image_features=torch.zeros(n, 4),
                             logits=torch.log(torch.as_tensor(probs, dtype=torch.float64)).float(), grey=np.ones(n, dtype=bool))
    return AuditContext(model=None, dataset=dataset, prompts=PromptSet(), class_features=torch.zeros(k, 4),
                        forward=forward, device=torch.device("cpu"), seed=seed)


def biased_predictions(sizes, noise, k=2, seed=0):
    """Labels, probabilities and a group column; group g's scores carry noise[g]."""
    rng = np.random.default_rng(seed)
    labels, probs, group = [], [], []
    for name, n in sizes.items():
        y = rng.integers(0, k, n)
        z = rng.normal(0, 1, (n, k))
        z[np.arange(n), y] += 2.0 / noise[name]
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        labels.append(y)
        probs.append(p)
        group += [name] * n
    return np.concatenate(labels), np.concatenate(probs), np.array(group, dtype=object)


def run_check(ctx, **params):
    return FairnessCheck().run(ctx, FairnessCheck.resolve_params(params))


def verdict(result):
    """The status the host gives ``result`` under the default thresholds, and the outcomes."""
    from mcaudit.gating import apply_gate, parse_threshold
    from mcaudit.results import result_entry

    entry = result_entry(result)
    thresholds = [parse_threshold(f"fairness.{m}", spec, "default") for m, spec in FairnessCheck.default_thresholds.items()]
    gate = apply_gate({"checks": {"fairness": entry}}, thresholds, gated=False)
    return entry["status"], {o["name"]: o for o in gate["results"]}


def wilson(k, n, z=1.959963984540054):
    """Wilson's score interval written out from its formula, as an outside reference."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_binary_group_metrics_and_gaps_agree_with_fairlearn():
    labels, probs, site = biased_predictions({"A": 150, "B": 120, "C": 90}, {"A": 1.0, "B": 1.2, "C": 3.0})
    ctx = synthetic_context(probs, labels, {"site": site}, classes=["normal", "disease"])
    result = run_check(ctx, n_bootstrap=30, n_permutations=0, intersections=False)
    probs = ctx.forward.probs
    preds = probs.argmax(1)
    y_true, y_pred = (labels == 1).astype(int), (preds == 1).astype(int)
    frame = MetricFrame(
        metrics={"accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy_score, "tpr": true_positive_rate,
                 "fpr": false_positive_rate, "selection_rate": selection_rate},
        y_true=y_true, y_pred=y_pred, sensitive_features=site)
    groups = result.details["columns"]["site"]["groups"]
    for g in "ABC":
        assert groups[g]["n"] == int((site == g).sum())
        for m in ("accuracy", "balanced_accuracy", "tpr", "fpr", "selection_rate"):
            assert groups[g][m] == pytest.approx(frame.by_group.loc[g, m], abs=1e-12), (g, m)
        rows = site == g
        assert groups[g]["auroc"] == pytest.approx(roc_auc_score(y_true[rows], probs[rows, 1]), abs=1e-12)
        k, n = groups[g]["counts"]["accuracy"]
        assert (k, n) == (round(frame.by_group.loc[g, "accuracy"] * n), int((site == g).sum()))
        assert groups[g]["intervals"]["accuracy"] == pytest.approx(wilson(k, n), abs=1e-12)
        k, n = groups[g]["counts"]["tpr"]
        assert n == int(((site == g) & (y_true == 1)).sum())
        assert groups[g]["intervals"]["tpr"] == pytest.approx(wilson(k, n), abs=1e-12)
    m = result.metrics
    for metric in ("accuracy", "balanced_accuracy", "tpr", "fpr", "selection_rate"):
        assert m[f"site.{metric}_gap"] == pytest.approx(frame.difference()[metric], abs=1e-12)
        assert m[f"site.{metric}_ratio"] == pytest.approx(frame.ratio()[metric], abs=1e-12)
    assert m["site.dp_difference"] == pytest.approx(demographic_parity_difference(y_true, y_pred, sensitive_features=site), abs=1e-12)
    assert m["site.eo_difference"] == pytest.approx(equalized_odds_difference(y_true, y_pred, sensitive_features=site), abs=1e-12)
    assert m["site.eop_difference"] == pytest.approx(equal_opportunity_difference(y_true, y_pred, sensitive_features=site), abs=1e-12)
    assert m["site.worst_group_accuracy"] == pytest.approx(frame.group_min()["accuracy"], abs=1e-12)
    overall = roc_auc_score(y_true, probs[:, 1])
    group_auc = [roc_auc_score(y_true[site == g], probs[site == g, 1]) for g in "ABC"]
    assert m["site.es_auroc"] == pytest.approx(overall / (1 + sum(abs(a - overall) for a in group_auc)), abs=1e-12)
    # per-group ECE is the calibration check's plain top-label ECE (ece_plugin)
    from torchmetrics.functional.classification import multiclass_calibration_error

    rows = site == "C"
    ece = multiclass_calibration_error(torch.from_numpy(probs[rows]), torch.from_numpy(labels[rows]), 2, n_bins=15)
    assert groups["C"]["ece"] == pytest.approx(float(ece), abs=1e-6)
    for key in ("site.accuracy_gap", "site.dp_difference", "site.eo_difference", "site.worst_group_accuracy",
                "max_accuracy_gap", "max_eo_difference"):
        lo, hi = result.intervals[key]
        assert lo <= m[key] <= hi, key
        assert result.n[key] == 360
    assert "site.es_auroc" not in result.intervals and "site.ece_gap" not in result.intervals
    assert "bootstrap" in result.details["interval_method"] and "Wilson" in result.details["interval_method"]


def test_positive_class_parameter_and_multiclass_worst_class():
    labels, probs, sex = biased_predictions({"F": 200, "M": 160}, {"F": 1.0, "M": 2.0}, k=3, seed=4)
    ctx = synthetic_context(probs, labels, {"sex": sex}, classes=["a", "b", "c"])
    preds = ctx.forward.probs.argmax(1)
    named = run_check(ctx, positive_class="a", n_bootstrap=0, n_permutations=0)
    y0, p0 = (labels == 0).astype(int), (preds == 0).astype(int)
    assert named.metrics["sex.eo_difference"] == pytest.approx(equalized_odds_difference(y0, p0, sensitive_features=sex), abs=1e-12)
    assert named.metrics["sex.dp_difference"] == pytest.approx(demographic_parity_difference(y0, p0, sensitive_features=sex), abs=1e-12)
    macro = run_check(ctx, n_bootstrap=0, n_permutations=0)
    per_class = [(labels == k).astype(int) for k in range(3)], [(preds == k).astype(int) for k in range(3)]
    assert macro.metrics["sex.dp_difference"] == pytest.approx(
        max(demographic_parity_difference(t, p, sensitive_features=sex) for t, p in zip(*per_class)), abs=1e-12)
    assert macro.metrics["sex.eop_difference"] == pytest.approx(
        max(equal_opportunity_difference(t, p, sensitive_features=sex) for t, p in zip(*per_class)), abs=1e-12)
    assert macro.metrics["sex.eo_difference"] == pytest.approx(
        max(equalized_odds_difference(t, p, sensitive_features=sex) for t, p in zip(*per_class)), abs=1e-12)
    f = macro.details["columns"]["sex"]["groups"]["F"]
    rows = sex == "F"
    assert f["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels[rows], preds[rows]), abs=1e-12)
    assert f["auroc"] == pytest.approx(roc_auc_score(labels[rows], ctx.forward.probs[rows], multi_class="ovr"), abs=1e-12)
    # averaged over all classes it is always 1/K: undefined, said why, and null in results.json
    from mcaudit.results import result_entry

    assert np.isnan(f["selection_rate"]) and "1/K" in f["not_evaluated"]["selection_rate"]
    assert result_entry(macro)["details"]["columns"]["sex"]["groups"]["F"]["selection_rate"] is None
    with pytest.raises(InputError, match="positive_class"):
        run_check(ctx, positive_class="zebra")


def test_small_and_missing_groups_shown_but_left_out_of_gaps():
    labels, probs, site = biased_predictions({"A": 100, "B": 80, "D": 6, "": 9}, {"A": 1.0, "B": 1.5, "D": 5.0, "": 5.0}, seed=2)
    ctx = synthetic_context(probs, labels, {"site": site})
    result = run_check(ctx, n_bootstrap=20, n_permutations=0)
    col = result.details["columns"]["site"]
    assert set(col["groups"]) == {"A", "B", "D"} and col["missing_values"] == 9
    assert col["groups"]["D"]["in_gaps"] is False and col["groups"]["A"]["in_gaps"] is True
    assert col["groups"]["D"]["decision"] == "too small to decide"
    k, n = col["groups"]["D"]["counts"]["accuracy"]
    assert n == 6 and col["groups"]["D"]["intervals"]["accuracy"] == pytest.approx(wilson(k, n), abs=1e-12)
    assert any("D (n=6)" in w for w in result.warnings) and any("9 image(s) without a value" in w for w in result.warnings)
    keep = np.isin(site, ["A", "B"])
    preds = ctx.forward.probs.argmax(1)
    frame = MetricFrame(metrics=accuracy_score, y_true=labels[keep], y_pred=preds[keep], sensitive_features=site[keep])
    assert result.metrics["site.accuracy_gap"] == pytest.approx(frame.difference(), abs=1e-12)
    table = next(t for t in result.tables if t.title == "site: per group")
    # worst compared group first, then the one too small to decide, then the images without a value
    accuracy = {g: float((preds[site == g] == labels[site == g]).mean()) for g in ("A", "B")}
    assert [r[0] for r in table.rows] == sorted(accuracy, key=accuracy.get) + ["D", "(missing)"]
    assert table.rows[2][2].startswith("too small to decide")
    overview = result.tables[0]
    assert "D (n=6)" in overview.rows[0][-1]


def test_numeric_columns_are_binned_by_quantiles_or_given_edges():
    rng = np.random.default_rng(0)
    labels, probs, _ = biased_predictions({"all": 400}, {"all": 1.0})
    age = rng.integers(20, 91, 400).astype(str)
    ctx = synthetic_context(probs, labels, {"age": age})
    quart = run_check(ctx, n_bootstrap=0, n_permutations=0)
    groups = quart.details["columns"]["age"]["groups"]
    assert len(groups) == 4 and list(groups)[0].startswith("<") and list(groups)[-1].startswith(">=")
    assert abs(max(g["n"] for g in groups.values()) - min(g["n"] for g in groups.values())) < 40
    edged = run_check(ctx, bin_edges="age=40,65", n_bootstrap=0, n_permutations=0)
    groups = edged.details["columns"]["age"]["groups"]
    assert list(groups) == ["<40", "40-65", ">=65"]
    assert groups["<40"]["n"] == int((age.astype(int) < 40).sum())
    for bad in ("age=65,40", "age=old", "weight=3"):
        with pytest.raises(InputError, match="bin_edges"):
            run_check(ctx, bin_edges=bad)


@pytest.mark.parametrize("key,value,message", [
    ("min_group_size", 0, "fairness.min_group_size: 0 is below the minimum 1"),
    ("n_bins", 1, "fairness.n_bins: 1 is below the minimum 2"),
    ("quantile_bins", 1, "fairness.quantile_bins: 1 is below the minimum 2"),
    ("n_bootstrap", -1, "fairness.n_bootstrap: -1 is below the minimum 0"),
    ("n_permutations", -5, "fairness.n_permutations: -5 is below the minimum 0"),
    ("alpha", 1.0, "fairness.alpha: must be between 0 and 1"),
    ("alpha", 0.0, "fairness.alpha: must be between 0 and 1"),
    ("bin_edges", "age=65,40", "fairness.bin_edges 'age=65,40': give one or more increasing numbers"),
    ("bin_edges", "age", "fairness.bin_edges 'age': expected COLUMN=EDGE"),
])
def test_bad_parameters_are_refused_before_any_data(key, value, message):
    """Declarative bounds: checked when the parameters resolve, before the model loads."""
    with pytest.raises(InputError) as caught:
        FairnessCheck.resolve_params({key: value})
    assert str(caught.value).startswith(message)
    assert FairnessCheck.resolve_params({"bin_edges": "age=40,65", "alpha": 0.5})["bin_edges"] == ["age=40,65"]


def test_a_columns_p_value_does_not_depend_on_the_other_columns():
    """Each column draws its shuffles from its own stream (fairness:permutation:<column>), so
    auditing more columns, or their intersections, leaves its p-value as it was."""
    labels, probs, site = biased_predictions({"A": 90, "B": 90, "C": 60}, {"A": 1.0, "B": 1.0, "C": 2.5}, seed=9)
    sex = np.random.default_rng(2).choice(["F", "M"], len(labels))
    alone = run_check(synthetic_context(probs, labels, {"site": site}), n_bootstrap=0, n_permutations=60)
    more = run_check(synthetic_context(probs, labels, {"sex": sex, "site": site}), n_bootstrap=0, n_permutations=60)
    assert 0 < alone.metrics["site.p_value"] < 1 and "sex&site.p_value" in more.metrics
    assert more.metrics["site.p_value"] == alone.metrics["site.p_value"]
    assert more.details["columns"]["site"]["gap_p_values"] == alone.details["columns"]["site"]["gap_p_values"]


def test_intersections_and_holm():
    labels, probs, site = biased_predictions({"A": 120, "B": 120}, {"A": 1.0, "B": 1.0}, seed=5)
    sex = np.array(["F", "M"] * 120, dtype=object)
    result = run_check(synthetic_context(probs, labels, {"site": site, "sex": sex}), n_bootstrap=0, n_permutations=50)
    assert set(result.details["columns"]) == {"site", "sex", "site&sex"}
    assert set(result.details["columns"]["site&sex"]["groups"]) == {"A&F", "A&M", "B&F", "B&M"}
    assert holm_adjust([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])


def test_planted_bias_significant_random_groups_not():
    labels, probs, site = biased_predictions({"A": 150, "B": 150, "C": 100}, {"A": 1.0, "B": 1.0, "C": 4.0}, seed=1)
    rng = np.random.default_rng(11)
    shuffled = rng.permutation(site)
    result = run_check(synthetic_context(probs, labels, {"site": site, "random": shuffled}), n_bootstrap=100,
                       n_permutations=300, intersections=False)
    m = result.metrics
    assert m["site.p_value"] < 0.01 and m["site.p_value_holm"] < 0.05
    assert m["random.p_value_holm"] > 0.05
    assert result.details["columns"]["site"]["groups"]["C"]["accuracy"] == pytest.approx(m["site.worst_group_accuracy"])
    assert result.summary.startswith("Largest accuracy gap") and "in site, between C" in result.summary
    status, outcomes = verdict(result)
    assert status == "fail" and outcomes["fairness.max_accuracy_gap"]["status"] == "fail"
    assert outcomes["fairness.max_accuracy_gap"]["n"] == 400
    assert "no significant" not in result.summary.lower()


def test_corrupted_group_fails_clean_model_is_not_failed():
    """Known answer: group B's predictions are replaced by coin flips for half its images."""
    rng = np.random.default_rng(21)
    n = 2400
    site = np.array(["A", "B", "C"] * (n // 3), dtype=object)
    labels = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + (labels - 0.5) * rng.uniform(0.4, 1.0, n), 0.01, 0.99)  # ~100% accurate, every site alike
    clean = np.stack([1 - p1, p1], axis=1)
    clean_result = run_check(synthetic_context(clean, labels, {"site": site}), n_bootstrap=200, n_permutations=200)
    status, outcomes = verdict(clean_result)
    assert status == "pass", clean_result.summary
    assert outcomes["fairness.max_accuracy_gap"]["interval"][1] <= 0.1
    corrupted = clean.copy()
    hit = (site == "B") & (rng.random(n) < 0.5)
    corrupted[hit] = rng.dirichlet([1, 1], int(hit.sum()))
    bad = run_check(synthetic_context(corrupted, labels, {"site": site}), n_bootstrap=200, n_permutations=200)
    status, outcomes = verdict(bad)
    assert status == "fail" and outcomes["fairness.max_accuracy_gap"]["interval"][0] > 0.1
    assert "between B" in bad.summary and bad.metrics["site.p_value"] < 0.01
    # per-group values agree with fairlearn on the same inputs
    preds = synthetic_context(corrupted, labels, {"site": site}).forward.probs.argmax(1)
    frame = MetricFrame(metrics={"accuracy": accuracy_score, "tpr": true_positive_rate, "fpr": false_positive_rate},
                        y_true=labels, y_pred=preds, sensitive_features=site)
    for g in "ABC":
        for metric in ("accuracy", "tpr", "fpr"):
            assert bad.details["columns"]["site"]["groups"][g][metric] == pytest.approx(frame.by_group.loc[g, metric], abs=1e-12)
    assert bad.metrics["max_accuracy_gap"] == pytest.approx(frame.difference()["accuracy"], abs=1e-12)


def test_small_worst_group_is_named_too_small_to_decide():
    """The issue's case: a 15-image site far worse than the compared ones must not vanish."""
    labels, probs, site = biased_predictions({"A": 200, "B": 200, "D": 15}, {"A": 1.0, "B": 1.1, "D": 40.0}, seed=3)
    result = run_check(synthetic_context(probs, labels, {"site": site}), n_bootstrap=100, n_permutations=0)
    d = result.details["columns"]["site"]["groups"]["D"]
    assert d["n"] == 15 and d["decision"] == "too small to decide" and d["accuracy"] < 0.7
    assert "site = D" in result.summary and "too small to decide" in result.summary and "n=15" in result.summary
    assert result.metrics["worst_group_accuracy"] > d["accuracy"]  # compared groups only, and the summary says so
    lo, hi = d["intervals"]["accuracy"]
    overall = float(np.mean(np.argmax(probs, 1) == labels))
    assert hi < overall  # so clearly worse that even 15 images show it: a warning, not a silent row
    assert any(f.status == "warn" and "site = D" in f.message for f in result.findings)


def test_one_group_column_is_not_evaluated_with_reason():
    labels, probs, site = biased_predictions({"A": 100, "B": 8}, {"A": 1.0, "B": 1.0}, seed=6)
    result = run_check(synthetic_context(probs, labels, {"site": site}), n_bootstrap=50, n_permutations=50)
    assert "fewer than two groups of at least 20" in result.not_evaluated["site.accuracy_gap"]
    assert "no column has two groups" in result.not_evaluated["max_accuracy_gap"]
    status, outcomes = verdict(result)
    assert status == "not_evaluated" and outcomes["fairness.max_accuracy_gap"]["status"] == "not_evaluated"
    assert result.summary.startswith("No column has two groups")


def test_subject_ids_widen_gap_intervals():
    """Five copies of each patient's image carry one patient's information: a patient-level
    bootstrap must give a wider gap interval than treating the copies as independent."""
    labels, probs, site = biased_predictions({"A": 60, "B": 60}, {"A": 1.0, "B": 2.0}, seed=8)
    labels, probs, site = np.repeat(labels, 5), np.repeat(probs, 5, axis=0), np.repeat(site, 5)
    plain = synthetic_context(probs, labels, {"site": site})
    by_subject = synthetic_context(probs, labels, {"site": site})
    for i, record in enumerate(by_subject.dataset.records):
        record.subject = f"p{i // 5}"
    a = run_check(plain, n_bootstrap=200, n_permutations=0).intervals["site.accuracy_gap"]
    b = run_check(by_subject, n_bootstrap=200, n_permutations=0)
    assert b.details["resampling_unit"] == "subject"
    b = b.intervals["site.accuracy_gap"]
    assert (b[1] - b[0]) > 1.6 * (a[1] - a[0])


def test_profiles_and_threshold_reasons():
    assert set(FairnessCheck.profiles) == {"quick", "standard", "thorough"}
    for key in ("n_bootstrap", "n_permutations"):
        assert FairnessCheck.profiles["standard"][key] == FairnessCheck.params[key].default
    assert set(FairnessCheck.threshold_reasons) == set(FairnessCheck.default_thresholds)


@pytest.fixture(scope="module")
def demo_context(mcaudit_demo_model):
    return make_context(mcaudit_demo_model, phantom_dataset(240, seed=3, groups=("site", "sex")))


def test_demo_model_site_effect_found_and_shuffled_sites_not(demo_context):
    ctx = demo_context
    found = run_check(ctx, n_bootstrap=50, n_permutations=300, intersections=False)
    assert found.metrics["site.p_value_holm"] < 0.05
    site = found.details["columns"]["site"]["groups"]
    assert min(site, key=lambda g: site[g]["accuracy"]) == "C"
    # same predictions, site labels shuffled among the images: no significant gap
    original = [dict(r.groups) for r in ctx.dataset.records]
    values = np.random.default_rng(0).permutation([g["site"] for g in original])
    try:
        for record, v in zip(ctx.dataset.records, values):
            record.groups["site"] = v
        shuffled = run_check(ctx, n_bootstrap=0, n_permutations=300, intersections=False)
    finally:
        for record, g in zip(ctx.dataset.records, original):
            record.groups = g
    assert shuffled.metrics["site.p_value"] > 0.05


def test_demo_run_shows_site_effect(tmp_path):
    out = run_cli(["run", "--quiet", "-p", "mcaudit.plugins.checks.fairness", "--checks", "fairness",
                   "--set", "fairness.n_permutations=200", "--set", "fairness.n_bootstrap=50"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    fair = out.results["checks"]["fairness"]
    assert fair["metrics"]["site.p_value_holm"] < 0.05 and "site" in fair["summary"]
    assert "site.accuracy_gap" in fair["intervals"] and fair["status"] != "pass"
    html = out.html
    assert 'id="check-fairness"' in html and "site: per group" in html and "site&amp;sex: gaps between groups" in html


def test_no_group_columns_skips():
    labels, probs, _ = biased_predictions({"all": 30}, {"all": 1.0})
    assert run_check(synthetic_context(probs, labels, {})).status == "skipped"


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    return save_openclip_folder(tiny_openclip(0), tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("manifest,columns", [("oasis1/manifest.csv", ["sex", "age"]),
                                              ("ham10000/manifest.csv", ["sex", "age", "site"])])
def test_real_data_every_group_with_interval(tmp_path, tiny_model_folder, manifest, columns):
    path = shared(manifest)
    args = ["run", "--quiet", "--model", str(tiny_model_folder), "--data", str(path), "-p", "mcaudit.plugins.checks.fairness",
            "--checks", "performance,fairness", "--set", "fairness.n_permutations=100", "--set", "fairness.n_bootstrap=60"]
    for c in columns:
        args += ["--group", c]
    out = run_cli(args, tmp_path / "o")
    assert out.exit_code == 0, out.output
    fair = out.results["checks"]["fairness"]
    assert fair["execution"] == "completed" and fair["status"] in ("pass", "warn", "fail", "inconclusive", "not_evaluated")
    html = out.html
    for column, info in fair["details"]["columns"].items():
        assert info["groups"], column
        for name, g in info["groups"].items():
            lo, hi = g["intervals"]["accuracy"]
            assert lo is not None and hi is not None and lo <= g["accuracy"] <= hi, (column, name)
            assert g["decision"] == ("compared" if g["n"] >= 20 else "too small to decide")
            assert f"{column}: per group" in html.replace("&amp;", "&")
    assert {c for c in columns} <= set(fair["details"]["columns"])


# -- the chunked permutation test equals the plain per-shuffle loop -----------------------------
def _outcomes(n=240, k=3, seed=0):
    from mcaudit.plugins.checks.fairness.engine import Outcomes

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), size=n)
    probs[: n // 4] = probs[0]  # a block of tied scores, so ties are counted one half
    labels = rng.integers(0, k, n)
    labels[: n // 4:2] = 0
    return Outcomes(labels, probs.argmax(axis=1), probs, list(range(k)), k, 10)


def test_permuted_auroc_equals_grouped_auroc_permutation_by_permutation():
    from mcaudit.plugins.checks.fairness.engine import grouped_auroc, permuted_auroc

    o = _outcomes()
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(len(o.labels), 200, replace=False))
    perm_codes = np.stack([rng.integers(0, 4, len(rows)) for _ in range(7)])
    perm_codes[0, :] = 0  # a permutation where three groups are empty: NaN
    batched = permuted_auroc(o, rows, perm_codes, 4)
    for p, codes in enumerate(perm_codes):
        support = np.zeros((4, o.n_classes))
        np.add.at(support, (codes, o.labels[rows]), 1)
        np.testing.assert_allclose(batched[p], grouped_auroc(o, rows, codes, 4, support), atol=1e-12, equal_nan=True)
    # and both equal scikit-learn's macro one-vs-rest AUROC for one group
    g = perm_codes[3] == 2
    expected = np.mean([roc_auc_score(o.labels[rows][g] == k, o.probs[rows][g, k]) for k in range(o.n_classes)])
    assert batched[3, 2] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("macro", [False, True])
def test_chunked_permutation_test_equals_the_per_shuffle_loop(macro):
    from mcaudit.plugins.checks.fairness.engine import GROUP_METRICS, gap_statistics, measure_groups
    from mcaudit.plugins.checks.fairness.inference import permutation_test
    from mcaudit.plugins.checks.fairness.settings import Settings

    o = _outcomes(seed=2)
    codes = np.random.default_rng(3).integers(0, 4, len(o.labels))
    codes[:5] = -1  # missing values stay out
    codes[codes == 1] = np.where(np.arange((codes == 1).sum()) < 4, 1, 2)  # group 1: 4 images, too small
    in_gaps = np.array([True, False, True, True])
    compared = [0, 2, 3]
    s = Settings(positives=[0, 1, 2] if macro else [1], positive_label="", macro=macro, min_group_size=10, quantile_bins=4,
                 edges={}, intersections=False, n_bootstrap=0, n_permutations=150, alpha=0.05, n_bins=10)
    members = [np.flatnonzero(codes == g) for g in compared]
    rows_all = np.concatenate(members)
    values, rates = measure_groups(o, rows_all, np.repeat(np.arange(3), [len(m) for m in members]), 3, macro)
    observed = gap_statistics(values, rates, float("nan"))

    # the loop the chunked version replaced: one shuffle, one evaluation, one set of gaps at a time
    rng = np.random.default_rng(4)
    keys = [f"{m}_gap" for m in GROUP_METRICS]
    obs = np.array([observed[k] for k in keys])
    rows = np.flatnonzero(np.isin(codes, compared))
    exceed, exceed_max = np.zeros(len(keys)), 0
    for _ in range(s.n_permutations):
        shuffled = rng.permutation(codes[rows])
        group_rows = [rows[shuffled == g] for g in compared]
        v, r = measure_groups(o, np.concatenate(group_rows), np.repeat(np.arange(3), [len(x) for x in group_rows]), 3, macro)
        stat = np.array([gap_statistics(v, r, float("nan"))[k] for k in keys])
        exceed += np.nan_to_num(stat >= obs - 1e-12, nan=0.0)
        exceed_max += bool(np.nanmax(np.where(np.isfinite(stat), stat, -np.inf)) >= np.nanmax(obs) - 1e-12)
    expected_p = {k: (e + 1) / (s.n_permutations + 1) for k, e, ob in zip(keys, exceed, obs) if np.isfinite(ob)}

    gap_p, p_value = permutation_test(o, codes, in_gaps, s, np.random.default_rng(4), observed)
    assert gap_p == pytest.approx(expected_p, abs=1e-12)
    assert p_value == pytest.approx((exceed_max + 1) / (s.n_permutations + 1), abs=1e-12)
    assert 0 < min(gap_p.values()) and max(gap_p.values()) <= 1


def test_batched_auroc_with_repeated_rows_equals_grouped_auroc():
    from mcaudit.plugins.checks.fairness.engine import batched_auroc, grouped_auroc

    o = _outcomes(seed=5)
    rng = np.random.default_rng(6)
    blocks = [rng.integers(0, len(o.labels), 150) for _ in range(5)]  # resamples: rows repeat
    codes = [rng.integers(0, 3, 150) for _ in range(5)]
    keys = np.concatenate([b * 3 + c for b, c in enumerate(codes)])
    batched = batched_auroc(o, np.concatenate(blocks), keys, 15).reshape(5, 3)
    for b in range(5):
        support = np.zeros((3, o.n_classes))
        np.add.at(support, (codes[b], o.labels[blocks[b]]), 1)
        np.testing.assert_allclose(batched[b], grouped_auroc(o, blocks[b], codes[b], 3, support), atol=1e-12)


def test_chunked_bootstrap_equals_the_per_replicate_loop():
    from mcaudit.plugins.checks.fairness.columns import measure_column
    from mcaudit.plugins.checks.fairness.engine import measure_groups
    from mcaudit.plugins.checks.fairness.grouping import Grouping
    from mcaudit.plugins.checks.fairness.inference import bootstrap_columns, resample_chunks
    from mcaudit.plugins.checks.fairness.settings import Settings

    o = _outcomes(seed=7)
    s = Settings(positives=[1], positive_label="", macro=False, min_group_size=10, quantile_bins=4, edges={},
                 intersections=False, n_bootstrap=90, n_permutations=0, alpha=0.05, n_bins=10)
    codes = np.random.default_rng(8).integers(-1, 3, len(o.labels))  # -1: missing values stay out
    other = np.random.default_rng(9).integers(0, 2, len(o.labels))
    columns = [measure_column(o, "a", Grouping(codes, ["x", "y", "z"]), s), measure_column(o, "b", Grouping(other, ["u", "v"]), s)]
    for clusters in (None, np.arange(len(o.labels)) // 3):
        boots = bootstrap_columns(o, columns, s, np.random.default_rng(10), clusters)
        # the loop the chunked version replaced, one replicate and one column at a time
        rng = np.random.default_rng(10)
        replicates = [r for chunk in resample_chunks(len(o.labels), clusters, rng, s.n_bootstrap) for r in chunk]
        assert len(replicates) == 90
        if clusters is not None:  # whole subjects: every drawn subject's three images together
            assert all(np.all(np.bincount(clusters[r]) % 3 == 0) for r in replicates[:5])
        for (values, rates), a in zip(boots, columns):
            for b in (0, 41, 89):
                rows = replicates[b]
                c = a.grouping.codes[rows]
                v, r = measure_groups(o, rows[c >= 0], c[c >= 0], len(a.grouping.names), False)
                np.testing.assert_allclose(values[b], v, atol=1e-12, equal_nan=True)
                np.testing.assert_allclose(rates[b], r, atol=1e-12, equal_nan=True)


def test_max_difference_interval_covers_every_pair():
    from mcaudit.plugins.checks.fairness.inference import max_difference_interval, min_value_interval

    rng = np.random.default_rng(0)
    observed = np.array([0.10, -0.02, 0.05])
    replicates = observed + rng.normal(0, [0.02, 0.05, 0.01], (400, 3))
    lo, hi = max_difference_interval(observed, replicates)
    assert lo <= 0.10 <= hi and lo > 0.0
    # a contrast whose band is wide can carry the upper end even though its point value is small
    assert hi >= 0.02 + 2 * 0.05
    lo, hi = min_value_interval(observed, replicates)
    assert lo < -0.02 < hi


def test_many_groups_read_worst_first_without_a_caveat_per_column():
    """Four columns and their six intersections (as HAM10000's sex, age, site and localization
    give): one caveat per kind, no row of n/a, the most clearly low groups in one table."""
    rng = np.random.default_rng(5)
    labels, probs, site = biased_predictions({"A": 90, "B": 70, "C": 12, "D": 8}, {"A": 0.8, "B": 1.2, "C": 4.0, "D": 3.0}, seed=5)
    n = len(labels)
    groups = {"site": site, "sex": rng.choice(["F", "M"], n), "age": rng.integers(20, 90, n).astype(str),
              "localization": rng.choice(["back", "face", "scalp", "trunk", "neck", "ear", "hand", "foot"], n)}
    ctx = synthetic_context(probs, labels, groups)
    result = run_check(ctx, n_bootstrap=50, n_permutations=20)
    columns = result.details["columns"]
    assert len(columns) == 10
    assert len(result.warnings) <= 3 and any("have fewer than 20 images" in w for w in result.warnings)
    overview = result.tables[0]
    assert not any(cell == "n/a" for row in overview.rows for cell in row if row[1] < 2)
    compared = {name for name, c in columns.items() if sum(g["in_gaps"] for g in c["groups"].values()) >= 2}
    gaps = {t.title.split(":")[0] for t in result.tables if t.title.endswith("gaps between groups")}
    assert gaps == compared and len(compared) < len(columns)
    # the columns with a measured gap first, largest accuracy gap first
    order = [row[0] for row in overview.rows]
    by_gap = sorted(compared, key=lambda c: -result.metrics[f"{c}.accuracy_gap"])
    assert order[:len(compared)] == by_gap
    # independently: every group's Wilson upper bound on its accuracy, from the predictions
    preds = probs.argmax(1)
    upper = []
    for name, column in columns.items():
        values = np.array(["&".join(str(groups[c][i]) for c in name.split("&")) for i in range(n)], dtype=object)
        for group, info in column["groups"].items():
            if "age" in name.split("&"):  # binned into quartiles: its counts are the check's own
                k, m = info["counts"]["accuracy"]
            else:
                rows = values == group
                k, m = int((preds[rows] == labels[rows]).sum()), int(rows.sum())
                assert [k, m] == info["counts"]["accuracy"]
            upper.append((wilson(k, m)[1], k / m, name, group))
    worst = next(t for t in result.tables if t.title == "Lowest-accuracy groups across all columns")
    assert len(worst.rows) == 10
    want = sorted(upper, key=lambda t: (round(t[0], 9), t[1], t[2]))[:10]
    assert [(r[0], r[1]) for r in worst.rows][:3] == [(c, g) for _, _, c, g in want][:3]
    highs = [float(r[4].split(" to ")[1]) for r in worst.rows]
    assert highs == sorted(highs) and highs[-1] <= sorted(t[0] for t in upper)[10] + 1e-3
