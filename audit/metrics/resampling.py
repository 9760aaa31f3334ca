"""Bootstraps, written by hand because the libraries resample one replicate at a time: the
percentile bootstrap over items, strata or whole clusters (patients); stacks of thousands of
resampled confusion matrices drawn at once; and the AUROC of many resamples from one sort."""

from __future__ import annotations

from typing import Callable

import numpy as np


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
