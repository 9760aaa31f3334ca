"""Classification metrics in plain numpy, shared by the checks.

Kept independent of scikit-learn so that the tests can cross-check every number against
scikit-learn, fairlearn and torchmetrics as outside references.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(np.mean(labels == preds)) if len(labels) else float("nan")


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def per_class_precision(cm: np.ndarray) -> np.ndarray:
    predicted = cm.sum(axis=0)
    # scikit-learn's convention: precision of a never-predicted class is 0.
    return np.where(predicted > 0, np.diag(cm) / np.maximum(predicted, 1), 0.0)


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``labels``."""
    rec = per_class_recall(confusion(labels, preds, n_classes))
    present = ~np.isnan(rec)
    return float(rec[present].mean()) if present.any() else float("nan")


def auroc_binary(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_of_resamples(positive: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """auroc_binary of each resample ``idx[b]`` (rows of indices into ``positive``/``scores``).

    Resamples only repeat items of one pool, so nothing needs sorting per resample: the pool
    is sorted once, and each resample's average ranks follow from how often it drew each
    item (running counts over the pool's tie groups). Exact, ties counting one half.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_boot, m = idx.shape
    n = len(scores)
    order = np.argsort(scores, kind="mergesort")
    s_sorted = scores[order]
    tie = np.cumsum(np.r_[True, s_sorted[1:] != s_sorted[:-1]]) - 1
    n_ties = int(tie[-1]) + 1 if n else 0
    rank_of = np.empty(n, dtype=np.int64)
    rank_of[order] = np.arange(n)
    drawn = np.bincount((np.arange(n_boot)[:, None] * n + rank_of[idx]).ravel(), minlength=n_boot * n).reshape(n_boot, n)
    in_tie = np.bincount((np.arange(n_boot)[:, None] * n_ties + tie).ravel(), weights=drawn.ravel(),
                         minlength=n_boot * n_ties).reshape(n_boot, n_ties)
    average_rank = np.cumsum(in_tie, axis=1) - in_tie + (in_tie + 1) / 2.0
    drawn_pos = drawn * positive[order]
    n_pos = drawn_pos.sum(axis=1).astype(np.float64)
    n_neg = m - n_pos
    u = (drawn_pos * average_rank[:, tie]).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank, vectorised."""
    order = np.argsort(x, kind="mergesort")
    inverse = np.empty(len(x), dtype=np.int64)
    inverse[order] = np.arange(len(x))
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    dense = np.cumsum(first)[inverse]
    bounds = np.r_[np.flatnonzero(first), len(x)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def auroc_ovr(labels: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro one-vs-rest AUROC and the per-class values; binary tasks use class 1's score.

    Classes absent from ``labels`` (or present alone) have no AUROC and are left out of the
    macro mean.
    """
    n_classes = probs.shape[1]
    per = np.array([auroc_binary(labels == k, probs[:, k]) for k in range(n_classes)])
    if n_classes == 2:
        return float(per[1]), per
    ok = ~np.isnan(per)
    return (float(per[ok].mean()) if ok.any() else float("nan")), per


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion: near-nominal coverage even for small n or a
    proportion near 0 or 1, where the Wald interval collapses (Brown, Cai and DasGupta 2001)."""
    if trials <= 0:
        return float("nan"), float("nan")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def clopper_pearson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion: coverage at least nominal for every n
    and p, at the price of some width; for small samples such as attacked-image subsets."""
    if trials <= 0:
        return float("nan"), float("nan")
    from scipy.stats import beta

    alpha = 1 - level
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    rng: np.random.Generator,
    n_boot: int = 200,
    level: float = 0.95,
    strata: np.ndarray | None = None,
    batched: bool = False,
    clusters: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` items.

    With ``clusters`` (one id per item, e.g. the patient) whole clusters are resampled, so
    correlated items of one patient count once in the sampling spread; replicate lengths then
    vary, so ``batched`` cannot be combined with it. With ``strata`` the resampling keeps
    each stratum's size. With ``batched`` the statistic gets all replicates' indices at once,
    shape (n_boot, n), and returns one value per row; the replicates are the same as unbatched.
    """
    if n_boot <= 0 or n < 2:
        return float("nan"), float("nan")
    if clusters is not None:
        if batched or strata is not None:
            raise ValueError("bootstrap_interval: clusters cannot be combined with batched or strata")
        _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
        order = np.argsort(cluster_of, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(cluster_of[order])) + 1, n]
        members = [order[a:b] for a, b in zip(starts[:-1], starts[1:])]
        if len(members) < 2:
            return float("nan"), float("nan")
        replicates = (np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))]) for _ in range(n_boot))
        groups = None
    else:
        groups = [np.flatnonzero(strata == s) for s in np.unique(strata)] if strata is not None else [np.arange(n)]
        replicates = (np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups]) for _ in range(n_boot))
    if batched:
        computed = np.asarray(statistic(np.stack(list(replicates))), dtype=np.float64)
    else:  # one replicate at a time: memory stays flat however large n is
        computed = np.array([statistic(idx) for idx in replicates], dtype=np.float64)
    values = computed[np.isfinite(computed)]
    if len(values) < max(10, n_boot // 4):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def roc_points(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates, thresholds) of "score >= threshold".

    One point per distinct score, highest threshold first, starting at (0, 0): tied scores
    move the curve diagonally, as scikit-learn's ``roc_curve`` does.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(p)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    tpr = np.r_[0.0, tp / n_pos] if n_pos else np.full(len(tp) + 1, np.nan)
    fpr = np.r_[0.0, fp / n_neg] if n_neg else np.full(len(fp) + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum of precision x recall gain.

    Tied scores form one threshold (no interpolation), which is scikit-learn's
    ``average_precision_score``.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == len(positive):
        return float("nan") if n_pos == 0 else 1.0
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(p)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(precision * recall_gain))


def fpr_at_tpr(positive: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """Share of negatives scoring at or above the highest threshold that keeps ``tpr`` of the
    positives, i.e. the false positive rate at the first ROC point reaching that TPR."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = np.sort(scores[positive])[::-1], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    k = int(np.ceil(tpr * len(pos) - 1e-9))  # positives that must score >= the threshold
    threshold = pos[max(k, 1) - 1]
    return float(np.mean(neg >= threshold))


# --- calibration -----------------------------------------------------------------------------
# Bins are half-open [lo, hi) with the last one closed, as numpy.histogram and netcal bin;
# a confidence on an inner edge falls in the upper bin.


def equal_width_edges(n_bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def equal_mass_edges(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Edges at the confidence quantiles, so each bin holds about the same number of images."""
    edges = np.quantile(np.asarray(confidence, dtype=np.float64), np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def calibration_bins(confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: image count, mean confidence and mean outcome (NaN in empty bins)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    n_bins = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    out_sum = np.bincount(idx, weights=np.asarray(outcome, dtype=np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, conf_sum / counts, out_sum / counts


def expected_calibration_error(confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> float:
    """Count-weighted mean of |mean outcome - mean confidence| over the bins."""
    counts, conf, acc = calibration_bins(confidence, outcome, edges)
    if counts.sum() == 0:
        return float("nan")
    full = counts > 0
    return float(np.sum(counts[full] * np.abs(acc[full] - conf[full])) / counts.sum())


def max_calibration_error(confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> float:
    """Largest |mean outcome - mean confidence| over the non-empty bins."""
    counts, conf, acc = calibration_bins(confidence, outcome, edges)
    full = counts > 0
    return float(np.max(np.abs(acc[full] - conf[full]))) if full.any() else float("nan")


def top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidence of the predicted class and whether that prediction is right."""
    preds = np.argmax(probs, axis=1)
    return probs[np.arange(len(preds)), preds], (preds == labels).astype(np.float64)


def top_label_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    confidence, correct = top_label(probs, labels)
    return expected_calibration_error(confidence, correct, equal_width_edges(n_bins))


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Mean over classes of the ECE of each class's probability against "is this class"."""
    edges = equal_width_edges(n_bins)
    return float(np.mean([expected_calibration_error(probs[:, k], labels == k, edges) for k in range(probs.shape[1])]))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error of the probability vector against the one-hot label.

    Summed over classes (range 0 to 2) for more than two classes; halved for two classes,
    where it equals the mean of (p(positive) - y)^2 (range 0 to 1), as scikit-learn reports it.
    """
    onehot = np.eye(probs.shape[1])[labels]
    score = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    return score / 2 if probs.shape[1] == 2 else score


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log softmax(logits)[label], from logits so that a near-zero probability stays finite."""
    z = np.asarray(logits, dtype=np.float64)
    zmax = z.max(axis=1, keepdims=True)
    log_norm = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))
