"""Subgroup fairness: is the model as good for every group of patients?

For every subgroup column the user names (``--group``) and every intersection of two, the
check measures each group from the shared forward pass (no image is encoded again), the gaps
between groups, how sure those gaps are (bootstrap intervals that resample images within
each group and class) and whether the largest could be chance (a permutation test that
shuffles the group labels).

Metric names (flat, so that gates can read them):

* ``<column>.<metric>_gap``: largest minus smallest group value, and ``<column>.<metric>_ratio``:
  smallest over largest, for accuracy, balanced_accuracy, auroc, tpr, fpr, selection_rate, ece.
* ``<column>.dp_difference``, ``.eo_difference``, ``.eop_difference``: demographic parity,
  equalized odds and equal opportunity differences (fairlearn's definitions).
* ``<column>.worst_group_accuracy``, ``<column>.es_auroc``, ``<column>.largest_gap``,
  ``<column>.p_value`` (permutation p-value of the largest gap), ``<column>.p_value_holm``.
* Across columns: ``worst_group_accuracy``, ``max_accuracy_gap``, ``max_dp_difference``,
  ``max_eo_difference``, ``min_p_value_holm``.

An intersection column is named ``a&b`` and its groups ``x&y``. Per-group values (with
their intervals) are in the tables and in ``details``.

Positive class: two classes -> the ``positive_class`` parameter (default the second class),
and TPR, FPR and selection rate are those of that class. More classes -> the named class
against the rest, or, when none is named, TPR and FPR are averaged over the classes and the
disparity differences take the worst class (selection rate averaged over all classes is
always 1/K, so it is not reported then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl

GROUP_METRICS = ("accuracy", "balanced_accuracy", "auroc", "tpr", "fpr", "selection_rate", "ece")
METRIC_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auroc": "AUROC",
    "tpr": "true positive rate", "fpr": "false positive rate", "selection_rate": "selection rate",
    "ece": "calibration error (ECE)",
}
MISSING = "(missing)"
MISSING_TOKENS = {"", "nan", "none", "na", "n/a", "null", "unknown", "?"}


class FairnessCheck(Check):
    name = "fairness"
    description = (
        "Per-subgroup performance (each --group column and each pair of them): accuracy, balanced "
        "accuracy, AUROC, true/false positive rates, selection rate and calibration per group; the gaps "
        "between groups with bootstrap intervals, and a permutation test of whether the largest gap "
        "could be chance."
    )
    params = {
        "positive_class": Param("", "class whose true/false positive and selection rates are compared (default: the second class for two classes; averaged over classes for more)"),
        "min_group_size": Param(20, "groups with fewer images are shown but left out of the gaps"),
        "quantile_bins": Param(4, "numeric columns (e.g. age) are cut into this many quantile groups"),
        "bin_edges": Param([], "explicit cut points for numeric columns, e.g. \"age=50,65,80\" (a list for several columns)"),
        "intersections": Param(True, "also compare intersections of two columns (e.g. site&sex)"),
        "n_bootstrap": Param(200, "bootstrap resamples for the 95% intervals (0 turns them off)"),
        "n_permutations": Param(1000, "group-label permutations for the p-value of the largest gap (0 turns it off)"),
        "alpha": Param(0.05, "significance level for calling a gap significant (Holm-adjusted across columns)"),
        "n_bins": Param(15, "confidence bins for the per-group ECE"),
    }
    metrics = {
        "<column>.<metric>_gap": "largest minus smallest group value of <metric> (accuracy, balanced_accuracy, auroc, tpr, fpr, selection_rate, ece) among groups large enough",
        "<column>.<metric>_ratio": "smallest over largest group value of <metric> (1 is parity; 0.8 is the 'four-fifths rule')",
        "<column>.dp_difference": "demographic parity difference: largest gap in the share predicted positive",
        "<column>.eo_difference": "equalized odds difference: the larger of the TPR gap and the FPR gap",
        "<column>.eop_difference": "equal opportunity difference: the TPR gap",
        "<column>.worst_group_accuracy": "accuracy of the worst group in the column",
        "<column>.es_auroc": "equity-scaled AUROC: overall AUROC / (1 + sum over groups of |group AUROC - overall AUROC|) (FairCLIP)",
        "<column>.largest_gap": "the largest of the <metric>_gap values",
        "<column>.p_value": "permutation p-value of the largest gap (the maximum over metrics is the test statistic, so picking the largest is accounted for)",
        "<column>.p_value_holm": "p_value adjusted (Holm) for the number of columns tested",
        "<column>.n_groups": "groups large enough to enter the gaps",
        "worst_group_accuracy": "lowest accuracy of any group (large enough) in any column",
        "max_accuracy_gap": "largest accuracy gap over the columns",
        "max_dp_difference": "largest demographic parity difference over the columns",
        "max_eo_difference": "largest equalized odds difference over the columns",
        "min_p_value_holm": "smallest Holm-adjusted p-value over the columns",
    }
    # Accuracy within 10 points across groups; error rates (TPR, FPR) within 20 points, a
    # common tolerance for equalized odds in clinical fairness audits.
    default_thresholds = {"max_accuracy_gap": "<= 0.1", "max_eo_difference": "<= 0.2"}

    def run(self, ctx, params):
        columns = list(ctx.group_columns)
        if not columns:
            return CheckResult.skipped("no subgroup columns: name them with --group (e.g. --group sex --group age)")
        if len(ctx.classes) < 2:
            return CheckResult.skipped("fairness needs at least two classes")
        settings = Settings.from_params(params, ctx.classes, columns)
        fwd = ctx.forward
        outcomes = Outcomes(fwd.labels, fwd.preds, fwd.probs, settings.positives, len(ctx.classes), settings.n_bins)

        base = {c: group_column(ctx.group_values(c), c, settings) for c in columns}
        compared = list(base.items())
        if settings.intersections:
            compared += [(f"{a}&{b}", intersect(base[a], base[b])) for i, a in enumerate(columns) for b in columns[i + 1:]]

        warnings: list[str] = []
        audits = []
        for name, grouping in compared:
            audit = audit_column(outcomes, name, grouping, settings, ctx.rng(f"fairness:{name}"))
            audits.append(audit)
            warnings.extend(audit.warnings)
        holm = holm_adjust([a.p_value for a in audits])
        for audit, p in zip(audits, holm):
            audit.p_value_holm = p

        metrics, intervals = flat_metrics(audits)
        tables = [overview_table(audits, settings)]
        figures = []
        for audit in audits:
            tables += [group_table(audit, settings), gap_table(audit)]
            figures.append(group_figure(audit, settings))
        return CheckResult(
            metrics=metrics, intervals=intervals, summary=summarise(audits, settings),
            tables=tables, figures=figures, warnings=warnings,
            details={
                "positive_class": settings.positive_label,
                "columns": {a.name: a.details() for a in audits},
            },
        )


@dataclass
class Settings:
    positives: list[int]
    positive_label: str
    macro: bool
    min_group_size: int
    quantile_bins: int
    edges: dict[str, list[float]]
    intersections: bool
    n_bootstrap: int
    n_permutations: int
    alpha: float
    n_bins: int

    @classmethod
    def from_params(cls, params, classes: list[str], columns: list[str]) -> "Settings":
        pos = params["positive_class"]
        if pos and pos not in classes:
            raise InputError(f"fairness.positive_class={pos!r}: not a class (classes: {', '.join(classes)})")
        if pos:
            positives, label, macro = [classes.index(pos)], pos, False
        elif len(classes) == 2:
            positives, label, macro = [1], classes[1], False
        else:
            positives, label, macro = list(range(len(classes))), "each class (averaged)", True
        for key in ("min_group_size", "n_bins", "quantile_bins"):
            if params[key] < (2 if key != "min_group_size" else 1):
                raise InputError(f"fairness.{key}={params[key]}: too small")
        for key in ("n_bootstrap", "n_permutations"):
            if params[key] < 0:
                raise InputError(f"fairness.{key}={params[key]}: must be 0 or more")
        if not 0 < params["alpha"] < 1:
            raise InputError(f"fairness.alpha={params['alpha']}: must be between 0 and 1")
        return cls(positives, label, macro, params["min_group_size"], params["quantile_bins"],
                   parse_edges(params["bin_edges"], columns), params["intersections"],
                   params["n_bootstrap"], params["n_permutations"], params["alpha"], params["n_bins"])


def parse_edges(items, columns: list[str]) -> dict[str, list[float]]:
    out = {}
    for item in items:
        col, sep, raw = str(item).partition("=")
        col = col.strip()
        where = f"fairness.bin_edges {item!r}"
        if not sep or not col:
            raise InputError(f"{where}: expected COLUMN=EDGE,EDGE,... such as age=50,65,80")
        if col not in columns:
            raise InputError(f"{where}: {col!r} is not a --group column ({', '.join(columns)})")
        try:
            edges = [float(x) for x in raw.replace(";", ",").split(",") if x.strip()]
        except ValueError:
            raise InputError(f"{where}: the edges must be numbers") from None
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
            raise InputError(f"{where}: give one or more increasing numbers")
        out[col] = edges
    return out


@dataclass
class Grouping:
    """Each row's group as an index into ``names``, -1 for a missing value."""

    codes: np.ndarray
    names: list[str]
    binned: str = ""  # how a numeric column was cut, for the table note


def group_column(values: np.ndarray, column: str, settings: Settings) -> Grouping:
    text = np.array([str(v).strip() for v in values], dtype=object)
    missing = np.array([t.lower() in MISSING_TOKENS for t in text])
    numbers = _as_numbers(text[~missing])
    given = settings.edges.get(column)
    if given is not None and numbers is None:
        raise InputError(f"fairness.bin_edges: column {column!r} is not numeric")
    distinct = np.unique(text[~missing])
    if numbers is not None and (given is not None or len(distinct) > settings.quantile_bins):
        return bin_numeric(text, missing, numbers, given, settings.quantile_bins)
    if numbers is not None:  # a few numeric codes: order them as numbers, not as text
        distinct = sorted(distinct, key=float)
    names = list(distinct)
    lookup = {n: i for i, n in enumerate(names)}
    codes = np.array([-1 if m else lookup[t] for t, m in zip(text, missing)], dtype=np.int64)
    return Grouping(codes, names)


def _as_numbers(text: np.ndarray) -> np.ndarray | None:
    try:
        out = np.array([float(t) for t in text], dtype=np.float64)
    except ValueError:
        return None
    return out if len(out) and np.isfinite(out).all() else None


def bin_numeric(text, missing, numbers, given, n_quantiles) -> Grouping:
    if given is not None:
        cuts, how = np.asarray(given, dtype=np.float64), "cut at the given edges"
    else:
        cuts = np.unique(np.quantile(numbers, np.linspace(0, 1, n_quantiles + 1)[1:-1]))
        how = f"cut at its {n_quantiles}-quantiles"
    names = [f"<{_num(cuts[0])}"] + [f"{_num(a)}-{_num(b)}" for a, b in zip(cuts, cuts[1:])] + [f">={_num(cuts[-1])}"]
    codes = np.full(len(text), -1, dtype=np.int64)
    codes[~missing] = np.searchsorted(cuts, numbers, side="right")
    used = sorted(set(codes[codes >= 0].tolist()))
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    codes = np.where(codes >= 0, remap[np.maximum(codes, 0)], -1)
    return Grouping(codes, [names[i] for i in used], f"{how} ({', '.join(_num(c) for c in cuts)}); a-b means from a up to, not including, b")


def _num(x: float) -> str:
    return f"{x:.4g}"


def intersect(a: Grouping, b: Grouping) -> Grouping:
    both = (a.codes >= 0) & (b.codes >= 0)
    combined = np.where(both, a.codes * len(b.names) + b.codes, -1)
    present = sorted(set(combined[both].tolist()))
    lookup = {c: i for i, c in enumerate(present)}
    codes = np.array([lookup.get(c, -1) for c in combined], dtype=np.int64)
    names = [f"{a.names[c // len(b.names)]}&{b.names[c % len(b.names)]}" for c in present]
    return Grouping(codes, names)


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
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)  # the calibration check's equal-width bins
        self.conf_bin = np.clip(np.searchsorted(edges, self.confidence, side="right") - 1, 0, self.n_bins - 1)
        self.scored_classes = [1] if self.n_classes == 2 else list(range(self.n_classes))
        self._tie_ids: dict[int, np.ndarray] = {}

    def tie_ids(self, k: int) -> np.ndarray:
        """Per image, the rank of its class-k score among the distinct scores (ties share one)."""
        if k not in self._tie_ids:
            distinct, inverse = np.unique(self.probs[:, k], return_inverse=True)
            self._tie_ids[k] = inverse.astype(np.int64)
        return self._tie_ids[k]


def measure_groups(o: Outcomes, rows: np.ndarray, codes: np.ndarray, n_groups: int, macro: bool,
                   auroc: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GROUP_METRICS per group (G, metrics) and per-positive-class (TPR, FPR, selection) rates (G, P, 3).

    ``rows`` index the images (repeats allowed, for the bootstrap) and ``codes`` give each
    one's group. Everything is counted with bincount so that all groups cost one pass; the
    bootstrap and the permutation test call this thousands of times. ``auroc`` (G,), when
    given, is used instead of computing the per-group AUROC here.
    """
    k_cls = o.n_classes
    y, p = o.labels[rows], o.preds[rows]
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    correct = o.correct[rows]
    joint = np.bincount((codes * k_cls + y) * k_cls + p, minlength=n_groups * k_cls * k_cls).reshape(n_groups, k_cls, k_cls)
    support = joint.sum(axis=2).astype(np.float64)  # images of each true class
    said = joint.sum(axis=1).astype(np.float64)  # images predicted as each class
    hits = np.diagonal(joint, axis1=1, axis2=2).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(codes, weights=correct, minlength=n_groups) / n
        recall = np.where(support > 0, hits / support, np.nan)
        bal = _row_nanmean(recall)  # mean recall over the classes present in the group
        pos = o.positives
        tpr_k = recall[:, pos]
        negatives = n[:, None] - support[:, pos]
        fpr_k = np.where(negatives > 0, (said[:, pos] - hits[:, pos]) / negatives, np.nan)
        sel_k = said[:, pos] / n[:, None]
        tpr = _row_nanmean(tpr_k)
        fpr = _row_nanmean(fpr_k)
        selection = np.full(n_groups, np.nan) if macro else sel_k[:, 0]
        gb = codes * o.n_bins + o.conf_bin[rows]
        size = n_groups * o.n_bins
        conf_sum = np.bincount(gb, weights=o.confidence[rows], minlength=size).reshape(n_groups, o.n_bins)
        correct_sum = np.bincount(gb, weights=correct, minlength=size).reshape(n_groups, o.n_bins)
        ece = np.abs(correct_sum - conf_sum).sum(axis=1) / n
    if auroc is None:
        auroc = grouped_auroc(o, rows, codes, n_groups, support)
    values = np.stack([accuracy, bal, auroc, tpr, fpr, selection, ece], axis=1)
    rates = np.stack([tpr_k, fpr_k, sel_k], axis=2)
    return values, rates


def _row_nanmean(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    count = finite.sum(axis=1)
    return np.where(count > 0, np.where(finite, x, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


def grouped_auroc(o: Outcomes, rows, codes, n_groups, support) -> np.ndarray:
    """Per group, macro one-vs-rest AUROC over the classes present (two classes: the second
    class's score), via the Mann-Whitney U with ties counted one half."""
    per = np.full((n_groups, len(o.scored_classes)), np.nan)
    y = o.labels[rows]
    starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=n_groups))[:-1]])
    for j, k in enumerate(o.scored_classes):
        score = o.probs[rows, k]
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


def batched_auroc(o: Outcomes, rows: np.ndarray, keys: np.ndarray, total: int) -> np.ndarray:
    """grouped_auroc of many groupings at once: image ``rows[i]`` (repeats allowed) is in group
    ``keys[i]`` of ``total``, e.g. replicate * G + group. Returns (total,).

    A stable sort by score (tie ids precomputed per class), then one by group key, both radix
    sorts, lines up every group in score order; the rank sums then follow as in grouped_auroc,
    for all groups in one pass. permuted_auroc is the faster special case of one set of
    rows under many labellings, used by the permutation test.
    """
    y = o.labels[rows]
    per = np.full((total, len(o.scored_classes)), np.nan)
    keys = keys.astype(np.int64)
    for j, k in enumerate(o.scored_classes):
        tie = o.tie_ids(k)[rows]
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


def permuted_auroc(o: Outcomes, rows: np.ndarray, perm_codes: np.ndarray, n_groups: int) -> np.ndarray:
    """grouped_auroc for the same images under P relabellings ``perm_codes`` (P, n): (P, G).

    Only the group labels move between permutations, so the scores are sorted once; a stable
    sort on the small integer group keys (a radix sort in numpy) then lines up every
    (permutation, group) in score order, and the rank sums follow as in grouped_auroc.
    """
    n_perm, n = perm_codes.shape
    y = o.labels[rows]
    total = n_perm * n_groups
    per = np.full((total, len(o.scored_classes)), np.nan)
    flat = np.arange(n_perm)[:, None] * n_groups + perm_codes
    key_type = np.int16 if total < 2**15 else np.int32
    for j, k in enumerate(o.scored_classes):
        score = o.probs[rows, k]
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


def permuted_values(o: Outcomes, rows: np.ndarray, perm_codes: np.ndarray, n_groups: int, macro: bool) -> np.ndarray:
    """GROUP_METRICS (P, G, metrics) of the same images under P relabellings, in one pass:
    permutation p's group g becomes group p * G + g of one large grouping."""
    n_perm = len(perm_codes)
    flat_codes = (np.arange(n_perm)[:, None] * n_groups + perm_codes).ravel()
    auroc = permuted_auroc(o, rows, perm_codes, n_groups).ravel()
    values, _ = measure_groups(o, np.tile(rows, n_perm), flat_codes, n_perm * n_groups, macro, auroc=auroc)
    return values.reshape(n_perm, n_groups, -1)


def spread_over_groups(values: np.ndarray) -> np.ndarray:
    """Largest minus smallest finite value over the groups (axis 1); NaN with fewer than two."""
    finite = np.isfinite(values)
    hi = np.where(finite, values, -np.inf).max(axis=1)
    lo = np.where(finite, values, np.inf).min(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(finite.sum(axis=1) >= 2, hi - lo, np.nan)


def group_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC of one set of images (see grouped_auroc)."""
    o = Outcomes(labels, probs.argmax(axis=1), probs, [0], probs.shape[1], 2)
    rows = np.arange(len(labels))
    support = np.bincount(labels, minlength=probs.shape[1]).astype(np.float64)[None, :]
    return float(grouped_auroc(o, rows, np.zeros(len(labels), dtype=np.int64), 1, support)[0])


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


@dataclass
class ColumnAudit:
    name: str
    grouping: Grouping
    sizes: np.ndarray
    in_gaps: np.ndarray  # per group: large enough and not missing
    values: np.ndarray  # (G, metrics), all groups incl. small ones
    value_ci: np.ndarray  # (G, metrics, 2)
    gaps: dict[str, float]
    gap_ci: dict[str, tuple[float, float]]
    gap_p: dict[str, float]  # per-metric permutation p-values of the gaps (not adjusted)
    p_value: float
    largest_metric: str
    warnings: list[str]
    missing: int
    p_value_holm: float = float("nan")

    def details(self) -> dict:
        return {
            "groups": {
                g: {"n": int(n), "in_gaps": bool(ok), **{m: _f(v) for m, v in zip(GROUP_METRICS, vals)},
                    "intervals": {m: [_f(a), _f(b)] for m, (a, b) in zip(GROUP_METRICS, ci)}}
                for g, n, ok, vals, ci in zip(self.grouping.names, self.sizes, self.in_gaps, self.values, self.value_ci)
            },
            "gaps": {k: _f(v) for k, v in self.gaps.items()},
            "gap_p_values": {k: _f(v) for k, v in self.gap_p.items()},
            "largest_gap_metric": self.largest_metric,
            "p_value": _f(self.p_value),
            "p_value_holm": _f(self.p_value_holm),
            "missing_values": self.missing,
            "binning": self.grouping.binned,
        }


def audit_column(o: Outcomes, name: str, grouping: Grouping, s: Settings, rng: np.random.Generator) -> ColumnAudit:
    codes, names = grouping.codes, grouping.names
    n_groups = len(names)
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    sizes = np.array([len(m) for m in members])
    in_gaps = sizes >= s.min_group_size
    warnings = []
    small = [f"{n} ({k})" for n, k, ok in zip(names, sizes, in_gaps) if not ok]
    if small:
        warnings.append(f"{name}: group(s) {', '.join(small)} have fewer than {s.min_group_size} images; "
                        "shown but left out of the gaps")
    missing = int((codes < 0).sum())
    if missing:
        warnings.append(f"{name}: {missing} image(s) without a value; shown as {MISSING}, left out of the gaps")
    if in_gaps.sum() < 2:
        warnings.append(f"{name}: fewer than two groups with at least {s.min_group_size} images, so no gaps")

    def evaluate(groups_rows):
        rows = np.concatenate(groups_rows)
        codes = np.repeat(np.arange(len(groups_rows)), [len(r) for r in groups_rows])
        return measure_groups(o, rows, codes, len(groups_rows), s.macro)

    def gaps_of(values, rates, rows_in):
        support = np.bincount(o.labels[rows_in], minlength=o.n_classes).astype(np.float64)[None, :]
        overall = float(grouped_auroc(o, rows_in, np.zeros(len(rows_in), dtype=np.int64), 1, support)[0])
        return gap_statistics(values[in_gaps], rates[in_gaps], overall)

    rows_in = np.concatenate([members[g] for g in np.flatnonzero(in_gaps)] or [np.array([], dtype=np.int64)])
    values, rates = evaluate(members)
    gaps = gaps_of(values, rates, rows_in)

    value_ci, gap_ci = bootstrap(o, members, in_gaps, s, rng, values.shape)
    gap_p, p_value = permutation_test(o, codes, in_gaps, s, rng, gaps)
    gap_values = {m: gaps[f"{m}_gap"] for m in GROUP_METRICS if np.isfinite(gaps[f"{m}_gap"])}
    largest = max(gap_values, key=gap_values.get) if gap_values else ""
    return ColumnAudit(name, grouping, sizes, in_gaps, values, value_ci, gaps, gap_ci, gap_p, p_value,
                       largest, warnings, missing)


def bootstrap(o, members, in_gaps, s, rng, shape):
    """Percentile intervals; images are resampled within each group and class, so group sizes
    and class mixes stay as observed and only the sampling noise of each group is measured.
    Replicates are drawn one by one from ``rng`` and evaluated in chunks, replicate b's group
    g becoming group b * G + g of one large grouping."""
    value_ci = np.full(shape + (2,), np.nan)
    gap_ci: dict[str, tuple[float, float]] = {}
    if s.n_bootstrap <= 0:
        return value_ci, gap_ci
    n_groups = len(members)
    strata = [[m[o.labels[m] == k] for k in np.unique(o.labels[m])] for m in members]
    empty = np.array([], dtype=np.int64)
    compared = np.flatnonzero(in_gaps)
    all_values, all_gaps = [], []
    chunk = max(1, min(64, 1_000_000 // max(1, sum(len(m) for m in members))))
    done = 0
    while done < s.n_bootstrap:
        size = min(chunk, s.n_bootstrap - done)
        replicates = [[np.concatenate([st[rng.integers(0, len(st), len(st))] for st in group]) if group else empty
                       for group in strata] for _ in range(size)]
        rows = np.concatenate([r for rep in replicates for r in rep])
        keys = np.repeat(np.arange(size * n_groups), [len(r) for rep in replicates for r in rep])
        auroc = batched_auroc(o, rows, keys, size * n_groups)
        values, rates = measure_groups(o, rows, keys, size * n_groups, s.macro, auroc=auroc)
        values = values.reshape(size, n_groups, -1)
        rates = rates.reshape(size, n_groups, *rates.shape[1:])
        # the AUROC of each replicate's compared images together, for es_auroc
        inside = np.isin(keys % n_groups, compared)
        overall = batched_auroc(o, rows[inside], keys[inside] // n_groups, size)
        for b in range(size):
            all_values.append(values[b])
            all_gaps.append(gap_statistics(values[b][in_gaps], rates[b][in_gaps], float(overall[b])))
        done += size
    stacked = np.array(all_values)
    with np.errstate(all="ignore"):
        for g in range(shape[0]):
            for m in range(shape[1]):
                value_ci[g, m] = _percentiles(stacked[:, g, m], s.n_bootstrap)
    for key in GAP_KEYS:
        lo, hi = _percentiles(np.array([d[key] for d in all_gaps]), s.n_bootstrap)
        if np.isfinite(lo):
            gap_ci[key] = (lo, hi)
    return value_ci, gap_ci


def _percentiles(x: np.ndarray, n_boot: int) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if len(x) < max(10, n_boot // 4):
        return float("nan"), float("nan")
    return float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))


def permutation_test(o, codes, in_gaps, s, rng, observed):
    """Shuffle group labels among the images of the compared groups and recompute the gaps.

    The statistic of the headline p-value is the largest gap over the metrics, recomputed the
    same way under every shuffle, so choosing the largest after the fact is accounted for.
    Shuffles are drawn one by one from ``rng`` and evaluated in chunks (permuted_values).
    """
    keys = [f"{m}_gap" for m in GROUP_METRICS]
    obs = np.array([observed[k] for k in keys])
    if s.n_permutations <= 0 or in_gaps.sum() < 2 or not np.isfinite(obs).any():
        return {}, float("nan")
    compared = np.flatnonzero(in_gaps)
    rows = np.flatnonzero(np.isin(codes, compared))
    position = np.full(codes.max() + 1, -1, dtype=np.int64)
    position[compared] = np.arange(len(compared))
    labels_of_rows = position[codes[rows]]
    exceed = np.zeros(len(keys))
    exceed_max = 0
    obs_max = np.nanmax(obs)
    # chunks of about a million images in all keep the working arrays small
    chunk = max(1, min(128, 1_000_000 // max(1, len(rows))))
    done = 0
    while done < s.n_permutations:
        size = min(chunk, s.n_permutations - done)
        shuffled = np.stack([rng.permutation(labels_of_rows) for _ in range(size)])
        stat = spread_over_groups(permuted_values(o, rows, shuffled, len(compared), s.macro))  # (size, metrics)
        with np.errstate(invalid="ignore"):
            # a tiny tolerance so that floating-point noise on equal gaps counts as "as large"
            exceed += (stat >= obs - 1e-12).sum(axis=0)
            exceed_max += int((np.where(np.isfinite(stat), stat, -np.inf).max(axis=1) >= obs_max - 1e-12).sum())
        done += size
    p = (exceed + 1) / (s.n_permutations + 1)
    gap_p = {k: float(v) for k, v, ob in zip(keys, p, obs) if np.isfinite(ob)}
    return gap_p, float((exceed_max + 1) / (s.n_permutations + 1))


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


def flat_metrics(audits: list[ColumnAudit]) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    metrics: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    for a in audits:
        for key in GAP_KEYS:
            metrics[f"{a.name}.{key}"] = a.gaps[key]
            if key in a.gap_ci:
                intervals[f"{a.name}.{key}"] = a.gap_ci[key]
        metrics[f"{a.name}.p_value"] = a.p_value
        metrics[f"{a.name}.p_value_holm"] = a.p_value_holm
        metrics[f"{a.name}.n_groups"] = float(a.in_gaps.sum())

    def extreme(key, fn):
        vals = [a.gaps[key] for a in audits if np.isfinite(a.gaps[key])]
        return float(fn(vals)) if vals else float("nan")

    metrics["worst_group_accuracy"] = extreme("worst_group_accuracy", min)
    metrics["max_accuracy_gap"] = extreme("accuracy_gap", max)
    metrics["max_dp_difference"] = extreme("dp_difference", max)
    metrics["max_eo_difference"] = extreme("eo_difference", max)
    holm = [a.p_value_holm for a in audits if np.isfinite(a.p_value_holm)]
    metrics["min_p_value_holm"] = float(min(holm)) if holm else float("nan")
    return metrics, intervals


def _cell(value: float, ci) -> str:
    if not np.isfinite(value):
        return "n/a"
    if ci is None or not np.isfinite(ci[0]):
        return f"{value:.3f}"
    return f"{value:.3f} ({ci[0]:.3f} to {ci[1]:.3f})"


def _p_text(p: float) -> str:
    return "n/a" if not np.isfinite(p) else f"{p:.3g}"


def overview_table(audits, s: Settings) -> Table:
    rows = []
    for a in audits:
        m = a.largest_metric
        sig = "n/a" if not np.isfinite(a.p_value_holm) else ("yes" if a.p_value_holm < s.alpha else "no")
        rows.append([
            a.name, int(a.in_gaps.sum()), METRIC_LABELS.get(m, "n/a"),
            _cell(a.gaps.get(f"{m}_gap", float("nan")), a.gap_ci.get(f"{m}_gap")) if m else "n/a",
            _cell(a.gaps["worst_group_accuracy"], a.gap_ci.get("worst_group_accuracy")),
            _p_text(a.p_value), _p_text(a.p_value_holm), sig,
        ])
    return Table(
        "Overview: the largest gap in each column",
        ["column", "groups compared", "largest gap in", "gap (95% interval)", "worst-group accuracy (95% interval)",
         "p-value", "p-value (Holm)", f"significant at {s.alpha:g}"],
        rows,
        note="A gap is the best group's value minus the worst group's. The p-value is the chance of a gap this large "
             "if group membership had nothing to do with the predictions (group labels shuffled); Holm adjusts it for "
             "the number of columns compared. Small groups get wide intervals and rarely reach significance.",
    )


def group_table(a: ColumnAudit, s: Settings) -> Table:
    rows = []
    for g, n, ok, vals, ci in zip(a.grouping.names, a.sizes, a.in_gaps, a.values, a.value_ci):
        rows.append([g, int(n), "yes" if ok else "no (too small)"] + [_cell(v, c) for v, c in zip(vals, ci)])
    if a.missing:
        rows.append([MISSING, a.missing, "no (no value)"] + ["n/a"] * len(GROUP_METRICS))
    note = f"Values with 95% bootstrap intervals. TPR, FPR and selection rate are for {s.positive_label!r}."
    if a.grouping.binned:
        note += f" {a.name} is numeric and was {a.grouping.binned}."
    return Table(f"{a.name}: per group", ["group", "images", "in gaps"] + [METRIC_LABELS[m] for m in GROUP_METRICS], rows, note=note)


def gap_table(a: ColumnAudit) -> Table:
    rows = []
    for m in GROUP_METRICS:
        rows.append([METRIC_LABELS[m], _cell(a.gaps[f"{m}_gap"], a.gap_ci.get(f"{m}_gap")),
                     _cell(a.gaps[f"{m}_ratio"], a.gap_ci.get(f"{m}_ratio")), _p_text(a.gap_p.get(f"{m}_gap", float("nan")))])
    for key, label in (("dp_difference", "demographic parity difference"), ("eo_difference", "equalized odds difference"),
                       ("eop_difference", "equal opportunity difference"), ("worst_group_accuracy", "worst-group accuracy"),
                       ("es_auroc", "equity-scaled AUROC (ES-AUC)")):
        rows.append([label, _cell(a.gaps[key], a.gap_ci.get(key)), "", ""])
    return Table(
        f"{a.name}: gaps between groups", ["measure", "max - min (95% interval)", "min / max (95% interval)", "permutation p-value"], rows,
        note=f"Only groups with enough images enter ({int(a.in_gaps.sum())} here). Per-measure p-values are not adjusted; "
             f"the column's headline p-value ({_p_text(a.p_value)}) tests the largest gap, {METRIC_LABELS.get(a.largest_metric, 'n/a')}.",
    )


def group_figure(a: ColumnAudit, s: Settings):
    from mcaudit.reports.plots import new_figure, to_figure

    shown = ["accuracy", "balanced_accuracy", "auroc", "tpr", "fpr"]
    names = a.grouping.names
    width = min(12.0, 3.0 + 0.75 * len(names) * 1.2)
    fig, ax = new_figure(width, 3.8)
    bar = 0.8 / len(shown)
    x = np.arange(len(names))
    colours = ["#4c72b0", "#55a868", "#8172b2", "#dd8452", "#c44e52"]
    for j, (m, colour) in enumerate(zip(shown, colours)):
        k = GROUP_METRICS.index(m)
        vals = a.values[:, k]
        lo, hi = a.value_ci[:, k, 0], a.value_ci[:, k, 1]
        err = np.vstack([np.where(np.isfinite(lo), vals - lo, 0), np.where(np.isfinite(hi), hi - vals, 0)])
        err = np.nan_to_num(np.maximum(err, 0))
        pos = x - 0.4 + bar * (j + 0.5)
        ax.bar(pos, np.nan_to_num(vals), bar, yerr=err, color=colour, capsize=2, error_kw={"lw": 0.8},
               label=METRIC_LABELS[m])
        for p, ok in zip(pos, a.in_gaps):
            if not ok:
                ax.bar(p, 1.0, bar, color="none", edgecolor="#999999", hatch="..", lw=0)
    labels = [f"{g}\n(n={int(n)}{'' if ok else ', small'})" for g, n, ok in zip(names, a.sizes, a.in_gaps)]
    ax.set_xticks(x, labels, fontsize=7, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value")
    ax.legend(fontsize=7, ncol=len(shown), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return to_figure(fig, f"{a.name}: per-group metrics",
                     f"bars: value per group; whiskers: 95% bootstrap interval; dotted: group too small to enter the gaps "
                     f"(fewer than {s.min_group_size}); TPR/FPR for {s.positive_label!r}")


def summarise(audits: list[ColumnAudit], s: Settings) -> str:
    tested = [a for a in audits if np.isfinite(a.p_value_holm)]
    if not tested:
        worst = [a for a in audits if np.isfinite(a.gaps["worst_group_accuracy"])]
        return ("No column has two groups of at least "
                f"{s.min_group_size} images, so no gap could be tested; see the per-group tables.") if not worst else \
            "Gaps measured without a permutation test (n_permutations = 0); see the gap tables."
    top = min(tested, key=lambda a: (a.p_value_holm, -a.gaps["largest_gap"]))
    m = top.largest_metric
    k = GROUP_METRICS.index(m)
    in_vals = np.where(top.in_gaps, top.values[:, k], np.nan)
    worse_is_low = m not in ("fpr", "ece")
    worst_i = int(np.nanargmin(in_vals) if worse_is_low else np.nanargmax(in_vals))
    best_i = int(np.nanargmax(in_vals) if worse_is_low else np.nanargmin(in_vals))
    ci = top.gap_ci.get(f"{m}_gap")
    ci_text = f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else ""
    gap_text = (f"{top.name}: {METRIC_LABELS[m]} gap {top.gaps[f'{m}_gap']:.3f}{ci_text}, worst group "
                f"{top.grouping.names[worst_i]} ({in_vals[worst_i]:.3f}) vs {top.grouping.names[best_i]} ({in_vals[best_i]:.3f})")
    if top.p_value_holm < s.alpha:
        return f"Significant subgroup gap, {gap_text}; p = {top.p_value_holm:.3g} (Holm-adjusted)."
    return (f"No significant subgroup gap (smallest Holm-adjusted p = {top.p_value_holm:.3g}); "
            f"largest in {gap_text}.")


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@hookimpl
def mcaudit_register_checks(register):
    register(FairnessCheck)
