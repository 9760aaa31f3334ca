"""What the reader sees: the overview, per-group and gap tables, the per-group figure, the
summary sentence, the small-group findings and the per-column details."""

from __future__ import annotations

import numpy as np

from mcaudit import Table

from .columns import ColumnResult
from .engine import GROUP_METRICS
from .grouping import MISSING
from .settings import Settings

METRIC_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auroc": "AUROC",
    "tpr": "true positive rate", "fpr": "false positive rate", "selection_rate": "selection rate",
    "ece": "calibration error (ECE)",
}
INTERVAL_NOTE = (
    "95% intervals: per-group proportions (accuracy; TPR, FPR and selection rate of one positive class) are Wilson "
    "intervals; other per-group values are percentile intervals of a bootstrap over images (whole subjects when the "
    "data name them), not stratified by group or class. A gap's interval holds jointly for every pair of compared "
    "groups (bootstrap max-|t| band over all pairwise differences), so it covers the largest true difference; "
    "per-group ECE, ratios and ES-AUROC get none."
)


def column_details(column: ColumnResult) -> dict:
    """The column's groups, gaps, intervals and p-values for results.json (the runner writes
    undefined values as null)."""
    groups = {}
    for g, name in enumerate(column.grouping.names):
        groups[name] = {
            "n": int(column.sizes[g]), "in_gaps": bool(column.in_gaps[g]),
            "decision": "compared" if column.in_gaps[g] else "too small to decide",
            **{m: float(v) for m, v in zip(GROUP_METRICS, column.values[g])},
            "intervals": {m: [float(lo), float(hi)] for m, (lo, hi) in zip(GROUP_METRICS, column.value_ci[g])},
            "counts": {m: [int(k[g]), int(n[g])] for m, (k, n) in column.counts.items() if n[g] > 0},
            "not_evaluated": dict(column.group_reasons[g]),
        }
    return {
        "groups": groups,
        "gaps": {k: float(v) for k, v in column.gaps.items()},
        "gap_intervals": {k: [float(lo), float(hi)] for k, (lo, hi) in column.gap_ci.items()},
        "gap_p_values": {k: float(v) for k, v in column.gap_p.items()},
        "largest_gap_metric": column.largest_metric,
        "p_value": float(column.p_value),
        "p_value_holm": float(column.p_value_holm),
        "images_compared": column.n_compared,
        "missing_values": column.missing,
        "binning": column.grouping.binned,
    }


def small_group_findings(columns: list[ColumnResult], overall_accuracy: float, settings: Settings) -> list[tuple[str, float]]:
    """Groups too small to compare whose accuracy is below the overall accuracy even at the
    upper end of its Wilson interval: evidence worth a look that the gaps cannot show."""
    out = []
    for column in columns:
        for g in column.small_groups():
            lo, hi = column.value_ci[g, 0]
            if np.isfinite(hi) and hi < overall_accuracy:
                out.append((f"{column.name} = {column.grouping.names[g]} (n={int(column.sizes[g])}, too small to compare): accuracy "
                            f"{column.values[g, 0]:.3f} (95% CI {lo:.3f} to {hi:.3f}) is below the overall accuracy "
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


def _small_text(column: ColumnResult, at_most: int | None = None) -> str:
    small = column.small_groups()
    shown = small if at_most is None else small[:at_most]
    text = ", ".join(f"{column.grouping.names[g]} (n={int(column.sizes[g])})" for g in shown) or "none"
    return text + (f" and {len(small) - len(shown)} more" if len(shown) < len(small) else "")


def overview_table(columns: list[ColumnResult], settings: Settings) -> Table:
    rows = []
    for column in columns:
        if int(column.in_gaps.sum()) < 2:  # nothing to compare: one plain cell, not a row of n/a
            rows.append([column.name, int(column.in_gaps.sum()), column.n_compared,
                         f"no gaps: fewer than two groups of {settings.min_group_size} images"] + [""] * 6
                        + [_small_text(column, 4)])
            continue
        m = column.largest_metric
        sig = "n/a" if not np.isfinite(column.p_value_holm) else ("yes" if column.p_value_holm < settings.alpha else "no")
        rows.append([
            column.name, int(column.in_gaps.sum()), column.n_compared,
            _cell(column.gaps["accuracy_gap"], column.gap_ci.get("accuracy_gap")),
            _cell(column.gaps["eo_difference"], column.gap_ci.get("eo_difference")),
            _cell(column.gaps["worst_group_accuracy"], column.gap_ci.get("worst_group_accuracy")),
            METRIC_LABELS.get(m, "n/a"), _p_text(column.p_value), _p_text(column.p_value_holm), sig, _small_text(column, 4),
        ])
    return Table(
        "Overview: gaps between the groups of each column",
        ["column", "groups compared", "images compared", "accuracy gap (95% CI)", "equalized odds difference (95% CI)",
         "worst-group accuracy (95% CI)", "largest gap in", "p-value", "p-value (Holm)", f"Holm p < {settings.alpha:g}",
         f"too small to decide (< {settings.min_group_size} images)"],
        rows,
        note="A gap is the best compared group's value minus the worst's. The p-value is the chance of a largest gap "
             "this large if group membership had nothing to do with the predictions (group labels shuffled, by subject "
             "when the data name subjects); Holm adjusts it for the number of columns. Groups too small to decide are "
             "listed here and shown in the per-group tables with their intervals, but not compared. " + INTERVAL_NOTE,
    )


def group_table(column: ColumnResult, settings: Settings) -> Table:
    from .digest import group_order, has_gaps

    rows = []
    for g in group_order(column):
        name = column.grouping.names[g]
        decision = "compared" if column.in_gaps[g] else f"too small to decide (n < {settings.min_group_size})"
        cells = []
        for j, m in enumerate(GROUP_METRICS):
            reason = column.group_reasons[g].get(m)
            cells.append(f"not evaluated: {reason}" if reason else _cell(column.values[g, j], column.value_ci[g, j]))
        rows.append([name, int(column.sizes[g]), decision] + cells)
    if column.missing:
        rows.append([MISSING, column.missing, "no value: not compared"] + ["n/a"] * len(GROUP_METRICS))
    note = ("Worst groups first: compared groups by accuracy, then those too small to decide. "
            + ("" if has_gaps(column) else f"No gaps: fewer than two groups have {settings.min_group_size} images. ")
            + f"TPR, FPR and selection rate are for {settings.positive_label!r}. Per-group ECE is the plain binned ECE, biased "
            "upwards in small groups, without an interval. " + INTERVAL_NOTE)
    if column.grouping.binned:
        note += f" {column.name} is numeric and was {column.grouping.binned}."
    return Table(f"{column.name}: per group", ["group", "images", "decision"] + [METRIC_LABELS[m] for m in GROUP_METRICS], rows, note=note)


def gap_table(column: ColumnResult) -> Table:
    rows = []
    for m in GROUP_METRICS:
        rows.append([METRIC_LABELS[m], _cell(column.gaps[f"{m}_gap"], column.gap_ci.get(f"{m}_gap")),
                     _cell(column.gaps[f"{m}_ratio"], None), _p_text(column.gap_p.get(f"{m}_gap", float("nan")))])
    for key, label in (("dp_difference", "demographic parity difference"), ("eo_difference", "equalized odds difference"),
                       ("eop_difference", "equal opportunity difference"), ("worst_group_accuracy", "worst-group accuracy"),
                       ("es_auroc", "equity-scaled AUROC (ES-AUC)")):
        rows.append([label, _cell(column.gaps[key], column.gap_ci.get(key)), "", ""])
    return Table(
        f"{column.name}: gaps between groups", ["measure", "max - min (95% CI)", "min / max", "permutation p-value"], rows,
        note=f"Only groups of at least the minimum size are compared ({int(column.in_gaps.sum())} groups, {column.n_compared} images "
             f"here; too small: {_small_text(column)}). Per-measure p-values are not adjusted; the column's headline p-value "
             f"({_p_text(column.p_value)}) tests the largest gap, {METRIC_LABELS.get(column.largest_metric, 'n/a')}. " + INTERVAL_NOTE,
    )


MAX_GROUPS_SHOWN = 12  # beyond this a bar chart is unreadable; the tables list every group
HATCHES = ["", "//", "..", "xx", "\\\\"]  # a second cue beside colour, for each measure


def group_figure(column: ColumnResult, settings: Settings):
    from mcaudit.reports.plots import OKABE_ITO, new_figure, short_label, to_figure

    shown = ["accuracy", "balanced_accuracy", "auroc", "tpr", "fpr"]
    acc = column.values[:, GROUP_METRICS.index("accuracy")]
    # Worst compared groups first; too-small and undefined ones after them.
    order = sorted(range(len(column.grouping.names)),
                   key=lambda i: (not column.in_gaps[i], np.nan_to_num(acc[i], nan=2.0), i))[:MAX_GROUPS_SHOWN]
    names = [column.grouping.names[i] for i in order]
    fig, ax = new_figure(min(12.0, 3.0 + 0.9 * len(names)), 4.0)
    bar = 0.8 / len(shown)
    x = np.arange(len(names))
    for j, m in enumerate(shown):
        k = GROUP_METRICS.index(m)
        vals = column.values[order, k]
        lo, hi = column.value_ci[order, k, 0], column.value_ci[order, k, 1]
        err = np.vstack([np.where(np.isfinite(lo), vals - lo, 0), np.where(np.isfinite(hi), hi - vals, 0)])
        err = np.nan_to_num(np.maximum(err, 0))
        pos = x - 0.4 + bar * (j + 0.5)
        ax.bar(pos, np.nan_to_num(vals), bar, yerr=err, color=OKABE_ITO[j], hatch=HATCHES[j], edgecolor="white",
               capsize=2, error_kw={"lw": 0.8}, label=METRIC_LABELS[m])
        for p, i in zip(pos, order):
            if not column.in_gaps[i]:
                ax.bar(p, 1.0, bar, color="none", edgecolor="#777777", hatch="..", lw=0)
    labels = [f"{short_label(column.grouping.names[i], 14)}\n(n={int(column.sizes[i])}{'' if column.in_gaps[i] else ', small'})"
              for i in order]
    ax.set_xticks(x, labels, rotation=30 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value")
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    more = len(column.grouping.names) - len(names)
    return to_figure(fig, f"{column.name}: per-group metrics",
                     f"groups with the lowest accuracy first{f' (the {len(names)} lowest; {more} more in the tables)' if more else ''}; "
                     f"bars: value per group; whiskers: 95% interval (Wilson for proportions, bootstrap otherwise); dotted: too small to decide "
                     f"(fewer than {settings.min_group_size}); TPR/FPR for {settings.positive_label!r}")


def _extreme_groups(column: ColumnResult, k: int) -> tuple[int, int]:
    """(worst, best) compared groups for metric column k (lower is worse except FPR and ECE)."""
    vals = np.where(column.in_gaps, column.values[:, k], np.nan)
    low_is_bad = GROUP_METRICS[k] not in ("fpr", "ece")
    lo, hi = int(np.nanargmin(vals)), int(np.nanargmax(vals))
    return (lo, hi) if low_is_bad else (hi, lo)


def summarise(columns: list[ColumnResult], metrics: dict, intervals: dict, settings: Settings) -> str:
    """Numbers, never a verdict: whether a gap is acceptable is decided by the thresholds."""
    parts = []
    usable = [column for column in columns if np.isfinite(column.gaps["accuracy_gap"])]
    if usable:
        top = max(usable, key=lambda column: column.gaps["accuracy_gap"])
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
        weakest = min(usable, key=lambda column: column.gaps["worst_group_accuracy"])
        g = int(np.nanargmin(np.where(weakest.in_gaps, weakest.values[:, 0], np.nan)))
        parts.append(f"Worst compared group: {weakest.name} = {weakest.grouping.names[g]}, accuracy "
                     f"{weakest.values[g, 0]:.3f} (n={int(weakest.sizes[g])}).")
        floor = weakest.values[g, 0]
    else:
        parts.append(f"No column has two groups of at least {settings.min_group_size} images, so no gap was measured.")
        floor = np.inf
    smaller = [(column.values[g, 0], column, g) for column in columns for g in column.small_groups() if column.values[g, 0] < floor]
    if smaller:
        accuracy, column, g = min(smaller, key=lambda t: t[0])
        lo, hi = column.value_ci[g, 0]
        more = f" ({len(smaller) - 1} more below it)" if len(smaller) > 1 else ""
        parts.append(f"Lower still: {column.name} = {column.grouping.names[g]}, accuracy {accuracy:.3f} (95% CI {lo:.3f} to {hi:.3f}, "
                     f"n={int(column.sizes[g])}), too small to decide (under {settings.min_group_size} images){more}.")
    return " ".join(parts)
