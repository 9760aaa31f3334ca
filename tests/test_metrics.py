"""Shared metric helpers: the batched forms equal the plain ones."""

from __future__ import annotations

import numpy as np
import pytest


def test_batched_bootstrap_gives_the_unbatched_interval():
    from sklearn.metrics import roc_auc_score

    from mcaudit.metrics import auroc_binary, auroc_of_resamples, bootstrap_interval

    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.3
    scores = np.round(rng.normal(positive * 0.8, 1.0), 1)  # rounded: many ties
    one = bootstrap_interval(lambda i: auroc_binary(positive[i], scores[i]), 300, np.random.default_rng(5), 150, strata=positive)
    rows = bootstrap_interval(lambda i: auroc_of_resamples(positive, scores, i), 300, np.random.default_rng(5), 150,
                              strata=positive, batched=True)
    assert rows == pytest.approx(one, abs=1e-12) and one[0] < one[1]
    idx = np.random.default_rng(1).integers(0, 300, (4, 300))
    np.testing.assert_allclose(auroc_of_resamples(positive, scores, idx),
                               [roc_auc_score(positive[i], scores[i]) for i in idx], atol=1e-12)
    one_class = np.flatnonzero(~positive)[None, :50]  # a resample with no positives: undefined
    assert np.isnan(auroc_of_resamples(positive, scores, one_class)).all()


# --- the performance intervals' building blocks, against independent references ----------------


def test_auroc_influence_gives_delongs_variance():
    from sklearn.metrics import roc_auc_score

    from mcaudit.metrics.auroc_intervals import _iid_variance, auroc_influence

    rng = np.random.default_rng(2)
    positive = rng.random(80) < 0.4
    scores = np.round(rng.normal(positive * 1.0, 1.0), 1)
    auc, influence = auroc_influence(positive, scores)
    assert auc == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    # DeLong et al. (1988) written out pair by pair: psi = 1, 1/2, 0 for each (positive, negative).
    pos, neg = scores[positive], scores[~positive]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    delong = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    assert _iid_variance(influence, positive) == pytest.approx(delong, rel=1e-12)


def test_auroc_interval_holds_the_auroc_and_stays_in_range():
    from sklearn.metrics import roc_auc_score

    from mcaudit.metrics import auroc_interval, auroc_ovr

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    probs = np.stack([1 - (p := 1 / (1 + np.exp(-rng.normal(labels * 1.5, 1.0)))), p], axis=1)
    lo, hi = auroc_interval(labels, probs)
    assert lo < roc_auc_score(labels, probs[:, 1]) < hi
    perfect = np.stack([1 - labels, labels], axis=1).astype(float)  # AUROC 1: DeLong's variance is 0
    lo, hi = auroc_interval(labels, perfect)
    assert 0.85 < lo < 1.0 and hi == 1.0
    three = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3)) + 1.2 * np.eye(3)[three]
    p3 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    lo, hi = auroc_interval(three, p3)
    assert lo < auroc_ovr(three, p3)[0] < hi and 0 <= lo and hi <= 1


def test_hanley_mcneil_score_interval_ends_where_the_score_test_turns():
    from scipy.stats import norm

    from mcaudit.metrics.auroc_intervals import _hanley_mcneil_score_interval, hanley_mcneil_variance

    lo, hi = _hanley_mcneil_score_interval(0.8, [(30, 70)], 0.95)
    z = norm.ppf(0.975)
    for end in (lo, hi):
        assert abs(0.8 - end) == pytest.approx(z * np.sqrt(hanley_mcneil_variance(end, 30, 70)), abs=2e-4)


def test_balanced_accuracy_interval_for_one_class_is_the_jeffreys_interval():
    from scipy.stats import beta

    from mcaudit.metrics import balanced_accuracy_interval

    cm = np.array([[0, 0], [4, 16]])  # only class 1 present: balanced accuracy is its recall, 16 of 20
    lo, hi = balanced_accuracy_interval(cm, np.random.default_rng(0), n_draws=200_000)
    assert (float(lo), float(hi)) == pytest.approx(beta.ppf([0.025, 0.975], 16.5, 4.5), abs=3e-3)
    stack = np.stack([cm, np.array([[5, 5], [5, 5]])])
    lo, hi = balanced_accuracy_interval(stack, np.random.default_rng(0))
    assert lo.shape == (2,) and lo[1] < 0.5 < hi[1]


def test_confusion_resamples_match_index_resampling():
    from mcaudit.metrics import accuracy_of, confusion_resamples

    rng = np.random.default_rng(4)
    subject = np.repeat(np.arange(30), rng.integers(1, 6, 30))
    labels = rng.integers(0, 2, len(subject))
    preds = np.where(rng.random(30)[subject] < 0.7, labels, 1 - labels)  # whole subjects right or wrong
    fast = accuracy_of(confusion_resamples(labels, preds, 2, np.random.default_rng(5), 4000, clusters=subject))
    members = [np.flatnonzero(subject == s) for s in range(30)]
    slow = []
    for _ in range(4000):
        idx = np.concatenate([members[j] for j in rng.integers(0, 30, 30)])
        slow.append(np.mean(labels[idx] == preds[idx]))
    assert fast.mean() == pytest.approx(np.mean(slow), abs=0.01)
    assert fast.std() == pytest.approx(np.std(slow), rel=0.08)
    images = accuracy_of(confusion_resamples(labels, preds, 2, np.random.default_rng(6), 4000))
    p = np.mean(labels == preds)
    assert images.std() == pytest.approx(np.sqrt(p * (1 - p) / len(labels)), rel=0.08)


def test_cluster_wilson_interval():
    from mcaudit.metrics import cluster_wilson_interval, wilson_interval

    correct = np.r_[np.ones(30), np.zeros(10)]
    alone = cluster_wilson_interval(correct, np.arange(40))  # one image per subject: Wilson (n / (n - 1) aside)
    assert alone == pytest.approx(wilson_interval(30, 40), abs=0.005)
    # Ten subjects of four identical images carry ten images' evidence, not forty.
    same = cluster_wilson_interval(correct, np.repeat(np.arange(10), 4))
    assert same == pytest.approx(wilson_interval(7.5, 10), abs=0.01)
    # Nothing varies: the design effect is unknown, so each subject counts once.
    assert cluster_wilson_interval(np.ones(40), np.repeat(np.arange(10), 4)) == pytest.approx(wilson_interval(10, 10))


def test_balanced_accuracy_interval_contains_its_estimate_with_tiny_classes():
    from mcaudit.metrics import balanced_accuracy_interval

    # six classes, the model finds 3 of 40 of the common one and nothing else; the posterior
    # of a recall of 0 of 2 sits near 0.17, which lifted the quantiles above the estimate
    recalls = {0: (3, 40), 1: (0, 12), 2: (0, 2), 3: (0, 2), 4: (0, 2), 5: (0, 2)}
    cm = np.zeros((6, 6), dtype=int)
    for c, (hit, n) in recalls.items():
        cm[c, c] = hit
        cm[c, (c + 1) % 6] = n - hit
    observed = np.mean([hit / n for hit, n in recalls.values()])
    lo, hi = balanced_accuracy_interval(cm, np.random.default_rng(0))
    assert float(lo) <= observed <= float(hi)
    assert float(lo) == pytest.approx(observed)  # the posterior's lower quantile lay above it
    assert float(hi) > observed + 0.1


def test_point_metrics_give_known_answers():
    from mcaudit.metrics import (accuracy, auroc_binary, average_precision, balanced_accuracy, brier_score, confusion,
                                 fpr_at_tpr, negative_log_likelihood, roc_points)

    labels, preds = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 1, 1])
    assert confusion(labels, preds, 3).tolist() == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert accuracy(labels, preds) == pytest.approx(4 / 6)
    assert balanced_accuracy(labels, preds, 3) == pytest.approx((2 / 3 + 1 + 0) / 3)
    # positives score 0.9, 0.4; negatives 0.8, 0.4, 0.1: pairs won 1 + 1 + 1 + 0.5 (tie) + 1 of 6
    positive, scores = np.array([1, 0, 1, 0, 0], bool), np.array([0.9, 0.8, 0.4, 0.4, 0.1])
    assert auroc_binary(positive, scores) == pytest.approx(4.5 / 6)
    # precision 1 at recall 1/2, then 2 of 4 at recall 1 (the tie is one threshold)
    assert average_precision(positive, scores) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    fpr, tpr, _ = roc_points(positive, scores)
    assert fpr.tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3, 1]) and tpr.tolist() == pytest.approx([0, 0.5, 0.5, 1, 1])
    assert fpr_at_tpr(positive, scores, 0.95) == pytest.approx(2 / 3)
    assert np.isnan(auroc_binary(np.ones(3, bool), np.arange(3.0)))
    # binary Brier is the mean (p - y)^2; with three classes it sums over classes
    assert brier_score(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 1])) == pytest.approx((0.04 + 0.36) / 2)
    assert brier_score(np.array([[0.5, 0.25, 0.25]]), np.array([0])) == pytest.approx(0.25 + 0.0625 * 2)
    # a confidently wrong answer keeps its full loss: -log softmax = 100 here, not a clipped 36
    assert negative_log_likelihood(np.array([[100.0, 0.0]]), np.array([1])) == pytest.approx(100.0)
