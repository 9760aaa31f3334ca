"""Classification metrics and their intervals, shared by the checks.

Point metrics come from scikit-learn (confusion matrix, accuracy, balanced accuracy, AUROC,
ROC curve, average precision, Brier score) and exact proportion intervals from scipy.stats.
Written here by hand only what those libraries cannot do: statistics of thousands of
bootstrap replicates at once (confusion-matrix stacks, AUROC of resamples from one sort),
DeLong's and Hanley-McNeil's AUROC intervals, the Jeffreys posterior of balanced accuracy,
interval methods for clustered data, calibration bins shared with the fairness engine, and
the negative log-likelihood from logits (scikit-learn's ``log_loss`` takes probabilities and
clips them, which caps the loss of a confidently wrong answer).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import numpy as np
from sklearn import metrics as skm


def confusion(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return skm.confusion_matrix(labels, preds, labels=np.arange(n_classes))


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(skm.accuracy_score(labels, preds)) if len(labels) else float("nan")


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
    if len(labels) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": those are left out, as intended
        return float(skm.balanced_accuracy_score(labels, preds))


def auroc_binary(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == len(positive):
        return float("nan")
    return float(skm.roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


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
    if trials > 0 and (successes != int(successes) or trials != int(trials)):
        # effective counts (n shrunk by a design effect) are not integers, which scipy's
        # binomtest requires; the score interval is the same formula for any n
        return _wilson_from_share(successes / trials, float(trials), level)
    return _binomial_interval(successes, trials, level, "wilson")


def _binomial_interval(successes: int, trials: int, level: float, method: str) -> tuple[float, float]:
    if trials <= 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method=method)
    return float(max(0.0, ci.low)), float(min(1.0, ci.high))


def clopper_pearson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion: coverage at least nominal for every n
    and p, at the price of some width; for small samples such as attacked-image subsets."""
    return _binomial_interval(successes, trials, level, "exact")


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


# --- intervals for the performance metrics -----------------------------------------------------
# Each method was chosen for its coverage, measured in tests/test_coverage.py and written up
# in docs/statistics.md.


@functools.lru_cache(maxsize=8)
def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def cluster_wilson_interval(correct: np.ndarray, clusters: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Wilson interval for the share of ``correct`` items when items of one cluster (patient)
    are correlated: the sample size is shrunk by the design effect, the ratio-estimator
    variance over clusters divided by the binomial one (Kish 1965; for clustered
    proportions, Dean and Pagano 2015). Never narrower than the plain Wilson interval. Where
    the design effect cannot be estimated (every item agrees, or one cluster) each cluster
    counts as one item, the most a cluster can weigh."""
    correct = np.asarray(correct, dtype=np.float64)
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan")
    _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(cluster_of.max()) + 1
    p = float(correct.mean())
    if n_clusters < 2 or p in (0.0, 1.0):
        return _wilson_from_share(p, float(n_clusters), level)
    residual = np.bincount(cluster_of, weights=correct - p, minlength=n_clusters)
    var_cluster = n_clusters / (n_clusters - 1) * np.sum(residual**2) / n**2
    design_effect = max(1.0, var_cluster / (p * (1 - p) / n))
    return _wilson_from_share(p, n / design_effect, level)


def _wilson_from_share(p: float, trials: float, level: float) -> tuple[float, float]:
    z = _z(level)
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def balanced_accuracy_interval(cm: np.ndarray, rng: np.random.Generator, level: float = 0.95,
                               n_draws: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Interval for balanced accuracy from the posterior of the mean per-class recall
    (Brodersen et al. 2010), each recall with its Jeffreys Beta(k + 1/2, n - k + 1/2)
    posterior, as the Jeffreys interval for one proportion (Brown, Cai and DasGupta 2001).

    Unlike a bootstrap it does not collapse when a model predicts one class almost always
    (recalls at 0 and 1 do not move under resampling). ``cm`` may be a stack (..., k, k) of
    confusion matrices; classes without images are left out, as in the point estimate.
    Returns (lower, upper) arrays of the stack's shape (0-d for one matrix).

    The posterior pulls a recall of 0 of 2 up to about 0.17, so with several tiny classes the
    posterior quantiles can miss the observed balanced accuracy itself (HAM10000: 0.156 with
    quantiles 0.172 to 0.408). An interval that excludes its own estimate contradicts the
    number printed beside it, so the interval is widened to reach the estimate, as Brown, Cai
    and DasGupta set the Jeffreys bound to 0 (or 1) when none (or all) succeed; widening only
    adds coverage.
    """
    cm = np.asarray(cm)
    support = cm.sum(axis=-1).astype(np.float64)
    hits = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    present = support > 0
    a = np.where(present, hits + 0.5, 1.0)
    b = np.where(present, support - hits + 0.5, 1.0)
    draws = rng.beta(a, b, size=(n_draws,) + a.shape)
    n_present = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(present, draws, 0.0).sum(axis=-1) / n_present
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.where(present, hits / np.maximum(support, 1), 0.0).sum(axis=-1) / n_present
    lo, hi = np.minimum(lo, observed), np.maximum(hi, observed)
    none = n_present == 0
    return np.where(none, np.nan, lo), np.where(none, np.nan, hi)


def confusion_resamples(labels: np.ndarray, preds: np.ndarray, n_classes: int, rng: np.random.Generator,
                        n_boot: int = 2000, clusters: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap confusion matrices, shape (n_boot, k, k), resampling images (or, with
    ``clusters``, whole clusters such as patients) with replacement and without strata, so
    the class mix varies between replicates as it does between samples of patients.

    A confusion-matrix statistic only sees how often each cell was drawn, so image resamples
    are multinomial draws over the cells and a cluster resample is how often each cluster was
    drawn times that cluster's confusion matrix: the same distribution as resampling indices, at a
    fraction of the cost.
    """
    labels, preds = np.asarray(labels), np.asarray(preds)
    k2 = n_classes * n_classes
    cell = labels * n_classes + preds
    if clusters is None:
        counts = np.bincount(cell, minlength=k2)
        return rng.multinomial(len(labels), counts / counts.sum(), size=n_boot).reshape(n_boot, n_classes, n_classes)
    _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(cluster_of.max()) + 1
    per_cluster = np.bincount(cluster_of * k2 + cell, minlength=n_clusters * k2).reshape(n_clusters, k2)
    out = np.empty((n_boot, k2), dtype=np.int64)
    chunk = max(1, 4_000_000 // max(n_clusters, 1))  # replicates per block: memory stays flat
    for start in range(0, n_boot, chunk):
        rows = min(n_boot, start + chunk) - start
        picks = rng.integers(0, n_clusters, size=(rows, n_clusters)) + n_clusters * np.arange(rows)[:, None]
        drawn = np.bincount(picks.ravel(), minlength=rows * n_clusters).reshape(rows, n_clusters)
        out[start:start + rows] = drawn @ per_cluster
    return out.reshape(n_boot, n_classes, n_classes)


def accuracy_of(cms: np.ndarray) -> np.ndarray:
    """Accuracy of each confusion matrix in a stack (..., k, k)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trace(cms, axis1=-2, axis2=-1) / cms.sum(axis=(-2, -1))


def balanced_accuracy_of(cms: np.ndarray) -> np.ndarray:
    """Balanced accuracy of each confusion matrix in a stack (..., k, k), over present classes."""
    support = cms.sum(axis=-1)
    hits = np.diagonal(cms, axis1=-2, axis2=-1)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / np.maximum(support, 1), 0.0)
        return recall.sum(axis=-1) / present.sum(axis=-1)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates; NaN when too few replicates are defined."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) < max(10, len(values) // 4):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))


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


def roc_points(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates, thresholds) of "score >= threshold".

    One point per distinct score, highest threshold first, starting at (0, 0): tied scores
    move the curve diagonally, as scikit-learn's ``roc_curve`` does.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class only: the undefined rates come back as NaN
        fpr, tpr, thresholds = skm.roc_curve(positive, scores, drop_intermediate=False)
    return fpr, tpr, thresholds


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum of precision x recall gain.

    Tied scores form one threshold (no interpolation), which is scikit-learn's
    ``average_precision_score``.
    """
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    return float(skm.average_precision_score(positive, np.asarray(scores, dtype=np.float64)))


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


def calibration_bin_index(confidence: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each confidence's bin: half-open [lo, hi), the last bin closed."""
    n_bins = len(edges) - 1
    return np.clip(np.searchsorted(edges, np.asarray(confidence, dtype=np.float64), side="right") - 1, 0, n_bins - 1)


def calibration_bins(confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: image count, mean confidence and mean outcome (NaN in empty bins)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    n_bins = len(edges) - 1
    idx = calibration_bin_index(confidence, edges)
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


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Mean over classes of the ECE of each class's probability against "is this class"."""
    edges = equal_width_edges(n_bins)
    return float(np.mean([expected_calibration_error(probs[:, k], labels == k, edges) for k in range(probs.shape[1])]))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error of the probability vector against the one-hot label.

    Summed over classes (range 0 to 2) for more than two classes; halved for two classes,
    where it equals the mean of (p(positive) - y)^2 (range 0 to 1), as scikit-learn reports it.
    """
    n_classes = probs.shape[1]
    if n_classes == 2:
        return float(skm.brier_score_loss(labels, probs[:, 1], labels=[0, 1]))
    return float(skm.brier_score_loss(labels, probs, labels=np.arange(n_classes), scale_by_half=False))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log softmax(logits)[label], from logits so that a near-zero probability stays finite."""
    z = np.asarray(logits, dtype=np.float64)
    zmax = z.max(axis=1, keepdims=True)
    log_norm = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))
