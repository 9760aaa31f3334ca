"""How sure the gaps are: one bootstrap shared by all columns (per-group percentile intervals
and simultaneous max-|t| bands for the gaps), the permutation test of the largest gap, and
Holm's adjustment over the columns."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from mcaudit.metrics import percentile_interval, wilson_interval

from .columns import ColumnResult
from .engine import GROUP_METRICS, Outcomes, batched_auroc, measure_groups, permuted_values, spread_over_groups
from .settings import Settings

# Gaps that get a 95% interval. ECE per group is the plain binned ECE, biased upwards by a
# different amount in groups of different size, so its gap has none; nor do the ratios,
# es_auroc and largest_gap, whose intervals nobody has checked.
INTERVAL_GAPS = ("accuracy", "balanced_accuracy", "auroc", "tpr", "fpr", "selection_rate")
# The rates behind each disparity difference: (TPR, FPR, selection) columns of ``rates``.
DIFFERENCE_RATES = {"dp_difference": (2,), "eop_difference": (0,), "eo_difference": (0, 1)}


class Replicates(NamedTuple):
    """One column's bootstrap: GROUP_METRICS (B, G, metrics) and rates (B, G, positives, 3)."""

    values: np.ndarray
    rates: np.ndarray


def resample_chunks(n: int, clusters: np.ndarray | None, rng: np.random.Generator,
                    n_boot: int) -> Iterator[list[np.ndarray]]:
    """Bootstrap replicates (index arrays over the n images) in chunks of about a million
    images. With ``clusters`` whole clusters (subjects) are drawn, so replicate lengths vary."""
    if clusters is None:
        order, starts, lens = None, None, None
    else:
        _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
        order = np.argsort(cluster_of, kind="stable")
        lens = np.bincount(cluster_of)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    chunk = max(1, min(64, 1_000_000 // max(1, n)))
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        if order is None:
            yield [rng.integers(0, n, n) for _ in range(size)]
        else:
            out = []
            for _ in range(size):
                drawn = rng.integers(0, len(lens), len(lens))
                drawn_lens = lens[drawn]
                offsets = (np.repeat(starts[drawn] - np.concatenate([[0], np.cumsum(drawn_lens)[:-1]]), drawn_lens)
                           + np.arange(drawn_lens.sum()))
                out.append(order[offsets])
            yield out
        done += size


def bootstrap_columns(outcomes: Outcomes, columns: list[ColumnResult], settings: Settings, rng: np.random.Generator,
                      clusters: np.ndarray | None) -> list[Replicates]:
    """Per column, its Replicates over the same bootstrap replicates of the images, so that
    maxima over columns have intervals too (empty when the bootstrap is off).

    Images (or subjects) are resampled from the whole audit, not within groups or classes:
    group sizes and class mixes vary between replicates as they do between samples of
    patients. Replicate b's group g becomes group b * G + g of one large grouping.
    """
    if settings.n_bootstrap <= 0:
        return []
    collected = [([], []) for _ in columns]
    for replicates in resample_chunks(len(outcomes.labels), clusters, rng, settings.n_bootstrap):
        size = len(replicates)
        rows = np.concatenate(replicates)
        replicate_of = np.repeat(np.arange(size), [len(r) for r in replicates])
        for (values_acc, rates_acc), column in zip(collected, columns):
            n_groups = len(column.grouping.names)
            code = column.grouping.codes[rows]
            keep = code >= 0
            keys = replicate_of[keep] * n_groups + code[keep]
            auroc = batched_auroc(outcomes, rows[keep], keys, size * n_groups)
            values, rates = measure_groups(outcomes, rows[keep], keys, size * n_groups, settings.macro, auroc=auroc)
            values_acc.append(values.reshape(size, n_groups, -1))
            rates_acc.append(rates.reshape(size, n_groups, *rates.shape[1:]))
    return [Replicates(np.concatenate(v), np.concatenate(r)) for v, r in collected]


def simultaneous_halfwidths(observed: np.ndarray, replicates: np.ndarray, level: float = 0.95) -> np.ndarray | None:
    """Half-widths c * se_i such that observed_i +/- c * se_i hold for every i together in
    ``level`` of the bootstrap replicates (the max-|t| band; se_i is the bootstrap spread).
    ``observed`` (P,), ``replicates`` (B, P). None when too few replicates are usable (the
    same rule as metrics.percentile_interval)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        finite = np.isfinite(replicates)
        usable = finite.sum(axis=0)
        need = max(10, len(replicates) // 4)
        if (usable < need).any():
            return None
        se = np.nanstd(replicates, axis=0)
        deviation = np.abs(replicates - observed[None, :])
        t = np.where(finite, np.where(se > 0, deviation / np.where(se > 0, se, 1.0), 0.0), -np.inf).max(axis=1)
    t = t[np.isfinite(t)]
    if len(t) < need:
        return None
    return float(np.quantile(t, level)) * se


def _band(observed: np.ndarray, replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The defined columns' values and their simultaneous half-widths, or None."""
    keep = np.isfinite(observed)
    if keep.sum() == 0:
        return None
    observed, replicates = observed[keep], replicates[:, keep]
    half = simultaneous_halfwidths(observed, replicates)
    return None if half is None else (observed, half)


def max_difference_interval(observed: np.ndarray, replicates: np.ndarray) -> tuple[float, float]:
    """95% interval of the largest |difference| over contrasts (columns), from their bootstrap
    replicates: every contrast's simultaneous interval holds, so the largest true |difference|
    is at least the largest lower end and at most the largest upper end."""
    band = _band(observed, replicates)
    if band is None:
        return float("nan"), float("nan")
    size, half = np.abs(band[0]), band[1]
    return float(max(0.0, (size - half).max())), float((size + half).max())


def min_value_interval(observed: np.ndarray, replicates: np.ndarray) -> tuple[float, float]:
    """95% interval of the smallest value over groups (columns), from a simultaneous band."""
    band = _band(observed, replicates)
    if band is None:
        return float("nan"), float("nan")
    observed, half = band
    return float((observed - half).min()), float((observed + half).min())


def pairwise(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Differences between every pair of the given groups along the last axis."""
    i, j = np.triu_indices(len(groups), 1)
    return values[..., groups[i]] - values[..., groups[j]]


def contrasts(column: ColumnResult, key: str, values: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """The pairwise differences behind gap ``key`` for observed (G, ...) or replicated
    (B, G, ...) values: the largest of them, in absolute value, is the gap."""
    groups = column.compared
    if key.endswith("_gap"):
        return pairwise(values[..., GROUP_METRICS.index(key[:-4])], groups)
    if key in DIFFERENCE_RATES:
        parts = [pairwise(rates[..., j, r], groups) for r in DIFFERENCE_RATES[key] for j in range(rates.shape[-2])]
        return np.concatenate(parts, axis=-1) if parts else np.zeros(values.shape[:-2] + (0,))
    raise KeyError(key)


def gap_intervals(column: ColumnResult, boot: Replicates | None) -> dict[str, tuple[float, float]]:
    """95% intervals of the column's gaps and of its worst-group accuracy (finite ones only)."""
    if boot is None or column.in_gaps.sum() < 2:
        return {}
    out = {}
    for key in [f"{m}_gap" for m in INTERVAL_GAPS] + list(DIFFERENCE_RATES):
        if not np.isfinite(column.gaps.get(key, float("nan"))):
            continue
        out[key] = max_difference_interval(contrasts(column, key, column.values, column.rates),
                                           contrasts(column, key, boot.values, boot.rates))
    groups = column.compared
    out["worst_group_accuracy"] = min_value_interval(column.values[groups, 0], boot.values[:, groups, 0])
    return {k: v for k, v in out.items() if np.isfinite(v[0])}


def value_intervals(column: ColumnResult, boot: Replicates | None) -> np.ndarray:
    """(G, metrics, 2): Wilson for proportions with counts, bootstrap percentiles otherwise."""
    ci = np.full(column.values.shape + (2,), np.nan)
    for m, (successes, trials) in column.counts.items():
        j = GROUP_METRICS.index(m)
        for g in range(len(trials)):
            if trials[g] > 0:
                lo, hi = wilson_interval(int(successes[g]), int(trials[g]))
                # rounding leaves ~1e-17 at 0 of n; the exact end is 0 (and 1 at n of n)
                ci[g, j] = (0.0 if successes[g] == 0 else lo, 1.0 if successes[g] == trials[g] else hi)
    if boot is not None:
        for j, m in enumerate(GROUP_METRICS):
            if m in column.counts or m == "ece":
                continue
            for g in range(boot.values.shape[1]):
                if np.isfinite(column.values[g, j]):
                    ci[g, j] = percentile_interval(boot.values[:, g, j])
    return ci


def permutation_test(outcomes: Outcomes, codes: np.ndarray, in_gaps: np.ndarray, settings: Settings,
                     rng: np.random.Generator, observed_gaps: dict[str, float],
                     clusters: np.ndarray | None = None) -> tuple[dict[str, float], float]:
    """Per-metric p-values of the gaps and the p-value of the largest gap, from shuffling the
    group labels among the images of the compared groups (``in_gaps``) and recomputing.

    The statistic of the headline p-value is the largest gap over the metrics, recomputed the
    same way under every shuffle, so choosing the largest after the fact is accounted for.
    With ``clusters`` (subjects) whose images share one group, whole subjects' labels are
    shuffled, as the exchangeable units are patients, not images. Shuffles are drawn one by
    one from ``rng`` and evaluated in chunks (permuted_values).
    """
    keys = [f"{m}_gap" for m in GROUP_METRICS]
    observed = np.array([observed_gaps[k] for k in keys])
    if settings.n_permutations <= 0 or in_gaps.sum() < 2 or not np.isfinite(observed).any():
        return {}, float("nan")
    compared = np.flatnonzero(in_gaps)
    rows = np.flatnonzero(np.isin(codes, compared))
    position = np.full(codes.max() + 1, -1, dtype=np.int64)
    position[compared] = np.arange(len(compared))
    labels_of_rows = position[codes[rows]]
    subject_of, subject_label = _subjects_within_one_group(clusters, rows, labels_of_rows)
    exceed = np.zeros(len(keys))
    exceed_max = 0
    observed_max = np.nanmax(observed)
    # chunks of about a million images in all keep the working arrays small
    chunk = max(1, min(128, 1_000_000 // max(1, len(rows))))
    done = 0
    while done < settings.n_permutations:
        size = min(chunk, settings.n_permutations - done)
        if subject_of is None:
            shuffled = np.stack([rng.permutation(labels_of_rows) for _ in range(size)])
        else:
            shuffled = np.stack([rng.permutation(subject_label)[subject_of] for _ in range(size)])
        stat = spread_over_groups(permuted_values(outcomes, rows, shuffled, len(compared), settings.macro))  # (size, metrics)
        with np.errstate(invalid="ignore"):
            # a tiny tolerance so that floating-point noise on equal gaps counts as "as large"
            exceed += (stat >= observed - 1e-12).sum(axis=0)
            exceed_max += int((np.where(np.isfinite(stat), stat, -np.inf).max(axis=1) >= observed_max - 1e-12).sum())
        done += size
    p = (exceed + 1) / (settings.n_permutations + 1)
    gap_p = {k: float(v) for k, v, ob in zip(keys, p, observed) if np.isfinite(ob)}
    return gap_p, float((exceed_max + 1) / (settings.n_permutations + 1))


def _subjects_within_one_group(clusters: np.ndarray | None, rows: np.ndarray,
                               labels_of_rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each row's subject and each subject's group label, when every subject's images share
    one group; (None, None) otherwise (e.g. an age band by visit), and images are shuffled."""
    if clusters is None:
        return None, None
    _, subject_of = np.unique(np.asarray(clusters)[rows], return_inverse=True)
    subject_label = np.zeros(subject_of.max() + 1, dtype=np.int64)
    subject_label[subject_of] = labels_of_rows
    if not np.array_equal(subject_label[subject_of], labels_of_rows):
        return None, None
    return subject_of, subject_label


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment over the finite p-values (NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="mergesort")]
    m, running = len(order), 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out.tolist()
