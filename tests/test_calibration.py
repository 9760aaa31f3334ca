"""Calibration check: metrics against torchmetrics, netcal, scikit-learn and torch; temperature
scaling recovers a planted temperature; no extra image-encoder pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcaudit import InputError
from mcaudit.metrics import equal_width_edges, expected_calibration_error
from mcaudit.plugins.checks.calibration import CalibrationCheck, debiased_ece_rows, fit_temperature
from mcaudit.testing import run_cli

SMALL = ["--model", "demo", "--data", "phantom:n=64", "--batch-size", "16", "--group", "site"]


def synthetic_context(logits, labels, groups=None, seed=0):
    """An AuditContext around given logits, as the shared forward pass would produce it."""
    from mcaudit.context import AuditContext
    from mcaudit.data.dataset import AuditDataset, Record
    from mcaudit.forward import ForwardOutputs
    from mcaudit.prompts import PromptSet

    n, k = logits.shape
    groups = groups or {}
    records = [Record(f"img{i}", int(labels[i]), {c: str(v[i]) for c, v in groups.items()}) for i in range(n)]
    dataset = AuditDataset(spec="synthetic", records=records, classes=[f"class{j}" for j in range(k)], image_size=(8, 8),
                           fingerprint="synthetic", format_name="synthetic", group_columns=tuple(groups))
    forward = ForwardOutputs(indices=np.arange(n), labels=np.asarray(labels, dtype=np.int64), image_features=torch.zeros(n, 4),
                             logits=torch.as_tensor(np.asarray(logits), dtype=torch.float32), grey=np.ones(n, dtype=bool))
    return AuditContext(model=None, dataset=dataset, prompts=PromptSet(), class_features=torch.zeros(k, 4),
                        forward=forward, device=torch.device("cpu"), seed=seed)


def calibrated_logits(n, k, seed, spread=2.0):
    """Logits whose softmax is the true class distribution: labels are drawn from it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, spread, (n, k))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return z, labels


def run_check(ctx, **params):
    return CalibrationCheck().run(ctx, CalibrationCheck.resolve_params(params))


def verdict(result, check=CalibrationCheck):
    """The status the host gives ``result`` under the check's default thresholds, and the outcomes."""
    from mcaudit.gating import apply_gate, parse_threshold
    from mcaudit.results import result_entry

    entry = result_entry(result)
    thresholds = [parse_threshold(f"{check.name}.{m}", spec, "default") for m, spec in check.default_thresholds.items()]
    gate = apply_gate({"checks": {check.name: entry}}, thresholds, gated=False)
    return entry["status"], gate["results"]


@pytest.mark.parametrize("k", [2, 4])
def test_metrics_agree_with_torchmetrics_netcal_sklearn(k):
    from netcal.metrics import ECE, MCE
    from sklearn.metrics import brier_score_loss
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    z, labels = calibrated_logits(600, k, seed=k, spread=1.5)
    ctx = synthetic_context(z * 1.7, labels)  # overconfident, so that the errors are not ~0
    result = run_check(ctx, n_bootstrap=0)
    m = result.metrics
    probs = ctx.forward.probs  # the float64 probabilities the check saw
    assert probs.max() < 1.0  # torchmetrics gives a confidence of exactly 1.0 a bin of its own
    p_t, y_t = torch.from_numpy(probs), torch.from_numpy(labels)

    assert m["ece_plugin"] == pytest.approx(float(multiclass_calibration_error(p_t, y_t, k, n_bins=15, norm="l1")), abs=1e-6)
    assert m["mce"] == pytest.approx(float(multiclass_calibration_error(p_t, y_t, k, n_bins=15, norm="max")), abs=1e-6)
    # netcal's detection mode takes (confidence, correct) as they are: the top-label definition
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(int)
    assert m["ece_plugin"] == pytest.approx(ECE(15, detection=True).measure(conf, correct), abs=1e-6)
    assert m["mce"] == pytest.approx(MCE(15, detection=True).measure(conf, correct), abs=1e-6)
    assert m["ece_equal_mass"] == pytest.approx(ECE(15, equal_intervals=False, detection=True).measure(conf, correct), abs=1e-6)
    if k == 2:
        # netcal's and torchmetrics' binary ECE bin p(second class) instead: our class-1 ECE term
        class1 = expected_calibration_error(probs[:, 1], labels == 1, equal_width_edges(15))
        assert ECE(15).measure(probs, labels) == pytest.approx(class1, abs=1e-6)
        assert float(binary_calibration_error(p_t[:, 1].contiguous(), y_t, n_bins=15)) == pytest.approx(class1, abs=1e-6)
    else:
        assert m["ece_plugin"] == pytest.approx(ECE(15).measure(probs, labels), abs=1e-6)
    # the debiased values never exceed the plain ones (each bin's |d| shrinks) and, on 600
    # images of an overconfident model, stay close to them
    classwise = np.mean([float(binary_calibration_error(p_t[:, j].contiguous(), (y_t == j).long(), n_bins=15)) for j in range(k)])
    assert m["ece"] <= m["ece_plugin"] and m["ece"] == pytest.approx(m["ece_plugin"], abs=0.03)
    assert m["classwise_ece"] <= classwise + 1e-12 and m["classwise_ece"] == pytest.approx(classwise, abs=0.03)
    assert m["brier"] == pytest.approx(brier_score_loss(labels, probs, labels=list(range(k))), abs=1e-6)
    nll = torch.nn.functional.cross_entropy(ctx.forward.logits.double(), y_t)
    assert m["nll"] == pytest.approx(float(nll), abs=1e-6)
    assert m["confidence"] == pytest.approx(probs.max(1).mean(), abs=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels), abs=1e-12)
    assert m["overconfidence"] > 0.02 and "is higher than accuracy" in result.summary
    assert "ece" not in result.intervals  # n_bootstrap=0 turns the intervals off


def test_debiased_ece_equals_a_bin_by_bin_loop():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 40)
    conf[:3] = [0.52, 0.52, 0.99]  # a bin of one image (0.99) and ties
    ok = (rng.random(40) < conf - 0.1).astype(float)
    edges = equal_width_edges(10)
    total = 0.0
    for b in range(10):
        inside = (conf >= edges[b]) & ((conf < edges[b + 1]) if b < 9 else (conf <= 1.0))
        d = ok[inside] - conf[inside]
        if len(d) == 0:
            continue
        c = conf[inside].mean()
        v = max(d.var(ddof=1) if len(d) > 1 else 0.0, c * (1 - c)) / len(d)
        total += len(d) * np.sqrt(max(0.0, d.mean() ** 2 - v))
    assert debiased_ece_rows(conf, ok, edges)[0] == pytest.approx(total / 40, abs=1e-12)
    # rows are independent samples
    both = debiased_ece_rows(np.stack([conf, conf[::-1]]), np.stack([ok, ok[::-1]]), edges)
    assert both == pytest.approx([total / 40, total / 40], abs=1e-12)


def test_small_calibrated_sample_is_not_failed_where_the_plain_ece_would_be():
    z, labels = calibrated_logits(60, 2, seed=2)
    result = run_check(synthetic_context(z, labels), n_bootstrap=200)
    m = result.metrics
    assert m["ece_plugin"] > 0.1  # the plain binned ECE of 60 calibrated images reads as miscalibrated
    status, outcomes = verdict(result)
    assert status in ("pass", "inconclusive") and status != "fail"
    assert outcomes[0]["n"] == 60 and outcomes[0]["interval"] is not None


@pytest.mark.parametrize("true_t", [2.5, 0.5])
def test_temperature_scaling_recovers_planted_temperature(true_t):
    z, labels = calibrated_logits(4000, 3, seed=7)
    # the model's logits are the calibrated ones multiplied by T, i.e. calibrated = logits / T
    result = run_check(synthetic_context(z * true_t, labels), n_bootstrap=0, calibration_fraction=0.5)
    m = result.metrics
    assert m["temperature"] == pytest.approx(true_t, rel=0.05)
    assert m["ece_after_scaling"] < m["ece_before_scaling"]
    assert m["nll_after_scaling"] < m["nll_before_scaling"]
    assert m["n_heldout"] == 2000
    # the fitted T minimises the NLL: a fine grid search finds nothing better
    grid = np.exp(np.linspace(np.log(true_t) - 0.3, np.log(true_t) + 0.3, 601))
    direct = fit_temperature(z * true_t, labels)
    from mcaudit.metrics import negative_log_likelihood

    best = grid[np.argmin([negative_log_likelihood(z * true_t / t, labels) for t in grid])]
    assert direct == pytest.approx(best, rel=2e-3)


def test_planted_temperature_fails_calibrated_model_passes():
    z, labels = calibrated_logits(3000, 2, seed=3)
    good = run_check(synthetic_context(z, labels), n_bootstrap=100)
    bad = run_check(synthetic_context(z * 4, labels), n_bootstrap=100)  # logits scaled: overconfident
    assert good.metrics["ece"] < 0.03 and good.intervals["ece"][1] < 0.1
    assert good.metrics["temperature"] == pytest.approx(1.0, rel=0.08)
    assert bad.metrics["ece"] > 0.1 and bad.intervals["ece"][0] > 0.1
    assert bad.intervals["ece"][0] <= bad.metrics["ece"] <= bad.intervals["ece"][1]
    good_status, _ = verdict(good)
    bad_status, outcomes = verdict(bad)
    assert good_status == "pass" and bad_status == "fail"
    assert outcomes[0]["name"] == "calibration.ece" and outcomes[0]["n"] == 3000
    # the summary states numbers, never a judgement that could contradict the status
    for r in (good, bad):
        assert "well calibrated" not in r.summary and "95% CI" in r.summary


def test_split_is_stratified_seeded_and_deterministic():
    z, labels = calibrated_logits(300, 3, seed=5)
    a = run_check(synthetic_context(z * 2, labels), n_bootstrap=30, split_seed=1)
    b = run_check(synthetic_context(z * 2, labels), n_bootstrap=30, split_seed=1)
    c = run_check(synthetic_context(z * 2, labels), n_bootstrap=30, split_seed=2)
    assert a.metrics == b.metrics and a.intervals == b.intervals
    assert a.metrics["temperature"] != c.metrics["temperature"]
    assert a.metrics["n_heldout"] == 150


def test_reliability_table_and_figures():
    z, labels = calibrated_logits(200, 2, seed=1)
    result = run_check(synthetic_context(z * 3, labels), n_bootstrap=20, n_bins=10)
    bins = next(t for t in result.tables if t.title.startswith("Reliability"))
    assert sum(row[1] for row in bins.rows) == 200
    assert all(np.isnan(row[2]) for row in bins.rows if row[1] == 0)  # empty bins stay empty (null in results.json)
    assert [f.title for f in result.figures] == ["Reliability diagram", "Confidence histogram", "Temperature scaling on held-out images"]
    assert all(f.png.startswith(b"\x89PNG") for f in result.figures)
    assert len(result.per_image["confidence"]) == 200 and len(result.per_image["calibrated_confidence"]) == 200


@pytest.mark.parametrize("params", [{"calibration_fraction": 1.0}, {"calibration_fraction": 0.0}, {"n_bins": 1}])
def test_bad_parameters_are_input_errors(params):
    z, labels = calibrated_logits(50, 2, seed=1)
    with pytest.raises(InputError, match="calibration"):
        CalibrationCheck.resolve_params(params)  # before the model loads


def test_tiny_split_skips_temperature_with_warning():
    z, labels = calibrated_logits(15, 2, seed=1)
    result = run_check(synthetic_context(z, labels), n_bootstrap=0)
    assert "temperature" not in result.metrics and any("temperature scaling skipped" in w for w in result.warnings)


def test_no_extra_image_encoder_pass_and_report_sections(tmp_path, mcaudit_encoder_calls):
    calls = mcaudit_encoder_calls
    alone = run_cli(["run", "--quiet", *SMALL, "--checks", "performance"], tmp_path / "a")
    assert alone.exit_code == 0, alone.output
    alone_calls = list(calls)
    calls.clear()
    both = run_cli(["run", "--quiet", *SMALL, "-p", "mcaudit.plugins.checks.calibration", "-p", "mcaudit.plugins.checks.fairness",
                    "--checks", "performance,calibration,fairness", "--set", "fairness.n_permutations=50",
                    "--set", "fairness.n_bootstrap=20", "--set", "calibration.n_bootstrap=20"], tmp_path / "b")
    assert both.exit_code == 0, both.output
    assert calls == alone_calls and sum(calls) == 64  # one pass over the images, as performance alone
    checks = both.results["checks"]
    assert checks["calibration"]["execution"] == "completed" and checks["fairness"]["execution"] == "completed"
    for name in ("calibration", "fairness"):
        assert checks[name]["status"] in ("pass", "warn", "fail", "inconclusive", "not_evaluated"), name
    # the verdict and the numbers behind it agree: ece <= 0.1 passes only if its whole interval does
    lo, hi = checks["calibration"]["intervals"]["ece"]
    assert (checks["calibration"]["status"] == "pass") == (hi <= 0.1)
    assert "ece" in checks["calibration"]["intervals"] and checks["calibration"]["sample_size"] == 64
    html = both.html
    assert 'id="check-calibration"' in html and "Reliability diagram" in html and "Temperature scaling" in html


def test_profiles_and_threshold_reasons():
    assert set(CalibrationCheck.profiles) == {"quick", "standard", "thorough"}
    assert CalibrationCheck.profiles["standard"]["n_bootstrap"] == CalibrationCheck.params["n_bootstrap"].default
    assert set(CalibrationCheck.threshold_reasons) == set(CalibrationCheck.default_thresholds)
    with pytest.raises(InputError, match="calibration.n_bootstrap"):
        CalibrationCheck.resolve_params({"n_bootstrap": -1})


def test_subject_ids_make_a_patient_level_bootstrap():
    """Ten copies of each patient's image are one observation, not ten: the subject bootstrap
    must give a wider ECE interval than pretending the copies are independent."""
    z, labels = calibrated_logits(80, 2, seed=4)
    z, labels = np.repeat(z * 2, 10, axis=0), np.repeat(labels, 10)
    plain = synthetic_context(z, labels)
    by_subject = synthetic_context(z, labels)
    for i, record in enumerate(by_subject.dataset.records):
        record.subject = f"patient{i // 10}"
    a = run_check(plain, n_bootstrap=200).intervals["ece"]
    b = run_check(by_subject, n_bootstrap=200).intervals["ece"]
    assert (b[1] - b[0]) > 1.8 * (a[1] - a[0])
