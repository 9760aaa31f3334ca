"""Subgroup fairness: is the model as good for every group of patients?

For every subgroup column the user names (``--group``) and every intersection of two, the
check measures each group from the shared forward pass (no image is encoded again), the gaps
between groups, how sure those gaps are and whether the largest could be chance (a
permutation test that shuffles the group labels, by subject when the data name subjects).

Intervals: per-group proportions get Wilson intervals; everything else comes from one
bootstrap over images (whole subjects when the data name them), shared by all columns and
not stratified by group or class, since holding the mix fixed makes intervals too narrow. A
gap's interval is the max-|t| band over all pairwise group differences, which covers the
largest true difference; its simulated coverage is in tests/test_coverage_fairness_calibration.py.
Groups smaller than ``min_group_size`` are shown with their n and interval, marked "too
small to decide", and not compared.

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
from dataclasses import dataclass, field

import numpy as np

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl
from mcaudit.metrics import wilson_interval

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
        "min_group_size": Param(20, "groups with fewer images are shown with their interval, marked too small to decide, and not compared in the gaps"),
        "quantile_bins": Param(4, "numeric columns (e.g. age) are cut into this many quantile groups"),
        "bin_edges": Param([], "explicit cut points for numeric columns, e.g. \"age=50,65,80\" (a list for several columns)"),
        "intersections": Param(True, "also compare intersections of two columns (e.g. site&sex)"),
        "n_bootstrap": Param(400, "bootstrap resamples (of images, or of subjects when the data name them) for the 95% intervals (0 turns them off)"),
        "n_permutations": Param(1000, "group-label permutations for the p-value of the largest gap (0 turns it off)"),
        "alpha": Param(0.05, "level for the overview's 'Holm p < alpha' column (the verdict comes from the gap thresholds)"),
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
        "worst_group_accuracy": "lowest accuracy of any compared group (large enough) in any column; the summary names smaller groups that are lower",
        "max_accuracy_gap": "largest accuracy gap over the columns",
        "max_dp_difference": "largest demographic parity difference over the columns",
        "max_eo_difference": "largest equalized odds difference over the columns",
        "min_p_value_holm": "smallest Holm-adjusted p-value over the columns",
    }
    default_thresholds = {"max_accuracy_gap": "<= 0.1", "max_eo_difference": "<= 0.2"}
    threshold_reasons = {
        "max_accuracy_gap": "a model right 10 points less often for one group of patients than for another serves that "
                            "group materially worse; there is no consensus bound (underdiagnosis gaps of this order were "
                            "reported for chest X-ray classifiers by Seyyed-Kalantari et al., Nat Med 2021), so set your "
                            "own in the gate file. Decided on the interval, which holds for every pair of compared groups",
        "max_eo_difference": "equalized odds (Hardt et al. 2016) asks for equal true and false positive rates across "
                             "groups; 0.2 is a tolerance for the larger of the two gaps, loose enough for the sampling "
                             "noise of groups of a few dozen images, and a convention rather than a clinical standard",
    }
    # The bootstrap resamples every image once per replicate for all columns; a few hundred
    # replicates settle the 95% band. The permutation p-value needs about 1000 shuffles to
    # resolve p near 0.01.
    profiles = {
        "quick": {"n_bootstrap": 100, "n_permutations": 200},
        "standard": {"n_bootstrap": 400, "n_permutations": 1000},
        "thorough": {"n_bootstrap": 2000, "n_permutations": 5000},
    }

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

        audits = [prepare_column(outcomes, name, grouping, settings) for name, grouping in compared]
        clusters = ctx.clusters()
        boots = bootstrap_columns(outcomes, audits, settings, ctx.rng("fairness:bootstrap"), clusters)
        for i, audit in enumerate(audits):
            boot = boots[i] if boots else None
            audit.value_ci = value_intervals(audit, boot, settings)
            audit.gap_ci = gap_intervals(audit, boot)
            audit.gap_p, audit.p_value = permutation_test(outcomes, audit.grouping.codes, audit.in_gaps, settings,
                                                          ctx.rng(f"fairness:{audit.name}"), audit.gaps, clusters)
        holm = holm_adjust([a.p_value for a in audits])
        for audit, p in zip(audits, holm):
            audit.p_value_holm = p

        metrics, intervals, n, not_evaluated = flat_metrics(audits, boots, settings)
        result = CheckResult(
            metrics=metrics, intervals=intervals, n=n, not_evaluated=not_evaluated, sample_size=len(fwd.labels),
            summary=summarise(audits, metrics, intervals, settings),
            tables=[overview_table(audits, settings)], warnings=[w for a in audits for w in a.warnings],
            details={
                "positive_class": settings.positive_label,
                "min_group_size": settings.min_group_size,
                "interval_method": INTERVAL_NOTE,
                "resampling_unit": "subject" if clusters is not None else "image",
                "columns": {a.name: a.details() for a in audits},
            },
        )
        for audit in audits:
            result.tables += [group_table(audit, settings), gap_table(audit)]
            result.figures.append(group_figure(audit, settings))
        overall = float(np.mean(outcomes.correct))
        for message, severity in small_group_findings(audits, overall, settings):
            result.warn(message, metric="worst_group_accuracy", severity=severity)
        return result


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
# Gaps that get a 95% interval. ECE per group is the plain binned ECE, biased upwards by a
# different amount in groups of different size, so its gap has none; nor do the ratios,
# es_auroc and largest_gap, whose intervals nobody has checked.
INTERVAL_GAPS = ("accuracy", "balanced_accuracy", "auroc", "tpr", "fpr", "selection_rate")
RATE_INDEX = {"tpr": 0, "fpr": 1, "selection_rate": 2}
# The rates behind each disparity difference: (TPR, FPR, selection) columns of ``rates``.
DIFFERENCE_RATES = {"dp_difference": (2,), "eop_difference": (0,), "eo_difference": (0, 1)}
PROPORTIONS = ("accuracy", "tpr", "fpr", "selection_rate")
INTERVAL_NOTE = (
    "95% intervals: per-group proportions (accuracy; TPR, FPR and selection rate of one positive class) are Wilson "
    "intervals; other per-group values are percentile intervals of a bootstrap over images (whole subjects when the "
    "data name them), not stratified by group or class. A gap's interval holds jointly for every pair of compared "
    "groups (bootstrap max-|t| band over all pairwise differences), so it covers the largest true difference; "
    "per-group ECE, ratios and ES-AUROC get none."
)


@dataclass
class ColumnAudit:
    name: str
    grouping: Grouping
    sizes: np.ndarray
    in_gaps: np.ndarray  # per group: large enough to be compared
    values: np.ndarray  # (G, metrics), all groups incl. small ones
    rates: np.ndarray  # (G, positives, 3)
    counts: dict[str, tuple[np.ndarray, np.ndarray]]  # proportion -> (successes, trials) per group
    gaps: dict[str, float]
    warnings: list[str]
    missing: int
    value_ci: np.ndarray | None = None  # (G, metrics, 2)
    gap_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    gap_p: dict[str, float] = field(default_factory=dict)  # per-metric permutation p-values (not adjusted)
    p_value: float = float("nan")
    p_value_holm: float = float("nan")
    largest_metric: str = ""
    group_reasons: list[dict[str, str]] = field(default_factory=list)  # per group: metric -> why undefined

    @property
    def n_compared(self) -> int:
        return int(self.sizes[self.in_gaps].sum())

    def small_groups(self) -> list[int]:
        return [g for g in range(len(self.sizes)) if not self.in_gaps[g] and self.sizes[g] > 0]

    def details(self) -> dict:
        groups = {}
        for g, name in enumerate(self.grouping.names):
            groups[name] = {
                "n": int(self.sizes[g]), "in_gaps": bool(self.in_gaps[g]),
                "decision": "compared" if self.in_gaps[g] else "too small to decide",
                **{m: _f(v) for m, v in zip(GROUP_METRICS, self.values[g])},
                "intervals": {m: [_f(a), _f(b)] for m, (a, b) in zip(GROUP_METRICS, self.value_ci[g])},
                "counts": {m: [int(k[g]), int(n[g])] for m, (k, n) in self.counts.items() if n[g] > 0},
                "not_evaluated": dict(self.group_reasons[g]),
            }
        return {
            "groups": groups,
            "gaps": {k: _f(v) for k, v in self.gaps.items()},
            "gap_intervals": {k: [_f(a), _f(b)] for k, (a, b) in self.gap_ci.items()},
            "gap_p_values": {k: _f(v) for k, v in self.gap_p.items()},
            "largest_gap_metric": self.largest_metric,
            "p_value": _f(self.p_value),
            "p_value_holm": _f(self.p_value_holm),
            "images_compared": self.n_compared,
            "missing_values": self.missing,
            "binning": self.grouping.binned,
        }


def group_counts(o: Outcomes, codes: np.ndarray, n_groups: int, macro: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(successes, trials) per group of each proportion that has a Wilson interval."""
    keep = codes >= 0
    rows = np.flatnonzero(keep)
    c = codes[keep]
    n = np.bincount(c, minlength=n_groups)
    out = {"accuracy": (np.bincount(c, weights=o.correct[rows], minlength=n_groups).round().astype(int), n)}
    if not macro:
        k = o.positives[0]
        is_pos, said = o.labels[rows] == k, o.preds[rows] == k
        support = np.bincount(c, weights=is_pos, minlength=n_groups).astype(int)
        hits = np.bincount(c, weights=is_pos & said, minlength=n_groups).astype(int)
        false = np.bincount(c, weights=~is_pos & said, minlength=n_groups).astype(int)
        out["tpr"] = (hits, support)
        out["fpr"] = (false, n - support)
        out["selection_rate"] = (hits + false, n)
    return out


def prepare_column(o: Outcomes, name: str, grouping: Grouping, s: Settings) -> ColumnAudit:
    codes, names = grouping.codes, grouping.names
    n_groups = len(names)
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    sizes = np.array([len(m) for m in members])
    in_gaps = sizes >= s.min_group_size
    warnings = []
    small = [f"{n} (n={k})" for n, k, ok in zip(names, sizes, in_gaps) if not ok]
    if small:
        warnings.append(f"{name}: group(s) {', '.join(small)} have fewer than {s.min_group_size} images: shown with "
                        "their intervals, marked too small to decide, and not compared in the gaps")
    missing = int((codes < 0).sum())
    if missing:
        warnings.append(f"{name}: {missing} image(s) without a value; shown as {MISSING}, left out of the gaps")
    if in_gaps.sum() < 2:
        warnings.append(f"{name}: fewer than two groups with at least {s.min_group_size} images, so no gaps")
    rows = np.concatenate(members) if members else np.array([], dtype=np.int64)
    group_of = np.repeat(np.arange(n_groups), sizes)
    values, rates = measure_groups(o, rows, group_of, n_groups, s.macro)
    rows_in = np.concatenate([members[g] for g in np.flatnonzero(in_gaps)] or [np.array([], dtype=np.int64)])
    support = np.bincount(o.labels[rows_in], minlength=o.n_classes).astype(np.float64)[None, :]
    overall = float(grouped_auroc(o, rows_in, np.zeros(len(rows_in), dtype=np.int64), 1, support)[0])
    gaps = gap_statistics(values[in_gaps], rates[in_gaps], overall)
    audit = ColumnAudit(name, grouping, sizes, in_gaps, values, rates, group_counts(o, codes, n_groups, s.macro),
                        gaps, warnings, missing)
    audit.group_reasons = [undefined_reasons(values[g], s) for g in range(n_groups)]
    gap_values = {m: gaps[f"{m}_gap"] for m in GROUP_METRICS if np.isfinite(gaps[f"{m}_gap"])}
    audit.largest_metric = max(gap_values, key=gap_values.get) if gap_values else ""
    return audit


def undefined_reasons(values: np.ndarray, s: Settings) -> dict[str, str]:
    why = {
        "auroc": "only one class among the group's images",
        "tpr": f"no images of {s.positive_label!r} in the group",
        "fpr": f"no images other than {s.positive_label!r} in the group",
        "selection_rate": "averaged over all classes it is always 1/K" if s.macro else "the group is empty",
        "balanced_accuracy": "the group is empty", "accuracy": "the group is empty", "ece": "the group is empty",
    }
    return {m: why[m] for m, v in zip(GROUP_METRICS, values) if not np.isfinite(v)}


def resample_chunks(n: int, clusters: np.ndarray | None, rng: np.random.Generator, n_boot: int):
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
                j = rng.integers(0, len(lens), len(lens))
                ln = lens[j]
                offsets = np.repeat(starts[j] - np.concatenate([[0], np.cumsum(ln)[:-1]]), ln) + np.arange(ln.sum())
                out.append(order[offsets])
            yield out
        done += size


def bootstrap_columns(o: Outcomes, audits: list[ColumnAudit], s: Settings, rng: np.random.Generator,
                      clusters: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per column, GROUP_METRICS (B, G, metrics) and rates (B, G, positives, 3) over the same
    bootstrap replicates of the images, so that maxima over columns have intervals too.

    Images (or subjects) are resampled from the whole audit, not within groups or classes:
    group sizes and class mixes vary between replicates as they do between samples of
    patients. Replicate b's group g becomes group b * G + g of one large grouping.
    """
    n = len(o.labels)
    out = [([], []) for _ in audits]
    if s.n_bootstrap <= 0:
        return []
    for replicates in resample_chunks(n, clusters, rng, s.n_bootstrap):
        size = len(replicates)
        rows = np.concatenate(replicates)
        replicate_of = np.repeat(np.arange(size), [len(r) for r in replicates])
        for (values_acc, rates_acc), a in zip(out, audits):
            n_groups = len(a.grouping.names)
            code = a.grouping.codes[rows]
            keep = code >= 0
            keys = replicate_of[keep] * n_groups + code[keep]
            auroc = batched_auroc(o, rows[keep], keys, size * n_groups)
            values, rates = measure_groups(o, rows[keep], keys, size * n_groups, s.macro, auroc=auroc)
            values_acc.append(values.reshape(size, n_groups, -1))
            rates_acc.append(rates.reshape(size, n_groups, *rates.shape[1:]))
    return [(np.concatenate(v), np.concatenate(r)) for v, r in out]


def simultaneous_halfwidths(observed: np.ndarray, replicates: np.ndarray, level: float = 0.95) -> np.ndarray | None:
    """Half-widths c * se_i such that observed_i +/- c * se_i hold for every i together in
    ``level`` of the bootstrap replicates (the max-|t| band; se_i is the bootstrap spread).
    ``observed`` (P,), ``replicates`` (B, P). None when too few replicates are usable."""
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


def max_difference_interval(observed: np.ndarray, replicates: np.ndarray) -> tuple[float, float]:
    """95% interval of the largest |difference| over contrasts (columns), from their bootstrap
    replicates: every contrast's simultaneous interval holds, so the largest true |difference|
    is at least the largest lower end and at most the largest upper end."""
    keep = np.isfinite(observed)
    if keep.sum() == 0:
        return float("nan"), float("nan")
    observed, replicates = observed[keep], replicates[:, keep]
    half = simultaneous_halfwidths(observed, replicates)
    if half is None:
        return float("nan"), float("nan")
    size = np.abs(observed)
    return float(max(0.0, (size - half).max())), float((size + half).max())


def min_value_interval(observed: np.ndarray, replicates: np.ndarray) -> tuple[float, float]:
    """95% interval of the smallest value over groups (columns), from a simultaneous band."""
    keep = np.isfinite(observed)
    if keep.sum() == 0:
        return float("nan"), float("nan")
    observed, replicates = observed[keep], replicates[:, keep]
    half = simultaneous_halfwidths(observed, replicates)
    if half is None:
        return float("nan"), float("nan")
    return float((observed - half).min()), float((observed + half).min())


def pairwise(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Differences between every pair of the given groups along the last axis."""
    i, j = np.triu_indices(len(groups), 1)
    return values[..., groups[i]] - values[..., groups[j]]


def contrasts(a: ColumnAudit, key: str, values: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """The pairwise differences behind gap ``key`` for observed (G, ...) or replicated
    (B, G, ...) values: the largest of them, in absolute value, is the gap."""
    groups = np.flatnonzero(a.in_gaps)
    lead = values.shape[:-2]
    if key.endswith("_gap"):
        k = GROUP_METRICS.index(key[:-4])
        return pairwise(values[..., k], groups)
    if key in DIFFERENCE_RATES:
        parts = []
        for r in DIFFERENCE_RATES[key]:
            for j in range(rates.shape[-2]):
                parts.append(pairwise(rates[..., j, r], groups))
        return np.concatenate(parts, axis=-1) if parts else np.zeros(lead + (0,))
    raise KeyError(key)


def gap_intervals(a: ColumnAudit, boot: tuple[np.ndarray, np.ndarray] | None) -> dict[str, tuple[float, float]]:
    if boot is None or a.in_gaps.sum() < 2:
        return {}
    values, rates = boot
    out = {}
    for key in [f"{m}_gap" for m in INTERVAL_GAPS] + list(DIFFERENCE_RATES):
        if not np.isfinite(a.gaps.get(key, float("nan"))):
            continue
        out[key] = max_difference_interval(contrasts(a, key, a.values, a.rates), contrasts(a, key, values, rates))
    groups = np.flatnonzero(a.in_gaps)
    out["worst_group_accuracy"] = min_value_interval(a.values[groups, 0], values[:, groups, 0])
    return {k: v for k, v in out.items() if np.isfinite(v[0])}


def value_intervals(a: ColumnAudit, boot: tuple[np.ndarray, np.ndarray] | None, s: Settings) -> np.ndarray:
    """(G, metrics, 2): Wilson for proportions with counts, bootstrap percentiles otherwise."""
    ci = np.full(a.values.shape + (2,), np.nan)
    for m, (k, n) in a.counts.items():
        j = GROUP_METRICS.index(m)
        for g in range(len(n)):
            if n[g] > 0:
                lo, hi = wilson_interval(int(k[g]), int(n[g]))
                # rounding leaves ~1e-17 at 0 of n; the exact end is 0 (and 1 at n of n)
                ci[g, j] = (0.0 if k[g] == 0 else lo, 1.0 if k[g] == n[g] else hi)
    if boot is not None:
        values = boot[0]
        for j, m in enumerate(GROUP_METRICS):
            if m in a.counts or m == "ece":
                continue
            for g in range(values.shape[1]):
                if np.isfinite(a.values[g, j]):
                    ci[g, j] = _percentiles(values[:, g, j], s.n_bootstrap)
    return ci


def _percentiles(x: np.ndarray, n_boot: int) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if len(x) < max(10, n_boot // 4):
        return float("nan"), float("nan")
    return float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))


def permutation_test(o, codes, in_gaps, s, rng, observed, clusters=None):
    """Shuffle group labels among the images of the compared groups and recompute the gaps.

    The statistic of the headline p-value is the largest gap over the metrics, recomputed the
    same way under every shuffle, so choosing the largest after the fact is accounted for.
    With ``clusters`` (subjects) whose images share one group, whole subjects' labels are
    shuffled, as the exchangeable units are patients, not images. Shuffles are drawn one by
    one from ``rng`` and evaluated in chunks (permuted_values).
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
    subject_of, subject_label = None, None
    if clusters is not None:
        _, subject_of = np.unique(np.asarray(clusters)[rows], return_inverse=True)
        subject_label = np.zeros(subject_of.max() + 1, dtype=np.int64)
        subject_label[subject_of] = labels_of_rows
        if not np.array_equal(subject_label[subject_of], labels_of_rows):
            subject_of = None  # a subject in two groups (e.g. an age band by visit): shuffle images
    exceed = np.zeros(len(keys))
    exceed_max = 0
    obs_max = np.nanmax(obs)
    # chunks of about a million images in all keep the working arrays small
    chunk = max(1, min(128, 1_000_000 // max(1, len(rows))))
    done = 0
    while done < s.n_permutations:
        size = min(chunk, s.n_permutations - done)
        if subject_of is None:
            shuffled = np.stack([rng.permutation(labels_of_rows) for _ in range(size)])
        else:
            shuffled = np.stack([rng.permutation(subject_label)[subject_of] for _ in range(size)])
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




CROSS_COLUMN = {"max_accuracy_gap": "accuracy_gap", "max_dp_difference": "dp_difference", "max_eo_difference": "eo_difference"}


def flat_metrics(audits: list[ColumnAudit], boots: list, s: Settings) -> tuple[dict, dict, dict, dict]:
    """Metrics, intervals, images behind each metric, and why an undefined one is undefined."""
    metrics: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    n: dict[str, int] = {}
    not_evaluated: dict[str, str] = {}
    for a in audits:
        for key in GAP_KEYS:
            name = f"{a.name}.{key}"
            metrics[name] = a.gaps[key]
            n[name] = a.n_compared
            if key in a.gap_ci:
                intervals[name] = a.gap_ci[key]
            if not np.isfinite(a.gaps[key]):
                not_evaluated[name] = column_reason(a, key, s)
        metrics[f"{a.name}.p_value"] = a.p_value
        metrics[f"{a.name}.p_value_holm"] = a.p_value_holm
        metrics[f"{a.name}.n_groups"] = float(a.in_gaps.sum())
        for key in ("p_value", "p_value_holm"):
            if not np.isfinite(a.p_value):
                not_evaluated[f"{a.name}.{key}"] = ("n_permutations = 0" if s.n_permutations == 0
                                                    else column_reason(a, "largest_gap", s))
    usable = [i for i, a in enumerate(audits) if a.in_gaps.sum() >= 2]
    no_pair = (f"no column has two groups of at least {s.min_group_size} images "
               f"(fairness.min_group_size), so no gap can be measured")
    for metric, key in CROSS_COLUMN.items():
        vals = [(audits[i].gaps[key], i) for i in usable if np.isfinite(audits[i].gaps[key])]
        if not vals:
            metrics[metric] = float("nan")
            not_evaluated[metric] = no_pair if not usable else f"{key.replace('_', ' ')} is undefined in every column"
            continue
        value, best = max(vals)
        metrics[metric] = float(value)
        n[metric] = audits[best].n_compared
        if boots:
            parts = [i for _, i in vals]
            obs = np.concatenate([contrasts(audits[i], key, audits[i].values, audits[i].rates) for i in parts])
            reps = np.concatenate([contrasts(audits[i], key, *boots[i]) for i in parts], axis=-1)
            lo, hi = max_difference_interval(obs, reps)
            if np.isfinite(lo):
                intervals[metric] = (lo, hi)
    worst = [(audits[i].gaps["worst_group_accuracy"], i) for i in usable]
    if worst:
        value, at = min(worst)
        metrics["worst_group_accuracy"] = float(value)
        n[metric_name := "worst_group_accuracy"] = audits[at].n_compared
        if boots:
            obs = np.concatenate([audits[i].values[audits[i].in_gaps, 0] for i in usable])
            reps = np.concatenate([boots[i][0][:, audits[i].in_gaps, 0] for i in usable], axis=1)
            lo, hi = min_value_interval(obs, reps)
            if np.isfinite(lo):
                intervals[metric_name] = (lo, hi)
    else:
        metrics["worst_group_accuracy"] = float("nan")
        not_evaluated["worst_group_accuracy"] = no_pair
    holm = [a.p_value_holm for a in audits if np.isfinite(a.p_value_holm)]
    metrics["min_p_value_holm"] = float(min(holm)) if holm else float("nan")
    if not holm:
        not_evaluated["min_p_value_holm"] = "n_permutations = 0" if s.n_permutations == 0 else no_pair
    return metrics, intervals, n, not_evaluated


def column_reason(a: ColumnAudit, key: str, s: Settings) -> str:
    if a.in_gaps.sum() < 2:
        sizes = ", ".join(f"{g} n={int(k)}" for g, k in zip(a.grouping.names, a.sizes)) or "none"
        return f"{a.name} has fewer than two groups of at least {s.min_group_size} images ({sizes})"
    metric = key[:-4] if key.endswith("_gap") or key.endswith("_ratio") else key
    metric = metric.removesuffix("_")
    if metric == "selection_rate" and s.macro:
        return "selection rate averaged over all classes is always 1/K; name fairness.positive_class to compare it"
    return f"{metric.replace('_', ' ')} is defined in fewer than two compared groups of {a.name} (e.g. a group with one class only)"


def small_group_findings(audits: list[ColumnAudit], overall_accuracy: float, s: Settings) -> list[tuple[str, float]]:
    """Groups too small to compare whose accuracy is below the overall accuracy even at the
    upper end of its Wilson interval: evidence worth a look that the gaps cannot show."""
    out = []
    for a in audits:
        for g in a.small_groups():
            lo, hi = a.value_ci[g, 0]
            if np.isfinite(hi) and hi < overall_accuracy:
                out.append((f"{a.name} = {a.grouping.names[g]} (n={int(a.sizes[g])}, too small to compare): accuracy "
                            f"{a.values[g, 0]:.3f} (95% CI {lo:.3f} to {hi:.3f}) is below the overall accuracy "
                            f"{overall_accuracy:.3f} even at its upper bound", overall_accuracy - hi))
    return out


def _cell(value: float, ci) -> str:
    if not np.isfinite(value):
        return "n/a"
    if ci is None or not np.isfinite(ci[0]):
        return f"{value:.3f}"
    return f"{value:.3f} ({ci[0]:.3f} to {ci[1]:.3f})"


def _p_text(p: float) -> str:
    return "n/a" if not np.isfinite(p) else f"{p:.3g}"


def _small_text(a: ColumnAudit) -> str:
    return ", ".join(f"{a.grouping.names[g]} (n={int(a.sizes[g])})" for g in a.small_groups()) or "none"


def overview_table(audits, s: Settings) -> Table:
    rows = []
    for a in audits:
        m = a.largest_metric
        sig = "n/a" if not np.isfinite(a.p_value_holm) else ("yes" if a.p_value_holm < s.alpha else "no")
        rows.append([
            a.name, int(a.in_gaps.sum()), a.n_compared,
            _cell(a.gaps["accuracy_gap"], a.gap_ci.get("accuracy_gap")),
            _cell(a.gaps["eo_difference"], a.gap_ci.get("eo_difference")),
            _cell(a.gaps["worst_group_accuracy"], a.gap_ci.get("worst_group_accuracy")),
            METRIC_LABELS.get(m, "n/a"), _p_text(a.p_value), _p_text(a.p_value_holm), sig, _small_text(a),
        ])
    return Table(
        "Overview: gaps between the groups of each column",
        ["column", "groups compared", "images compared", "accuracy gap (95% CI)", "equalized odds difference (95% CI)",
         "worst-group accuracy (95% CI)", "largest gap in", "p-value", "p-value (Holm)", f"Holm p < {s.alpha:g}",
         f"too small to decide (< {s.min_group_size} images)"],
        rows,
        note="A gap is the best compared group's value minus the worst's. The p-value is the chance of a largest gap "
             "this large if group membership had nothing to do with the predictions (group labels shuffled, by subject "
             "when the data name subjects); Holm adjusts it for the number of columns. Groups too small to decide are "
             "listed here and shown in the per-group tables with their intervals, but not compared. " + INTERVAL_NOTE,
    )


def group_table(a: ColumnAudit, s: Settings) -> Table:
    rows = []
    for g, name in enumerate(a.grouping.names):
        decision = "compared" if a.in_gaps[g] else f"too small to decide (n < {s.min_group_size})"
        cells = []
        for j, m in enumerate(GROUP_METRICS):
            reason = a.group_reasons[g].get(m)
            cells.append(f"not evaluated: {reason}" if reason else _cell(a.values[g, j], a.value_ci[g, j]))
        rows.append([name, int(a.sizes[g]), decision] + cells)
    if a.missing:
        rows.append([MISSING, a.missing, "no value: not compared"] + ["n/a"] * len(GROUP_METRICS))
    note = (f"TPR, FPR and selection rate are for {s.positive_label!r}. Per-group ECE is the plain binned ECE, biased "
            "upwards in small groups, without an interval. " + INTERVAL_NOTE)
    if a.grouping.binned:
        note += f" {a.name} is numeric and was {a.grouping.binned}."
    return Table(f"{a.name}: per group", ["group", "images", "decision"] + [METRIC_LABELS[m] for m in GROUP_METRICS], rows, note=note)


def gap_table(a: ColumnAudit) -> Table:
    rows = []
    for m in GROUP_METRICS:
        rows.append([METRIC_LABELS[m], _cell(a.gaps[f"{m}_gap"], a.gap_ci.get(f"{m}_gap")),
                     _cell(a.gaps[f"{m}_ratio"], None), _p_text(a.gap_p.get(f"{m}_gap", float("nan")))])
    for key, label in (("dp_difference", "demographic parity difference"), ("eo_difference", "equalized odds difference"),
                       ("eop_difference", "equal opportunity difference"), ("worst_group_accuracy", "worst-group accuracy"),
                       ("es_auroc", "equity-scaled AUROC (ES-AUC)")):
        rows.append([label, _cell(a.gaps[key], a.gap_ci.get(key)), "", ""])
    return Table(
        f"{a.name}: gaps between groups", ["measure", "max - min (95% CI)", "min / max", "permutation p-value"], rows,
        note=f"Only groups of at least the minimum size are compared ({int(a.in_gaps.sum())} groups, {a.n_compared} images "
             f"here; too small: {_small_text(a)}). Per-measure p-values are not adjusted; the column's headline p-value "
             f"({_p_text(a.p_value)}) tests the largest gap, {METRIC_LABELS.get(a.largest_metric, 'n/a')}. " + INTERVAL_NOTE,
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
                     f"bars: value per group; whiskers: 95% interval (Wilson for proportions, bootstrap otherwise); dotted: too small to decide "
                     f"(fewer than {s.min_group_size}); TPR/FPR for {s.positive_label!r}")




def _extreme_groups(a: ColumnAudit, k: int) -> tuple[int, int]:
    """(worst, best) compared groups for metric column k (lower is worse except FPR and ECE)."""
    vals = np.where(a.in_gaps, a.values[:, k], np.nan)
    low_is_bad = GROUP_METRICS[k] not in ("fpr", "ece")
    lo, hi = int(np.nanargmin(vals)), int(np.nanargmax(vals))
    return (lo, hi) if low_is_bad else (hi, lo)


def summarise(audits: list[ColumnAudit], metrics: dict, intervals: dict, s: Settings) -> str:
    """Numbers, never a verdict: whether a gap is acceptable is decided by the thresholds."""
    parts = []
    usable = [a for a in audits if np.isfinite(a.gaps["accuracy_gap"])]
    if usable:
        top = max(usable, key=lambda a: a.gaps["accuracy_gap"])
        worst, best = _extreme_groups(top, 0)
        ci = intervals.get("max_accuracy_gap")
        ci_text = f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else ""
        p = top.gap_p.get("accuracy_gap")
        p_text = f"; permutation p = {p:.3g}" if p is not None else ""
        names, sizes, acc = top.grouping.names, top.sizes, top.values[:, 0]
        parts.append(f"Largest accuracy gap {top.gaps['accuracy_gap']:.3f}{ci_text} in {top.name}, between "
                     f"{names[worst]} ({acc[worst]:.3f}, n={int(sizes[worst])}) and {names[best]} "
                     f"({acc[best]:.3f}, n={int(sizes[best])}){p_text}.")
        eo = metrics.get("max_eo_difference", float("nan"))
        if np.isfinite(eo):
            ci = intervals.get("max_eo_difference")
            parts.append(f"Largest equalized odds difference {eo:.3f}" + (f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})." if ci else "."))
        w = min(usable, key=lambda a: a.gaps["worst_group_accuracy"])
        g = int(np.nanargmin(np.where(w.in_gaps, w.values[:, 0], np.nan)))
        parts.append(f"Worst compared group: {w.name} = {w.grouping.names[g]}, accuracy {w.values[g, 0]:.3f} "
                     f"(n={int(w.sizes[g])}).")
        floor = w.values[g, 0]
    else:
        parts.append(f"No column has two groups of at least {s.min_group_size} images, so no gap was measured.")
        floor = np.inf
    smaller = [(a.values[g, 0], a, g) for a in audits for g in a.small_groups() if a.values[g, 0] < floor]
    if smaller:
        v, a, g = min(smaller, key=lambda t: t[0])
        lo, hi = a.value_ci[g, 0]
        more = f" ({len(smaller) - 1} more below it)" if len(smaller) > 1 else ""
        parts.append(f"Lower still: {a.name} = {a.grouping.names[g]}, accuracy {v:.3f} (95% CI {lo:.3f} to {hi:.3f}, "
                     f"n={int(a.sizes[g])}), too small to decide (under {s.min_group_size} images){more}.")
    return " ".join(parts)


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@hookimpl
def mcaudit_register_checks(register):
    register(FairnessCheck)
