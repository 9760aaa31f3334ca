"""The anomaly check: OOD metrics against scikit-learn, known answers, no re-encoding, --ood.
Zero-shot normal/abnormal detection is the abnormality check (tests/test_abnormality.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from mcaudit import InputError
from mcaudit.plugins.formats.image_sets import mcaudit_load_dataset
from mcaudit.metrics import average_precision, fpr_at_tpr, roc_points
from mcaudit.models.adapter import ModelAdapter
from mcaudit.plugins.checks.anomaly import AnomalyCheck
from mcaudit.metrics import delong_interval
from mcaudit.plugins.checks.anomaly.evaluation import choose_then_measure
from mcaudit.plugins.checks.anomaly.scores import SCORES, KnnScorer, MahalanobisScorer, separation
from mcaudit.context import AuditContext
from mcaudit.hook_types import DataRequest
from mcaudit.testing import load_adapter, make_context, phantom_dataset
from mcaudit.testing import derive_status

PLUGIN = "mcaudit.plugins.checks.anomaly"


def params(**given):
    # the quick profile with the 120 generated images per set these tests were sized for, and
    # without the per-score bootstrap unless asked for
    quick = AnomalyCheck.profile_params("quick") | {"n_generated": 120, "n_bootstrap": 0}
    return AnomalyCheck.resolve_params(quick | given)


@pytest.fixture(scope="module")
def demo():
    return load_adapter("demo")


@pytest.fixture(scope="module")
def opener(demo):
    def open_ood(spec: str):
        return mcaudit_load_dataset(spec=spec, request=DataRequest(image_size=demo.image_size, role="ood"))

    return open_ood


@pytest.fixture(scope="module")
def ctx(demo, opener):
    return make_context(demo, phantom_dataset(300, seed=1), open_dataset=opener)


def with_ood(ctx, spec):
    return dataclasses.replace(ctx, options={"ood": spec})


@pytest.fixture(scope="module")
def generated(ctx):
    return AnomalyCheck().run(ctx, params())


def write_noise_npz(path, n, size=64, seed=0):
    # Colour uniform noise: nothing like a grey chest radiograph. Labels 0..8 on purpose:
    # an OOD set's classes need not be the audited ones.
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, test_images=images, test_labels=(np.arange(n) % 9).reshape(-1, 1))
    return path


# -- metrics against outside references -------------------------------------------------


def test_metrics_agree_with_sklearn_and_a_direct_fpr95():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(5, 200))
        is_id = rng.random(n) < 0.5
        if is_id.all() or not is_id.any():
            continue
        # Rounding makes ties, which is where AUROC/AP conventions differ.
        scores = np.round(rng.normal(size=n) + 1.2 * is_id, 1 if trial % 2 else 6)
        sep = separation(scores[is_id], scores[~is_id])
        ordered = np.r_[np.ones(is_id.sum(), bool), np.zeros((~is_id).sum(), bool)]
        both = np.r_[scores[is_id], scores[~is_id]]
        assert sep["auroc"] == pytest.approx(roc_auc_score(ordered, both), abs=1e-12)
        assert sep["aupr_in"] == pytest.approx(average_precision_score(ordered, both), abs=1e-12)
        assert sep["aupr_out"] == pytest.approx(average_precision_score(~ordered, -both), abs=1e-12)
        # Direct: of all thresholds keeping >= 95% of ID, the one letting through the least OOD.
        direct = min(np.mean(both[~ordered] >= t) for t in both if np.mean(both[ordered] >= t) >= 0.95)
        assert sep["fpr95"] == pytest.approx(direct, abs=1e-12)
        fpr, tpr, _ = roc_points(ordered, both)
        ref_fpr, ref_tpr, _ = roc_curve(ordered, both, drop_intermediate=False)
        np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
        np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)


def test_metric_edge_cases():
    assert np.isnan(fpr_at_tpr(np.array([True, True]), np.array([1.0, 2.0])))  # no OOD images
    assert np.isnan(average_precision(np.array([False, False]), np.array([1.0, 2.0])))  # no positives
    assert average_precision(np.array([True, False]), np.array([2.0, 1.0])) == 1.0
    assert fpr_at_tpr(np.array([True, False]), np.array([2.0, 1.0])) == 0.0


# The hand-written Ledoit-Wolf, Mahalanobis and kNN the check used before it took them from
# scikit-learn, kept here as references: the scores must not change with the library.


def hand_written_ledoit_wolf(centred):
    n, p = centred.shape
    emp = centred.T @ centred / n
    mu = np.trace(emp) / p
    delta = (np.sum(emp**2) - 2 * mu * np.trace(emp) + p * mu**2) / p
    fourth = np.sum(np.sum(centred**2, axis=1) ** 2) / n
    beta = min((fourth - np.sum(emp**2)) / (p * n), delta)
    shrinkage = 0.0 if delta == 0 else beta / delta
    return (1 - shrinkage) * emp + shrinkage * mu * np.eye(p), float(shrinkage)


def hand_written_mahalanobis(features, labels, queries):
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    cov, shrinkage = hand_written_ledoit_wolf(features - means[np.searchsorted(classes, labels)])
    precision = np.linalg.inv(cov)
    dists = [np.einsum("ij,jk,ik->i", queries - m, precision, queries - m) for m in means]
    return -np.min(np.stack(dists, axis=1), axis=1), shrinkage


def hand_written_knn(features, k, queries):
    bank = features / np.linalg.norm(features, axis=1, keepdims=True)
    f = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d2 = np.maximum(2.0 - 2.0 * f @ bank.T, 0.0)
    k = min(k, len(bank))
    return -np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1])


@pytest.mark.parametrize("n, p", [(40, 64), (300, 8), (120, 16)])  # fewer images than dimensions, and more
def test_sklearn_scorers_equal_the_hand_written_ones(n, p):
    rng = np.random.default_rng(n)
    # unequal scales per dimension and a class offset: the shrinkage and the class means matter
    labels = np.arange(n) % 3
    feats = rng.normal(size=(n, p)) * rng.random(p) + labels[:, None] * 0.3
    queries = np.r_[rng.normal(size=(25, p)), feats[:5] + 1e-3]  # also points next to fitted ones
    maha = MahalanobisScorer(feats, labels)
    expected, shrinkage = hand_written_mahalanobis(feats, labels, queries)
    assert maha.shrinkage == pytest.approx(shrinkage, abs=1e-12)
    np.testing.assert_allclose(maha(queries), expected, rtol=1e-9, atol=1e-9)
    for k in (1, 5, n + 10):  # k beyond the bank is the farthest fitted feature
        np.testing.assert_allclose(KnnScorer(feats, k)(queries), hand_written_knn(feats, k, queries), atol=1e-7)


def test_hand_written_ledoit_wolf_was_sklearns():
    # the reference above is itself Ledoit-Wolf as scikit-learn defines it, so the two tests
    # together pin the scores to the published estimator, not to one implementation's quirks
    rng = np.random.default_rng(1)
    for n, p in [(40, 64), (300, 8)]:
        x = rng.normal(size=(n, p)) * rng.random(p)
        x -= x.mean(axis=0)
        cov, shrinkage = hand_written_ledoit_wolf(x)
        ref = LedoitWolf(assume_centered=True).fit(x)
        assert shrinkage == pytest.approx(ref.shrinkage_, abs=1e-10)
        np.testing.assert_allclose(cov, ref.covariance_, atol=1e-12)


# -- known answers ------------------------------------------------------------------------


class ColourStatsAdapter(ModelAdapter):
    """A model whose features are colour statistics: grey images and colour images are
    trivially apart in its feature space, so the known answer is perfect separation."""

    def __init__(self):
        super().__init__(spec="colour-stats", image_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)

    def _encode_normalized_image(self, images):
        r, g, b = images[:, 0], images[:, 1], images[:, 2]
        stats = [images.mean(dim=(1, 2, 3)), images.std(dim=(1, 2, 3)), (r - g).abs().mean(dim=(1, 2)),
                 (g - b).abs().mean(dim=(1, 2)), (r - b).abs().mean(dim=(1, 2))]
        return torch.stack(stats, dim=1) + 0.5  # offset: keeps the L2 normalisation away from zero

    def _encode_prompts(self, prompts):
        gen = torch.Generator().manual_seed(len(prompts))
        return torch.randn((len(prompts), 5), generator=gen)

    @property
    def logit_scale(self):
        return 10.0


def test_trivially_separable_ood_gives_auroc_near_one(tmp_path):
    model = ColourStatsAdapter()
    dataset = phantom_dataset(120, seed=1, image_size=model.image_size)

    def open_ood(spec):
        return mcaudit_load_dataset(spec=spec, request=DataRequest(image_size=model.image_size, role="ood"))

    ctx = make_context(model, dataset, open_dataset=open_ood)
    spec = str(write_noise_npz(tmp_path / "noise.npz", 40, size=32))
    r = AnomalyCheck().run(with_ood(ctx, spec), params())
    assert r.status == "ok" and not r.warnings and not r.findings
    assert r.metrics["ood.n_images"] == 40
    assert "near_ood.best_auroc" not in r.metrics  # a given OOD set replaces the generated ones
    assert r.not_evaluated["near_ood.best_auroc"] == "a given --ood set replaces the generated near- and far-OOD sets"
    # perfect separation of 30 held-out audited against 20 OOD images: the interval does not
    # collapse to a point but is the exact one of 20 independent pairs
    assert r.metrics["ood.best_auroc"] == 1.0 and r.n["ood.best_auroc"] == 30 + 20
    from scipy.stats import binomtest

    assert r.intervals["ood.best_auroc"] == pytest.approx(
        tuple(binomtest(20, 20).proportion_ci(method="exact")), abs=1e-9)
    for score in ("mahalanobis", "knn"):
        assert r.metrics[f"ood.{score}.auroc"] == 1.0
        assert r.metrics[f"ood.{score}.fpr95"] == 0.0
        assert r.metrics[f"ood.{score}.aupr_in"] == r.metrics[f"ood.{score}.aupr_out"] == 1.0


def test_noise_images_are_detected_by_the_demo_model(ctx, tmp_path, monkeypatch, mcaudit_encoder_calls):
    spec = str(write_noise_npz(tmp_path / "noise.npz", 60))
    r = AnomalyCheck().run(with_ood(ctx, spec), params())
    assert sum(mcaudit_encoder_calls) == 60  # the OOD images, once; the 300 audited images not again
    assert r.metrics["ood.best_auroc"] >= 0.98
    assert r.details["ood.best_score"] == "mahalanobis"
    assert r.metrics["ood.mahalanobis.fpr95"] <= 0.15


def test_identically_distributed_ood_gives_auroc_near_half(ctx):
    # Held-out ID: 150 phantoms of seed 1; "OOD": 200 phantoms of seed 2, the same generator.
    # Under exchangeability the AUROC's standard error is sqrt((n1 + n2 + 1) / (12 n1 n2)) =
    # 0.031; 0.12 is nearly four standard errors, so a chance result passes for all six scores
    # while any real shift (the far-OOD sets score >= 0.8) fails.
    r = AnomalyCheck().run(with_ood(ctx, "phantom:n=200,seed=2"), params())
    for score in SCORES:
        assert abs(r.metrics[f"ood.{score}.auroc"] - 0.5) <= 0.12, (score, r.metrics[f"ood.{score}.auroc"])
    assert r.metrics["ood.best_fpr95"] >= 0.75  # at 95% TPR most same-distribution images pass


def test_generated_sets_give_non_trivial_results_on_the_demo(generated, ctx):
    m = generated.metrics
    assert m["near_ood.n_images"] == m["far_ood.n_images"] == 120
    assert m["far_ood.best_auroc"] >= 0.85
    assert 0.6 <= m["near_ood.best_auroc"] < 0.99
    assert m["n_id_eval"] == 150
    # Feature-space scores beat the logit-based ones on images of another kind.
    assert m["far_ood.mahalanobis.auroc"] > m["far_ood.msp.auroc"] + 0.2
    # With two classes the top softmax probability is monotone in the logit gap whatever
    # the temperature, so MSP and MCM rank images identically.
    for s in ("near_ood", "far_ood"):
        assert m[f"{s}.mcm.auroc"] == pytest.approx(m[f"{s}.msp.auroc"], abs=1e-12)
    kinds = {t.title: t.rows for t in generated.tables}
    noise_row = next(r for r in kinds["near-OOD (corrupted audited images): AUROC by kind of image"] if r[0] == "heavy noise")
    assert noise_row[1] == 30 and max(noise_row[2:]) >= 0.85
    assert len(generated.figures) == 5  # two ROC, two histograms, examples
    assert any("contrast collapse" in w for w in generated.warnings)  # the demo is overconfident there
    titles = [f.title for f in generated.figures]
    assert any(t.startswith("ROC curves") for t in titles) and any("Examples" in t for t in titles)
    n = len(ctx.forward)
    assert all(len(col) == n for col in generated.per_image.values())
    assert sum(v is None for v in generated.per_image["knn"]) == n - 150


def test_same_seed_same_metrics_and_no_audited_image_encoded(ctx, monkeypatch, mcaudit_encoder_calls):
    first, again = (AnomalyCheck().run(ctx, params(n_generated=16, n_bootstrap=20)) for _ in range(2))
    assert sum(mcaudit_encoder_calls) == 2 * (16 + 16)  # corrupted copies and far-OOD images, not the 300 audited
    assert first.metrics == again.metrics and first.intervals == again.intervals
    assert first.intervals  # bootstrap intervals are reported when asked for


# -- command line ---------------------------------------------------------------------------


def test_cli_ood_csv_manifest(tmp_path, mcaudit_run, monkeypatch, mcaudit_encoder_calls):
    from PIL import Image

    folder = tmp_path / "ood"
    folder.mkdir()
    rng = np.random.default_rng(5)
    lines = ["path,label"]
    for i in range(24):
        img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"noise{i}.png")
        lines.append(f"noise{i}.png,screenshot")  # a label that is no audited class
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = mcaudit_run("-p", PLUGIN, "--checks", "anomaly", "--data", "phantom:n=120", "--model", "demo",
                      "--ood", str(folder / "manifest.csv"), "--set", "anomaly.n_bootstrap=20")
    assert out.exit_code == 0, out.output
    assert sum(mcaudit_encoder_calls) == 120 + 24  # one shared pass plus the OOD images, once
    check = out.results["checks"]["anomaly"]
    assert check["execution"] == "completed"
    assert check["metrics"]["ood.n_images"] == 24
    assert check["metrics"]["ood.best_auroc"] >= 0.95
    assert "ood.knn.auroc" in check["intervals"]
    assert not any(k.startswith("zero_shot") for k in check["metrics"])  # the abnormality check's now
    html = out.html
    assert "ROC curves: audited images vs user OOD set" in html and "FPR at 95% TPR" in html


@pytest.mark.parametrize("n_ood", [30, 6])
def test_cli_ood_medmnist_npz_and_default_gate(tmp_path, mcaudit_run, n_ood):
    spec = write_noise_npz(tmp_path / "othermnist.npz", n_ood)
    out = mcaudit_run("-p", PLUGIN, "--checks", "anomaly", "--data", "phantom:n=80", "--model", "demo",
                      "--ood", str(spec), "--set", "anomaly.n_bootstrap=0", "--gate")
    gate = out.results["gate"]
    outcomes = {g["name"]: g for g in gate["results"]}
    assert sorted(outcomes) == ["anomaly.far_ood.best_auroc", "anomaly.near_ood.best_auroc", "anomaly.ood.best_auroc"]
    # near/far-OOD thresholds are not evaluated, with the reason: a given OOD set replaces them
    for name in ("anomaly.far_ood.best_auroc", "anomaly.near_ood.best_auroc"):
        assert outcomes[name]["status"] == "not_evaluated"
        assert "replaces the generated" in outcomes[name]["sentence"]
    ood = outcomes["anomaly.ood.best_auroc"]
    assert ood["interval"] is not None and ood["n"] == 40 // 2 + n_ood - n_ood // 2  # the measured halves
    # decided on the interval of the measured half, not on the point value
    lo, hi = ood["interval"]
    assert lo <= ood["value"] <= hi and (ood["value"] >= 0.9 or n_ood == 6), ood["sentence"]
    assert ood["status"] == ("pass" if lo >= 0.9 else "inconclusive" if hi >= 0.9 else "fail"), ood["sentence"]
    assert gate["passed"] is (ood["status"] == "pass") and out.exit_code == (0 if gate["passed"] else 1)
    if n_ood == 6:
        # three measured OOD images cannot show the bound is met, however well they separate
        # (even a perfect separation is 0.29 to 1): a gated run does not pass on them
        assert ood["status"] == "inconclusive" and lo < 0.8 and out.exit_code == 1, ood["sentence"]


@pytest.mark.parametrize("setting", ["anomaly.fit_fraction=true", "anomaly.fit_fraction=1.5", "anomaly.knn_k=0"])
def test_cli_bad_parameter_is_an_input_error(tmp_path, mcaudit_run, setting):
    out = mcaudit_run("-p", PLUGIN, "--checks", "anomaly", "--set", setting)
    assert out.exit_code == 2 and setting.split("=")[0] in out.output


@pytest.mark.parametrize(
    "given, fragment",
    [
        ({"fit_fraction": 1.0}, "fit_fraction"),
        ({"mcm_temperature": 0.0}, "mcm_temperature"),
        ({"knn_k": 0}, "knn_k"),
        ({"n_generated": 0}, "n_generated"),
        ({"fit_fraction": 0.0}, "fit_fraction"),
        ({"n_bootstrap": -1}, "n_bootstrap"),
    ],
)
def test_bad_parameters_raise_input_errors_before_the_run(given, fragment):
    # declared bounds: resolving the parameters refuses them, before any model is loaded
    with pytest.raises(InputError, match=f"^anomaly\\.{fragment}: "):
        params(**given)


def test_best_score_is_chosen_on_one_half_and_measured_on_the_other():
    # Planted: "msp" separates perfectly on the half used for choosing and not at all on the
    # other; "knn" separates moderately on both. Choosing and measuring on the same images
    # would report a flattering AUROC; the held-out half shows msp's true chance level.
    rng = np.random.default_rng(0)
    n_id, n_ood = 200, 160
    context = dataclasses.make_dataclass("Ctx", [("seed", int)])(seed=3)
    context.rng = lambda name: AuditContext.rng(context, name)
    choose = context.rng("anomaly:choose:ood")
    id_perm, ood_perm = choose.permutation(n_id), choose.permutation(n_ood)
    id_a, ood_a = id_perm[: n_id // 2], ood_perm[: n_ood // 2]
    id_scores = {name: rng.normal(0, 1, n_id) for name in SCORES}
    ood_scores = {name: rng.normal(0, 1, n_ood) for name in SCORES}
    id_scores["msp"][id_a] += 10.0
    id_scores["knn"] += 1.2
    name, measured, halves, (id_measured, ood_measured) = choose_then_measure(context, "ood", id_scores, ood_scores)
    assert name == "msp"
    assert halves == {"choose_id": 100, "choose_ood": 80, "measure_id": 100, "measure_ood": 80}
    id_b, ood_b = id_perm[n_id // 2 :], ood_perm[n_ood // 2 :]
    assert np.array_equal(id_measured, id_b) and np.array_equal(ood_measured, ood_b)
    truth = np.r_[np.ones(100), np.zeros(80)]
    expected = roc_auc_score(truth, np.r_[id_scores["msp"][id_b], ood_scores["msp"][ood_b]])
    assert measured["auroc"] == pytest.approx(expected, abs=1e-12)
    assert abs(measured["auroc"] - 0.5) < 0.15
    in_sample = roc_auc_score(np.r_[np.ones(n_id), np.zeros(n_ood)], np.r_[id_scores["msp"], ood_scores["msp"]])
    assert in_sample > 0.7  # what choosing and measuring on the same images would have said


def test_identically_distributed_ood_is_not_flagged_by_the_best_score(ctx):
    r = AnomalyCheck().run(with_ood(ctx, "phantom:n=200,seed=2"), params())
    assert r.details["ood.best_score_halves"] == {"choose_id": 75, "choose_ood": 100, "measure_id": 75, "measure_ood": 100}
    # about 0.044 standard error on the measured half: 0.15 is over three of them
    assert abs(r.metrics["ood.best_auroc"] - 0.5) <= 0.15


# -- honest numbers: not evaluated with a reason, intervals, findings -----------------------


def test_without_ood_the_ood_thresholds_are_not_evaluated_with_the_reason(generated):
    assert generated.not_evaluated["ood.best_auroc"] == "no --ood set was given"
    assert "near_ood.best_auroc" not in generated.not_evaluated
    status, _, outcomes, _ = derive_status(AnomalyCheck, generated)
    ood = outcomes["anomaly.ood.best_auroc"]
    assert ood["status"] == "not_evaluated" and "no --ood set was given" in ood["sentence"]
    for name in ("anomaly.near_ood.best_auroc", "anomaly.far_ood.best_auroc"):
        o = outcomes[name]
        assert o["status"] != "not_evaluated" and o["interval"] is not None and o["n"], o
        assert o["interval"][0] <= o["value"] <= o["interval"][1]
    assert status != "pass" or all(o["status"] in ("pass", "not_evaluated") for o in outcomes.values())


def test_delong_interval_agrees_with_the_pairwise_definition():
    from scipy.stats import norm

    rng = np.random.default_rng(4)
    for m, k in [(12, 30), (80, 50)]:
        x = np.round(rng.normal(0.8, 1, m), 1)  # rounding makes ties, which count one half
        y = np.round(rng.normal(0, 1, k), 1)
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        auc = psi.mean()
        var = psi.mean(axis=1).var(ddof=1) / m + psi.mean(axis=0).var(ddof=1) / k
        half = norm.ppf(0.975) * np.sqrt(var)
        positive = np.r_[np.ones(m, bool), np.zeros(k, bool)]
        assert delong_interval(positive, np.r_[x, y]) == pytest.approx((auc - half, min(1.0, auc + half)), abs=1e-12)
        assert auc == pytest.approx(roc_auc_score(positive, np.r_[x, y]), abs=1e-12)


def test_delong_interval_covers_the_true_auroc():
    """Two normal samples whose true AUROC is Phi(d / sqrt(2)): 1,000 simulated studies of
    60 and 40 images, and at least 93% of the 95% intervals contain the truth."""
    from scipy.stats import norm

    rng = np.random.default_rng(5)
    d = 1.0
    truth = norm.cdf(d / np.sqrt(2))
    positive = np.r_[np.ones(60, bool), np.zeros(40, bool)]
    hits = [lo <= truth <= hi for lo, hi in (
        delong_interval(positive, np.r_[rng.normal(d, 1, 60), rng.normal(0, 1, 40)]) for _ in range(1000))]
    assert np.mean(hits) >= 0.93, np.mean(hits)


def test_overconfidence_on_a_corruption_is_a_warn_finding(generated):
    # the demo model is more confident on contrast-collapsed images than on its own data
    messages = [f.message for f in generated.findings]
    assert any("'contrast collapse'" in msg and "95% CI" in msg for msg in messages), messages
    assert all(f.status == "warn" for f in generated.findings)
    status, _, outcomes, _ = derive_status(AnomalyCheck, generated)
    assert status != "pass"


def test_profiles_and_threshold_reasons():
    standard = AnomalyCheck.resolve_params(AnomalyCheck.profile_params("standard"))
    assert standard == AnomalyCheck.resolve_params({})
    assert AnomalyCheck.profiles["quick"]["n_generated"] < standard["n_generated"] < AnomalyCheck.profiles["thorough"]["n_generated"]
    assert set(AnomalyCheck.threshold_reasons) == set(AnomalyCheck.default_thresholds)
    assert not any("zero_shot" in k or "normal" in k for k in list(AnomalyCheck.params) + list(AnomalyCheck.metrics))
