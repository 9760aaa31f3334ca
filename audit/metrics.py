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


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


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


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    rng: np.random.Generator,
    n_boot: int = 200,
    level: float = 0.95,
    strata: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` items.

    With ``strata`` the resampling keeps each stratum's size (for example each class), so
    a metric that needs every class present stays defined.
    """
    if n_boot <= 0 or n < 2:
        return float("nan"), float("nan")
    values = []
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)] if strata is not None else [np.arange(n)]
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        v = statistic(idx)
        if np.isfinite(v):
            values.append(v)
    if len(values) < max(10, n_boot // 4):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
