"""The vectorised per-group metric engine: every group's metrics from one pass of bincounts.

The bootstrap and the permutation test evaluate thousands of groupings, so nothing here
loops over groups: a grouping is an integer code per image, and a batch of groupings (one
per replicate or shuffle) is one large grouping whose group ``b * G + g`` is group g of
batch member b. AUROC comes in three variants of one Mann-Whitney rank sum: one grouping
(grouped_auroc), many groupings of resampled rows (batched_auroc), and one set of rows
under many relabellings (permuted_auroc).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcaudit.metrics import calibration_bin_index, equal_width_edges

GROUP_METRICS = ("accuracy", "balanced_accuracy", "auroc", "tpr", "fpr", "selection_rate", "ece")


@dataclass
class Outcomes:
    """Per-image quantities every group metric is built from, computed once per run."""

    labels: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    positives: list[int]
    n_classes: int
    n_bins: int

    def __post_init__(self):
        self.confidence = self.probs.max(axis=1)
        self.correct = (self.preds == self.labels).astype(np.float64)
        edges = equal_width_edges(self.n_bins)  # the calibration check's bins, assigned as calibration_bins does
        self.conf_bin = calibration_bin_index(self.confidence, edges)
        self.scored_classes = [1] if self.n_classes == 2 else list(range(self.n_classes))
        self._tie_ids: dict[int, np.ndarray] = {}

    def tie_ids(self, k: int) -> np.ndarray:
        """Per image, the rank of its class-k score among the distinct scores (ties share one)."""
        if k not in self._tie_ids:
            _, inverse = np.unique(self.probs[:, k], return_inverse=True)
            self._tie_ids[k] = inverse.astype(np.int64)
        return self._tie_ids[k]


def measure_groups(outcomes: Outcomes, rows: np.ndarray, codes: np.ndarray, n_groups: int, macro: bool,
                   auroc: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GROUP_METRICS per group (G, metrics) and per-positive-class (TPR, FPR, selection) rates (G, P, 3).

    ``rows`` index the images (repeats allowed, for the bootstrap) and ``codes`` give each
    one's group. Everything is counted with bincount so that all groups cost one pass; the
    bootstrap and the permutation test call this thousands of times. ``auroc`` (G,), when
    given, is used instead of computing the per-group AUROC here.
    """
    k_cls = outcomes.n_classes
    y, p = outcomes.labels[rows], outcomes.preds[rows]
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    correct = outcomes.correct[rows]
    joint = np.bincount((codes * k_cls + y) * k_cls + p, minlength=n_groups * k_cls * k_cls).reshape(n_groups, k_cls, k_cls)
    support = joint.sum(axis=2).astype(np.float64)  # images of each true class
    said = joint.sum(axis=1).astype(np.float64)  # images predicted as each class
    hits = np.diagonal(joint, axis1=1, axis2=2).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(codes, weights=correct, minlength=n_groups) / n
        recall = np.where(support > 0, hits / support, np.nan)
        bal = _row_nanmean(recall)  # mean recall over the classes present in the group
        pos = outcomes.positives
        tpr_k = recall[:, pos]
        negatives = n[:, None] - support[:, pos]
        fpr_k = np.where(negatives > 0, (said[:, pos] - hits[:, pos]) / negatives, np.nan)
        sel_k = said[:, pos] / n[:, None]
        tpr = _row_nanmean(tpr_k)
        fpr = _row_nanmean(fpr_k)
        selection = np.full(n_groups, np.nan) if macro else sel_k[:, 0]
        gb = codes * outcomes.n_bins + outcomes.conf_bin[rows]
        size = n_groups * outcomes.n_bins
        conf_sum = np.bincount(gb, weights=outcomes.confidence[rows], minlength=size).reshape(n_groups, outcomes.n_bins)
        correct_sum = np.bincount(gb, weights=correct, minlength=size).reshape(n_groups, outcomes.n_bins)
        ece = np.abs(correct_sum - conf_sum).sum(axis=1) / n
    if auroc is None:
        auroc = grouped_auroc(outcomes, rows, codes, n_groups, support)
    values = np.stack([accuracy, bal, auroc, tpr, fpr, selection, ece], axis=1)
    rates = np.stack([tpr_k, fpr_k, sel_k], axis=2)
    return values, rates


def _row_nanmean(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    count = finite.sum(axis=1)
    return np.where(count > 0, np.where(finite, x, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


def grouped_auroc(outcomes: Outcomes, rows: np.ndarray, codes: np.ndarray, n_groups: int,
                  support: np.ndarray) -> np.ndarray:
    """Per group, macro one-vs-rest AUROC over the classes present (two classes: the second
    class's score), via the Mann-Whitney U with ties counted one half."""
    per = np.full((n_groups, len(outcomes.scored_classes)), np.nan)
    y = outcomes.labels[rows]
    starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=n_groups))[:-1]])
    for j, k in enumerate(outcomes.scored_classes):
        score = outcomes.probs[rows, k]
        order = np.lexsort((score, codes))
        g_sorted, s_sorted = codes[order], score[order]
        new_run = np.ones(len(order), dtype=bool)
        new_run[1:] = (g_sorted[1:] != g_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
        run_id = np.cumsum(new_run) - 1
        run_start = np.flatnonzero(new_run)
        run_end = np.append(run_start[1:], len(order))
        # average 1-based rank of a tie run, counted from the start of its group
        run_rank = (run_start + run_end + 1) / 2.0 - starts[g_sorted[run_start]]
        ranks = run_rank[run_id]
        is_pos = (y[order] == k).astype(np.float64)
        n_pos = support[:, k]
        n_neg = np.bincount(codes, minlength=n_groups) - n_pos
        rank_sum = np.bincount(g_sorted, weights=ranks * is_pos, minlength=n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            per[:, j] = np.where((n_pos > 0) & (n_neg > 0), (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), np.nan)
    return _row_nanmean(per)


def batched_auroc(outcomes: Outcomes, rows: np.ndarray, keys: np.ndarray, total: int) -> np.ndarray:
    """grouped_auroc of many groupings at once: image ``rows[i]`` (repeats allowed) is in group
    ``keys[i]`` of ``total``, e.g. replicate * G + group. Returns (total,).

    A stable sort by score (tie ids precomputed per class), then one by group key, both radix
    sorts, lines up every group in score order; the rank sums then follow as in grouped_auroc,
    for all groups in one pass. permuted_auroc is the faster special case of one set of
    rows under many labellings, used by the permutation test.
    """
    y = outcomes.labels[rows]
    per = np.full((total, len(outcomes.scored_classes)), np.nan)
    keys = keys.astype(np.int64)
    for j, k in enumerate(outcomes.scored_classes):
        tie = outcomes.tie_ids(k)[rows]
        by_score = _stable_order(tie)
        by_group = by_score[_stable_order(keys[by_score])]
        per[:, j] = _auroc_of_sorted_groups(keys[by_group], tie[by_group], y[by_group] == k, total)
    return _row_nanmean(per)


def _stable_order(values: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integers below 2**32, as radix passes on 16-bit digits
    (numpy radix-sorts 16-bit keys; larger integer keys would take a comparison sort)."""
    if len(values) == 0 or values.max() < 2**16:
        return np.argsort(values.astype(np.uint16), kind="stable")
    by_low = np.argsort((values & 0xFFFF).astype(np.uint16), kind="stable")
    return by_low[np.argsort((values[by_low] >> 16).astype(np.uint16), kind="stable")]


def permuted_auroc(outcomes: Outcomes, rows: np.ndarray, perm_codes: np.ndarray, n_groups: int) -> np.ndarray:
    """grouped_auroc for the same images under P relabellings ``perm_codes`` (P, n): (P, G).

    Only the group labels move between permutations, so the scores are sorted once; a stable
    sort on the small integer group keys (a radix sort in numpy) then lines up every
    (permutation, group) in score order, and the rank sums follow as in grouped_auroc.
    """
    n_perm, n = perm_codes.shape
    y = outcomes.labels[rows]
    total = n_perm * n_groups
    per = np.full((total, len(outcomes.scored_classes)), np.nan)
    flat = np.arange(n_perm)[:, None] * n_groups + perm_codes
    key_type = np.int16 if total < 2**15 else np.int32
    for j, k in enumerate(outcomes.scored_classes):
        score = outcomes.probs[rows, k]
        order = np.argsort(score, kind="stable")
        s_sorted = score[order]
        new_tie = np.ones(n, dtype=bool)
        new_tie[1:] = s_sorted[1:] != s_sorted[:-1]
        tie_of = np.cumsum(new_tie)
        keys = flat[:, order].ravel().astype(key_type)
        by_group = np.argsort(keys, kind="stable")
        per[:, j] = _auroc_of_sorted_groups(keys[by_group].astype(np.int64), np.tile(tie_of, n_perm)[by_group],
                                            np.tile(y[order] == k, n_perm)[by_group], total)
    return _row_nanmean(per).reshape(n_perm, n_groups)


def _auroc_of_sorted_groups(g_sorted: np.ndarray, tie_sorted: np.ndarray, is_pos: np.ndarray, total: int) -> np.ndarray:
    """Per group of ``total``, the AUROC of items sorted by group, then score (``tie_sorted``
    equal exactly within ties): Mann-Whitney U from average within-group ranks, ties one half."""
    g_sorted = g_sorted.astype(np.int64)
    new_run = np.ones(len(g_sorted), dtype=bool)
    new_run[1:] = (g_sorted[1:] != g_sorted[:-1]) | (tie_sorted[1:] != tie_sorted[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], len(g_sorted))
    counts = np.bincount(g_sorted, minlength=total)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # average 1-based rank of a tie run, counted from the start of its group
    ranks = ((run_start + run_end + 1) / 2.0 - starts[g_sorted[run_start]])[run_id]
    n_pos = np.bincount(g_sorted, weights=is_pos, minlength=total)
    n_neg = counts - n_pos
    rank_sum = np.bincount(g_sorted, weights=ranks * is_pos, minlength=total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), np.nan)


def permuted_values(outcomes: Outcomes, rows: np.ndarray, perm_codes: np.ndarray, n_groups: int, macro: bool) -> np.ndarray:
    """GROUP_METRICS (P, G, metrics) of the same images under P relabellings, in one pass:
    permutation p's group g becomes group p * G + g of one large grouping."""
    n_perm = len(perm_codes)
    flat_codes = (np.arange(n_perm)[:, None] * n_groups + perm_codes).ravel()
    auroc = permuted_auroc(outcomes, rows, perm_codes, n_groups).ravel()
    values, _ = measure_groups(outcomes, np.tile(rows, n_perm), flat_codes, n_perm * n_groups, macro, auroc=auroc)
    return values.reshape(n_perm, n_groups, -1)


def spread_over_groups(values: np.ndarray) -> np.ndarray:
    """Largest minus smallest finite value over the groups (axis 1); NaN with fewer than two."""
    finite = np.isfinite(values)
    hi = np.where(finite, values, -np.inf).max(axis=1)
    lo = np.where(finite, values, np.inf).min(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(finite.sum(axis=1) >= 2, hi - lo, np.nan)


def gap_statistics(values: np.ndarray, rates: np.ndarray, overall_auroc: float) -> dict[str, float]:
    """Gaps among the groups given: values (G, metrics) and rates (G, positives, 3)."""
    out = {}
    for m, column in zip(GROUP_METRICS, values.T):
        finite = column[np.isfinite(column)]
        if len(finite) >= 2:
            hi, lo = finite.max(), finite.min()
            out[f"{m}_gap"] = float(hi - lo)
            out[f"{m}_ratio"] = float(lo / hi) if hi > 0 else 1.0
        else:
            out[f"{m}_gap"] = out[f"{m}_ratio"] = float("nan")
    per_class_gap = np.full((rates.shape[1], 3), np.nan)
    for j in range(rates.shape[1]):
        for r in range(3):
            finite = rates[:, j, r][np.isfinite(rates[:, j, r])]
            if len(finite) >= 2:
                per_class_gap[j, r] = finite.max() - finite.min()
    with np.errstate(all="ignore"):
        out["dp_difference"] = _nanmax(per_class_gap[:, 2])
        out["eop_difference"] = _nanmax(per_class_gap[:, 0])
        out["eo_difference"] = _nanmax(np.concatenate([per_class_gap[:, 0], per_class_gap[:, 1]]))
    acc = values[:, 0]
    out["worst_group_accuracy"] = float(np.nanmin(acc)) if np.isfinite(acc).any() else float("nan")
    auc = values[:, GROUP_METRICS.index("auroc")]
    auc = auc[np.isfinite(auc)]
    out["es_auroc"] = float(overall_auroc / (1 + np.abs(auc - overall_auroc).sum())) if len(auc) and np.isfinite(overall_auroc) else float("nan")
    out["largest_gap"] = _nanmax(np.array([out[f"{m}_gap"] for m in GROUP_METRICS]))
    return out


def _nanmax(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.max()) if len(x) else float("nan")


GAP_KEYS = [f"{m}_gap" for m in GROUP_METRICS] + [f"{m}_ratio" for m in GROUP_METRICS] + [
    "dp_difference", "eo_difference", "eop_difference", "worst_group_accuracy", "es_auroc", "largest_gap"]


def group_counts(outcomes: Outcomes, codes: np.ndarray, n_groups: int, macro: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(successes, trials) per group of each proportion that has a Wilson interval."""
    keep = codes >= 0
    rows = np.flatnonzero(keep)
    c = codes[keep]
    n = np.bincount(c, minlength=n_groups)
    out = {"accuracy": (np.bincount(c, weights=outcomes.correct[rows], minlength=n_groups).round().astype(int), n)}
    if not macro:
        k = outcomes.positives[0]
        is_pos, said = outcomes.labels[rows] == k, outcomes.preds[rows] == k
        support = np.bincount(c, weights=is_pos, minlength=n_groups).astype(int)
        hits = np.bincount(c, weights=is_pos & said, minlength=n_groups).astype(int)
        false = np.bincount(c, weights=~is_pos & said, minlength=n_groups).astype(int)
        out["tpr"] = (hits, support)
        out["fpr"] = (false, n - support)
        out["selection_rate"] = (hits + false, n)
    return out



def pooled_auroc(outcomes: Outcomes, rows: np.ndarray) -> float:
    """grouped_auroc of ``rows`` taken as one group (the overall value behind ES-AUROC)."""
    support = np.bincount(outcomes.labels[rows], minlength=outcomes.n_classes).astype(np.float64)[None, :]
    return float(grouped_auroc(outcomes, rows, np.zeros(len(rows), dtype=np.int64), 1, support)[0])
