"""Coverage of the performance intervals, simulated from populations whose true values are known.

Each test draws 2,000 samples of n = 50 and n = 500 images and counts how many 95% intervals
contain the true value; at least 93% must (2,000 draws put the standard error of a 95%
coverage at 0.5 points). The simulations are vectorised over the draws so the file runs in
well under a minute on one core. ``python tests/test_coverage.py`` prints every figure that
docs/statistics.md quotes.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy.stats import norm

from mcaudit.metrics import (
    accuracy_of,
    auroc_interval,
    auroc_ovr,
    balanced_accuracy_interval,
    balanced_accuracy_of,
    cluster_wilson_interval,
    confusion_resamples,
    percentile_interval,
    wilson_interval,
)

DRAWS = 2000
SIZES = (50, 500)
NOMINAL_FLOOR = 0.93


# --- populations -----------------------------------------------------------------------------


def draw_confusions(rng, n, prevalence, recall, draws=DRAWS):
    """(draws, k, k) confusion matrices of n images: class mix multinomial, each class's
    errors spread evenly over the other classes."""
    prevalence, recall = np.asarray(prevalence, float), np.asarray(recall, float)
    k = len(prevalence)
    support = rng.multinomial(n, prevalence, size=draws)
    cms = np.zeros((draws, k, k), dtype=np.int64)
    for j in range(k):
        row = np.full(k, (1 - recall[j]) / max(k - 1, 1))
        row[j] = recall[j]
        cms[:, j, :] = rng.multinomial(support[:, j], row)
    return cms


def draw_scores(rng, n, prevalence, separation):
    """Labels and softmax class probabilities whose logits are N(separation * one-hot, 1)."""
    k = len(prevalence)
    labels = rng.choice(k, size=n, p=prevalence)
    logits = rng.normal(size=(n, k)) + separation * np.eye(k)[labels]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return labels, probs / probs.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=None)
def true_auroc(prevalence, separation):
    if len(prevalence) == 2:  # class 1's probability ranks as l1 - l0 ~ N(+-separation, 2): closed form
        return float(norm.cdf(separation))
    labels, probs = draw_scores(np.random.default_rng(12345), 400_000, prevalence, separation)
    return auroc_ovr(labels, probs)[0]


# --- coverage measurements ---------------------------------------------------------------------


def accuracy_coverage(n, p, seed=0):
    """Wilson intervals: one per possible count, then looked up for each draw."""
    rng = np.random.default_rng(seed)
    table = np.array([wilson_interval(k, n) for k in range(n + 1)])
    lo, hi = table[rng.binomial(n, p, size=DRAWS)].T
    return float(np.mean((lo <= p) & (p <= hi))), float(np.mean(hi - lo))


def balanced_accuracy_coverage(n, prevalence, recall, method="posterior", seed=0):
    rng = np.random.default_rng(seed)
    cms = draw_confusions(rng, n, prevalence, recall)
    truth = float(np.mean(recall))
    every_class = (cms.sum(axis=2) > 0).all(axis=1)  # the audit's metric needs every class present
    cms = cms[every_class]
    if method == "posterior":
        lo, hi = balanced_accuracy_interval(cms, rng, n_draws=2000)
    else:  # the image bootstrap the check used before: percentile of resampled balanced accuracy
        lo, hi = np.array([_image_bootstrap(cm, rng) for cm in cms]).T
    return float(np.mean((lo <= truth) & (truth <= hi))), float(np.mean(hi - lo))


def _image_bootstrap(cm, rng, n_boot=1000):
    k = cm.shape[0]
    labels = np.repeat(np.arange(k), cm.sum(axis=1))
    preds = np.concatenate([np.repeat(np.arange(k), row) for row in cm])
    return percentile_interval(balanced_accuracy_of(confusion_resamples(labels, preds, k, rng, n_boot)))


def auroc_coverage(n, prevalence, separation, seed=0):
    rng = np.random.default_rng(seed)
    truth = true_auroc(prevalence, separation)
    hits, widths = [], []
    for _ in range(DRAWS):
        labels, probs = draw_scores(rng, n, prevalence, separation)
        if np.bincount(labels, minlength=len(prevalence)).min() == 0:
            continue  # the check reports such a sample as not evaluated
        lo, hi = auroc_interval(labels, probs)
        hits.append(lo <= truth <= hi)
        widths.append(hi - lo)
    return float(np.mean(hits)), float(np.mean(widths))


def clustered_sample(rng, subjects, slices, icc=0.4, mean_accuracy=0.75):
    """Subjects of one class each, ``slices`` images per subject; a subject's images share
    its own chance of being classified right, Beta-distributed around ``mean_accuracy`` with
    intra-subject correlation ``icc``."""
    strength = 1 / icc - 1
    p_subject = rng.beta(mean_accuracy * strength, (1 - mean_accuracy) * strength, size=subjects)
    labels_subject = rng.integers(0, 2, size=subjects)
    correct = rng.random((subjects, slices)) < p_subject[:, None]
    labels = np.repeat(labels_subject, slices)
    preds = np.where(correct.ravel(), labels, 1 - labels)
    return labels, preds, np.repeat(np.arange(subjects), slices)


def clustered_coverage(subjects=80, slices=6, seed=0, n_boot=1000):
    """Coverage of the accuracy and balanced-accuracy intervals (the true value of both is
    the mean subject accuracy) with and without resampling subjects."""
    rng = np.random.default_rng(seed)
    truth = 0.75
    hits = {name: [] for name in ("accuracy: image bootstrap", "accuracy: subject bootstrap", "accuracy: Wilson",
                                  "accuracy: Wilson with design effect", "balanced accuracy: image bootstrap",
                                  "balanced accuracy: subject bootstrap", "AUROC: images independent",
                                  "AUROC: clustered over subjects")}
    # Scores share a subject effect as large as the image noise: AUROC = Phi(1 / sqrt(2 * 2)).
    auroc_truth = float(norm.cdf(1.0 / 2.0))
    for _ in range(DRAWS):
        labels, preds, subject = clustered_sample(rng, subjects, slices)
        if len(np.unique(labels)) < 2:
            continue
        for unit, clusters in (("image", None), ("subject", subject)):
            cms = confusion_resamples(labels, preds, 2, rng, n_boot, clusters=clusters)
            lo, hi = percentile_interval(accuracy_of(cms))
            hits[f"accuracy: {unit} bootstrap"].append(lo <= truth <= hi)
            lo, hi = percentile_interval(balanced_accuracy_of(cms))
            hits[f"balanced accuracy: {unit} bootstrap"].append(lo <= truth <= hi)
        correct = labels == preds
        lo, hi = wilson_interval(int(correct.sum()), len(correct))
        hits["accuracy: Wilson"].append(lo <= truth <= hi)
        lo, hi = cluster_wilson_interval(correct, subject)
        hits["accuracy: Wilson with design effect"].append(lo <= truth <= hi)
        score = labels + rng.normal(size=subjects)[subject] + rng.normal(size=len(labels))
        probs = np.stack([1 - (p1 := 1 / (1 + np.exp(-score))), p1], axis=1)
        for name, clusters in (("AUROC: images independent", None), ("AUROC: clustered over subjects", subject)):
            lo, hi = auroc_interval(labels, probs, clusters=clusters)
            hits[name].append(lo <= auroc_truth <= hi)
    return {name: float(np.mean(v)) for name, v in hits.items()}


# --- the tests -----------------------------------------------------------------------------------

BA_POPULATIONS = {
    "binary, prevalence 0.3, recalls 0.8 / 0.6": ((0.7, 0.3), (0.8, 0.6)),
    "binary, recalls 0.95 / 0.9": ((0.5, 0.5), (0.95, 0.9)),
    "binary, predicts one class: recalls 0.99 / 0.05": ((0.8, 0.2), (0.99, 0.05)),
    "three classes, recalls 0.9 / 0.7 / 0.5": ((0.5, 0.3, 0.2), (0.9, 0.7, 0.5)),
}
AUROC_POPULATIONS = {
    "binary, prevalence 0.3, AUROC 0.76": ((0.7, 0.3), float(norm.ppf(0.76))),
    "binary, prevalence 0.3, AUROC 0.95": ((0.7, 0.3), float(norm.ppf(0.95))),
    "binary, prevalence 0.1, AUROC 0.76": ((0.9, 0.1), float(norm.ppf(0.76))),
    "binary, prevalence 0.5, AUROC 0.99": ((0.5, 0.5), float(norm.ppf(0.99))),
    "three classes, macro one-vs-rest": ((0.5, 0.3, 0.2), 1.5),
}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", [0.8, 0.95])
def test_wilson_accuracy_interval_covers(n, p):
    coverage, _ = accuracy_coverage(n, p)
    assert coverage >= NOMINAL_FLOOR


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("population", list(BA_POPULATIONS))
def test_balanced_accuracy_interval_covers(n, population):
    coverage, width = balanced_accuracy_coverage(n, *BA_POPULATIONS[population])
    assert coverage >= NOMINAL_FLOOR and width > 0


def test_image_bootstrap_of_balanced_accuracy_collapses_when_one_class_is_predicted():
    # Why the check no longer bootstraps balanced accuracy: recalls near 0 and 1 barely move
    # under resampling, so the percentile interval shrinks to a sliver around the estimate.
    prevalence, recall = BA_POPULATIONS["binary, predicts one class: recalls 0.99 / 0.05"]
    boot, boot_width = balanced_accuracy_coverage(50, prevalence, recall, method="bootstrap")
    posterior, posterior_width = balanced_accuracy_coverage(50, prevalence, recall)
    assert boot < 0.8 and posterior >= NOMINAL_FLOOR and posterior_width > boot_width


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("population", list(AUROC_POPULATIONS))
def test_auroc_interval_covers(n, population):
    coverage, width = auroc_coverage(n, *AUROC_POPULATIONS[population])
    assert coverage >= NOMINAL_FLOOR and width > 0


def test_subject_bootstrap_covers_correlated_slices_and_image_bootstrap_does_not():
    coverage = clustered_coverage()
    assert coverage["accuracy: subject bootstrap"] >= NOMINAL_FLOOR
    assert coverage["balanced accuracy: subject bootstrap"] >= NOMINAL_FLOOR
    assert coverage["accuracy: Wilson with design effect"] >= NOMINAL_FLOOR
    assert coverage["AUROC: clustered over subjects"] >= NOMINAL_FLOOR
    # Six correlated slices per subject count as far fewer independent images: intervals
    # that treat them as independent miss the truth far more often than 5% of the time.
    assert coverage["accuracy: image bootstrap"] < 0.85
    assert coverage["balanced accuracy: image bootstrap"] < 0.85
    assert coverage["accuracy: Wilson"] < 0.85


if __name__ == "__main__":  # the figures docs/statistics.md quotes
    import time

    start = time.time()
    for p in (0.8, 0.95):
        for n in SIZES:
            print(f"accuracy (Wilson), p = {p}, n = {n}: coverage {accuracy_coverage(n, p)[0]:.3f}")
    for name, (prev, rec) in BA_POPULATIONS.items():
        for n in SIZES:
            c, w = balanced_accuracy_coverage(n, prev, rec)
            print(f"balanced accuracy (posterior), {name}, n = {n}: coverage {c:.3f}, mean width {w:.3f}")
    c, w = balanced_accuracy_coverage(50, *BA_POPULATIONS["binary, predicts one class: recalls 0.99 / 0.05"], method="bootstrap")
    print(f"balanced accuracy (image bootstrap), predicts one class, n = 50: coverage {c:.3f}, mean width {w:.3f}")
    for name, (prev, sep) in AUROC_POPULATIONS.items():
        for n in SIZES:
            c, w = auroc_coverage(n, prev, sep)
            print(f"AUROC, {name} (true {true_auroc(prev, sep):.3f}), n = {n}: coverage {c:.3f}, mean width {w:.3f}")
    for name, c in clustered_coverage().items():
        print(f"80 subjects x 6 slices, ICC 0.4, {name}: coverage {c:.3f}")
    print(f"({time.time() - start:.0f} s)")
