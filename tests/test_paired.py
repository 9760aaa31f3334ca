"""Paired statistics (mcaudit.paired): known answers, cross-checks against statsmodels and an
independent DeLong written here from its pairwise definition, and coverage simulated from
populations whose true differences are known. ``python tests/test_paired.py`` prints the
coverage figures docs/statistics.md quotes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binom, norm

from mcaudit.paired import (
    accuracy_difference,
    auroc_difference,
    compare_predictions,
    holm,
    mcnemar_p,
    newcombe_interval,
    paired_bootstrap,
    with_holm,
)

DRAWS = 2000
NOMINAL_FLOOR = 0.93


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def population(rng, n, k=2, separation=1.5):
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + separation * np.eye(k)[labels]
    return labels, logits


def per_image_nll(probs_and_labels):
    probs, labels = probs_and_labels[..., :-1], probs_and_labels[..., -1].astype(int)
    return -np.log(np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]).mean(axis=-1)


# --- known answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_a_model_against_an_exact_copy_of_itself_differs_by_nothing(k):
    rng = np.random.default_rng(0)
    labels, logits = population(rng, 300, k)
    probs = softmax(logits)
    found = compare_predictions(labels, probs, probs.copy())
    rows = np.c_[probs, labels]
    found.append(paired_bootstrap(per_image_nll, rows, rows.copy(), rng, metric="nll", n_boot=200, batched=True,
                                  higher_is_better=False))
    for c in found:
        assert c.difference == 0, c
        assert c.interval[0] <= 0 <= c.interval[1], c
        assert c.better is None and not c.excludes_zero
        assert c.p_value == 1.0
    json.dumps([c.to_dict() for c in found])


def test_a_copy_made_worse_on_purpose_is_worse_only_where_it_was_damaged():
    rng = np.random.default_rng(1)
    labels, logits = population(rng, 400, 2, separation=2.0)
    noisy = logits + rng.normal(scale=1.5, size=logits.shape)  # noisy weights: worse ranking and accuracy
    for c in compare_predictions(labels, softmax(logits), softmax(noisy)):
        assert c.difference > 0 and c.p_value < 0.05 and c.p_adjusted < 0.05
        assert c.better == "a", c
    hot = softmax(16.0 * logits)  # a hotter logit scale: same ranking and answers, worse calibration
    same = compare_predictions(labels, softmax(logits), hot)
    # same answers; the AUROC moves only where float probabilities saturate at 1 and tie
    assert [c.difference for c in same] == pytest.approx([0.0, 0.0], abs=0.005)
    assert same[0].difference == 0 and same[0].p_value == 1.0
    assert all(c.better is None for c in same)
    nll = paired_bootstrap(per_image_nll, np.c_[softmax(logits), labels], np.c_[hot, labels], rng, metric="nll",
                           n_boot=500, batched=True, higher_is_better=False)
    assert nll.difference < 0 and nll.p_value < 0.05 and nll.better == "a"


def test_the_interval_decides_better_and_an_adjusted_p_value_can_withdraw_it():
    # 60 both right, 16 only A, 4 only B, 20 both wrong
    correct_a = np.r_[np.ones(76), np.zeros(24)].astype(bool)
    correct_b = np.r_[np.ones(60), np.zeros(16), np.ones(4), np.zeros(20)].astype(bool)
    one = accuracy_difference(correct_a, correct_b)
    assert one.excludes_zero and one.p_value < 0.05 and one.better == "a"
    reversed_ = accuracy_difference(correct_b, correct_a)
    assert reversed_.better == "b" and reversed_.difference == pytest.approx(-one.difference)
    crowded = with_holm([one] * 20)  # twenty such comparisons at once
    assert crowded[0].p_adjusted > 0.05 and crowded[0].better is None


# --- cross-checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (3, 0), (12, 5), (5, 12), (40, 31), (7, 7), (150, 120)])
def test_mcnemar_matches_statsmodels(only_a, only_b):
    from statsmodels.stats.contingency_tables import mcnemar

    table = np.array([[50, only_a], [only_b, 20]])
    exact = mcnemar(table, exact=True).pvalue
    assert mcnemar_p(only_a, only_b, mid_p=False) == pytest.approx(exact, abs=1e-12)
    if only_a != only_b:  # mid-p: the exact p-value less the probability of the observed table
        low = min(only_a, only_b)
        assert mcnemar_p(only_a, only_b) == pytest.approx(exact - binom.pmf(low, only_a + only_b, 0.5), abs=1e-12)
    else:
        assert mcnemar_p(only_a, only_b) == 1.0


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(2)
    for _ in range(20):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 12))
        assert holm(p) == pytest.approx(multipletests(p, method="holm")[1], abs=1e-12)
    assert np.isnan(holm([0.01, np.nan])[1]) and holm([0.01, np.nan])[0] == 0.01


def reference_delong(positive, scores_a, scores_b):
    """DeLong et al. (1988) from its pairwise definition: psi(x, y) = 1, 1/2, 0 as the
    positive's score is above, equal to, below the negative's; the components are each
    positive's and each negative's mean psi, and their covariance matrices over the groups."""
    components = []
    for s in (scores_a, scores_b):
        x, y = s[positive], s[~positive]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        components.append((psi.mean(axis=1), psi.mean(axis=0)))
    v10 = np.stack([c[0] for c in components])
    v01 = np.stack([c[1] for c in components])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    aucs = v10.mean(axis=1)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (aucs[0] - aucs[1]) / np.sqrt(variance)
    return aucs, variance, 2 * norm.sf(abs(z))


def test_delong_matches_an_independent_pairwise_computation():
    rng = np.random.default_rng(3)
    for n, rounding in [(60, None), (250, None), (120, 1)]:
        labels = rng.integers(0, 2, n)
        shared = rng.normal(size=n)
        a = 1.2 * labels + shared + 0.5 * rng.normal(size=n)
        b = 0.8 * labels + shared + 0.9 * rng.normal(size=n)
        if rounding is not None:  # ties within and across the groups
            a, b = np.round(a, rounding), np.round(b, rounding)
        aucs, variance, p = reference_delong(labels == 1, a, b)
        found = auroc_difference(labels, a, b)
        assert (found.value_a, found.value_b) == pytest.approx(tuple(aucs), abs=1e-12)
        assert found.p_value == pytest.approx(p, rel=1e-9)
        half = norm.ppf(0.975) * np.sqrt(variance)
        assert found.interval == pytest.approx((aucs[0] - aucs[1] - half, aucs[0] - aucs[1] + half), abs=1e-12)


def test_clustered_differences_are_wider_than_independent_ones_for_correlated_subjects():
    rng = np.random.default_rng(4)
    subjects = np.repeat(np.arange(60), 5)
    skill = rng.normal(size=60)[subjects]  # one subject's slices are hard or easy together
    correct_a = skill + rng.normal(scale=0.3, size=300) > -0.6
    correct_b = skill + rng.normal(scale=0.3, size=300) > -0.3
    iid, clustered = accuracy_difference(correct_a, correct_b), accuracy_difference(correct_a, correct_b, clusters=subjects)
    assert clustered.difference == iid.difference
    assert np.diff(clustered.interval)[0] > np.diff(iid.interval)[0]
    labels = rng.integers(0, 2, 60)[subjects]
    auc_iid = auroc_difference(labels, labels + skill, labels + skill + rng.normal(size=300))
    auc_clustered = auroc_difference(labels, labels + skill, labels + skill + rng.normal(size=300), clusters=subjects)
    assert np.isfinite(auc_clustered.interval).all() and np.isfinite(auc_iid.p_value)


# --- coverage ---------------------------------------------------------------------------------


def accuracy_coverage(n, cells, draws=DRAWS, seed=10):
    """Newcombe's interval on 2x2 tables drawn from cell probabilities (both right, A only,
    B only, both wrong); the true difference is A only minus B only."""
    rng = np.random.default_rng(seed)
    tables = rng.multinomial(n, cells, size=draws)
    lo, hi = newcombe_interval(*tables.T)
    truth = cells[1] - cells[2]
    return float(np.mean((lo <= truth) & (truth <= hi))), float(np.mean(hi - lo))


def auroc_coverage(n, shift_a, shift_b, draws=DRAWS, seed=11):
    """Binormal scores with correlated noise (rho 0.5): AUROC = Phi(shift / sqrt(2))."""
    rng = np.random.default_rng(seed)
    truth = norm.cdf(shift_a / np.sqrt(2)) - norm.cdf(shift_b / np.sqrt(2))
    hits, widths = 0, []
    for _ in range(draws):
        labels = rng.integers(0, 2, n)
        shared, own = rng.normal(size=(2, n))
        a = shift_a * labels + shared * np.sqrt(0.5) + rng.normal(size=n) * np.sqrt(0.5)
        b = shift_b * labels + shared * np.sqrt(0.5) + own * np.sqrt(0.5)
        lo, hi = auroc_difference(labels, a, b).interval
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    return hits / draws, float(np.mean(widths))


def bootstrap_coverage(n, losses=False, draws=1000, n_boot=400, seed=12):
    """Paired bootstrap of a difference in a mean of per-image values. Correctness: A right
    on 80% of images, B on 75%, the same images mostly (A - B = 0.05). Losses (skewed):
    exponential, A's mean 1 and B's 1.2, sharing half their variation (A - B = -0.2)."""
    rng = np.random.default_rng(seed)
    hits, widths = 0, []
    truth = -0.2 if losses else 0.05
    for _ in range(draws):
        if losses:
            common = rng.exponential(size=n)
            a = 0.5 * common + 0.5 * rng.exponential(size=n)
            b = 0.6 * common + 0.6 * rng.exponential(size=n)
        else:
            u = rng.uniform(size=n)
            a, b = (u < 0.8).astype(float), ((u < 0.7) | ((u > 0.8) & (u < 0.85))).astype(float)
        c = paired_bootstrap(lambda v: v.mean(axis=-1), a, b, rng, n_boot=n_boot, batched=True)
        hits += c.interval[0] <= truth <= c.interval[1]
        widths.append(np.diff(c.interval)[0])
    return hits / draws, float(np.mean(widths))


ACCURACY_CELLS = {
    "accuracies 0.80 vs 0.75, 10% discordant": np.array([0.725, 0.075, 0.025, 0.175]),
    "accuracies 0.90 vs 0.90, 4% discordant": np.array([0.88, 0.02, 0.02, 0.08]),
    "accuracies 0.70 vs 0.55, independent errors": np.array([0.385, 0.315, 0.165, 0.135]),
}


@pytest.mark.parametrize("n", [50, 500])
@pytest.mark.parametrize("name", list(ACCURACY_CELLS))
def test_newcombe_interval_covers_the_true_accuracy_difference(name, n):
    coverage, _ = accuracy_coverage(n, ACCURACY_CELLS[name])
    assert coverage >= NOMINAL_FLOOR, (name, n, coverage)


@pytest.mark.parametrize("n,shifts", [(100, (1.4, 1.0)), (400, (1.4, 1.4))])
def test_delong_difference_covers_the_true_auroc_difference(n, shifts):
    coverage, _ = auroc_coverage(n, *shifts, draws=1000)
    assert coverage >= NOMINAL_FLOOR, (n, shifts, coverage)


def test_paired_bootstrap_covers_the_true_difference():
    coverage, _ = bootstrap_coverage(200)
    assert coverage >= NOMINAL_FLOOR, coverage


if __name__ == "__main__":
    for name, cells in ACCURACY_CELLS.items():
        for n in (50, 500):
            print("accuracy", name, n, "coverage %.3f width %.3f" % accuracy_coverage(n, cells))
    for n, shifts in [(100, (1.4, 1.0)), (400, (1.4, 1.4)), (100, (2.0, 2.0)), (400, (2.5, 2.0))]:
        print("auroc", n, shifts, "coverage %.3f width %.3f" % auroc_coverage(n, *shifts))
    for losses in (False, True):
        for n in (50, 200, 500):
            print("bootstrap", "losses" if losses else "correct", n, "coverage %.3f width %.3f" % bootstrap_coverage(n, losses))
