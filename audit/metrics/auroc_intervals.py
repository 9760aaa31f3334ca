"""Intervals for the AUROC: DeLong's variance from structural components (also clustered
over patients, Obuchowski 1997) joined with a score interval on Hanley and McNeil's variance.
scikit-learn has the AUROC itself but no interval for it."""

from __future__ import annotations

import numpy as np

from mcaudit.metrics.proportions import _z, clopper_pearson_interval
from mcaudit.metrics.resampling import _average_ranks


def auroc_influence(positive: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """AUROC and each image's influence on it, from DeLong's placement values: a positive's
    share of negatives it outscores, a negative's share of positives that outscore it (ties
    one half), centred on the AUROC and divided by the size of its group. Sums of squared
    influences give DeLong's variance; sums within patients first give the clustered one
    (Obuchowski 1997)."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    m = int(positive.sum())
    n_neg = len(scores) - m
    if m == 0 or n_neg == 0:
        return float("nan"), np.full(len(scores), np.nan)
    ranks = _average_ranks(scores)
    auc = (ranks[positive].sum() - m * (m + 1) / 2.0) / (m * n_neg)
    influence = np.empty(len(scores))
    influence[positive] = ((ranks[positive] - _average_ranks(scores[positive])) / n_neg - auc) / m
    influence[~positive] = (1.0 - (ranks[~positive] - _average_ranks(scores[~positive])) / m - auc) / n_neg
    return float(auc), influence


def hanley_mcneil_variance(auc, n_pos: int, n_neg: int):
    """Hanley and McNeil's (1982) variance of an AUROC of ``auc`` with these group sizes."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)


_GRID = np.linspace(0.0, 1.0, 20_001)


# Hanley-McNeil's variance is linear in these three functions of the AUROC; kept on the grid once.
_HM_TERMS = np.stack([_GRID * (1 - _GRID), _GRID / (2 - _GRID) - _GRID**2, 2 * _GRID**2 / (1 + _GRID) - _GRID**2])


def _hanley_mcneil_score_interval(auc: float, sizes, level: float, inflation: float = 1.0) -> tuple[float, float]:
    """Every theta with |auc - theta| <= z * sqrt(V(theta)), V the Hanley-McNeil variance (the
    mean of the classes' for a macro AUROC, times ``inflation``): the AUROC's counterpart of
    Wilson inverting the binomial test (Newcombe 2006). It stays inside [0, 1] and does not
    collapse at an AUROC of 0 or 1."""
    weights = np.zeros(3)
    for n_pos, n_neg in sizes:
        weights += np.array([1.0, n_pos - 1, n_neg - 1]) / (n_pos * n_neg)
    variance = inflation * (weights / len(sizes) ** 2) @ _HM_TERMS
    z = _z(level)
    inside = (auc - _GRID) ** 2 <= z * z * variance
    if not inside.any():
        return float(auc), float(auc)
    found = np.flatnonzero(inside)
    return float(_GRID[found[0]]), float(_GRID[found[-1]])


def _logit_interval(estimate: float, se: float, level: float) -> tuple[float, float]:
    if not (0.0 < estimate < 1.0) or not np.isfinite(se) or se <= 0:
        return float(estimate), float(estimate)
    centre = np.log(estimate / (1 - estimate))
    half = _z(level) * se / (estimate * (1 - estimate))
    return float(1 / (1 + np.exp(-(centre - half)))), float(1 / (1 + np.exp(-(centre + half))))


AUROC_METHOD = "DeLong (logit) joined with the Hanley-McNeil score interval"


AUROC_CLUSTER_METHOD = "DeLong clustered over subjects (Obuchowski, logit) joined with the Hanley-McNeil score interval widened by the design effect"


def auroc_interval(labels: np.ndarray, probs: np.ndarray, level: float = 0.95,
                   clusters: np.ndarray | None = None) -> tuple[float, float]:
    """Interval for :func:`auroc_ovr`'s value (binary: class 1's AUROC; else the macro mean).

    The union of two intervals, each good where the other is weak: DeLong's variance with a
    logit transform (DeLong et al. 1988; accurate when both groups are large) and a score
    interval on Hanley and McNeil's variance (Newcombe 2006; keeps its coverage with few
    positives or an AUROC near 1, where DeLong's variance collapses). With ``clusters`` the
    DeLong variance sums influences within each patient first (Obuchowski 1997) and the
    Hanley-McNeil variance grows by the same design effect.
    """
    labels = np.asarray(labels)
    n_classes = probs.shape[1]
    targets = [1] if n_classes == 2 else [k for k in range(n_classes) if 0 < np.sum(labels == k) < len(labels)]
    if not targets:
        return float("nan"), float("nan")
    parts = [auroc_influence(labels == k, probs[:, k]) for k in targets]
    auc = float(np.mean([a for a, _ in parts]))
    if not np.isfinite(auc):
        return float("nan"), float("nan")
    influence = np.mean([inf for _, inf in parts], axis=0)
    sizes = [(int(np.sum(labels == k)), int(np.sum(labels != k))) for k in targets]
    var_iid = _iid_variance(influence, labels == targets[0]) if len(targets) == 1 else \
        len(influence) / (len(influence) - 1) * float(np.sum(influence**2))
    variance, inflation = var_iid, 1.0
    if clusters is not None:
        _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
        n_clusters = int(cluster_of.max()) + 1
        if n_clusters < 2:
            return float("nan"), float("nan")
        totals = np.bincount(cluster_of, weights=influence, minlength=n_clusters)
        variance = n_clusters / (n_clusters - 1) * float(np.sum(totals**2))
        inflation = max(1.0, variance / var_iid) if var_iid > 0 else float(len(labels)) / n_clusters
    delong = _logit_interval(auc, np.sqrt(variance), level)
    score = _hanley_mcneil_score_interval(auc, sizes, level, inflation)
    return min(delong[0], score[0]), max(delong[1], score[1])


def _iid_variance(influence: np.ndarray, positive: np.ndarray) -> float:
    """DeLong's variance: each group's squared influences with its own n / (n - 1)."""
    total = 0.0
    for group in (positive, ~positive):
        size = int(group.sum())
        if size > 1:
            total += size / (size - 1) * float(np.sum(influence[group] ** 2))
    return total


def delong_interval(positive: np.ndarray, scores: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """DeLong's 95% interval for the AUROC of ``scores`` with ``positive`` the positive class.

    The variance comes from the structural components (each positive's share of negatives
    below it, each negative's share of positives above it; DeLong, DeLong and
    Clarke-Pearson, 1988). Where that variance is zero (perfect separation, all scores tied)
    the normal interval would collapse to a point, so the exact Clopper-Pearson interval of
    min(n_pos, n_neg) independent positive-negative pairs stands in: a perfect separation of
    20 pairs is then 0.84 to 1, not 1 to 1.
    """
    from scipy.stats import norm, rankdata

    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    x, y = scores[positive], scores[~positive]
    m, k = len(x), len(y)
    if m < 2 or k < 2:
        return float("nan"), float("nan")
    ranks = rankdata(np.r_[x, y])
    below = (ranks[:m] - rankdata(x)) / k  # per positive: share of negatives below it
    above = 1.0 - (ranks[m:] - rankdata(y)) / m  # per negative: share of positives above it
    auc = float(below.mean())
    var = below.var(ddof=1) / m + above.var(ddof=1) / k
    if not var > 0:
        pairs = min(m, k)
        return clopper_pearson_interval(int(round(auc * pairs)), pairs, level)
    half = float(norm.ppf(0.5 + level / 2)) * float(np.sqrt(var))
    return max(0.0, auc - half), min(1.0, auc + half)
