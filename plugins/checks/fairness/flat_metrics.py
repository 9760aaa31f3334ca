"""The check's flat metric names (what gates read): each column's gaps and p-values, and the
maxima and minima across columns with their intervals."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .columns import ColumnResult
from .engine import GAP_KEYS
from .inference import Replicates, contrasts, max_difference_interval, min_value_interval
from .settings import Settings

# Across-column metric -> the per-column gap it is the largest of.
CROSS_COLUMN = {"max_accuracy_gap": "accuracy_gap", "max_dp_difference": "dp_difference", "max_eo_difference": "eo_difference"}


@dataclass
class FlatMetrics:
    """Metrics, intervals, images behind each metric, and why an undefined one is undefined."""

    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    not_evaluated: dict[str, str] = field(default_factory=dict)


def flat_metrics(columns: list[ColumnResult], boots: list[Replicates], settings: Settings) -> FlatMetrics:
    out = FlatMetrics()
    for column in columns:
        _add_column(out, column, settings)
    usable = [c for c in columns if c.in_gaps.sum() >= 2]
    usable_boots = [b for c, b in zip(columns, boots) if c.in_gaps.sum() >= 2] if boots else []
    no_pair = (f"no column has two groups of at least {settings.min_group_size} images "
               f"(fairness.min_group_size), so no gap can be measured")
    for metric, key in CROSS_COLUMN.items():
        _add_largest_gap(out, metric, key, usable, usable_boots, no_pair)
    _add_worst_group_accuracy(out, usable, usable_boots, no_pair)
    holm = [c.p_value_holm for c in columns if np.isfinite(c.p_value_holm)]
    out.metrics["min_p_value_holm"] = float(min(holm)) if holm else float("nan")
    if not holm:
        out.not_evaluated["min_p_value_holm"] = "n_permutations = 0" if settings.n_permutations == 0 else no_pair
    return out


def _add_column(out: FlatMetrics, column: ColumnResult, settings: Settings) -> None:
    for key in GAP_KEYS:
        name = f"{column.name}.{key}"
        out.metrics[name] = column.gaps[key]
        out.n[name] = column.n_compared
        if key in column.gap_ci:
            out.intervals[name] = column.gap_ci[key]
        if not np.isfinite(column.gaps[key]):
            out.not_evaluated[name] = column_reason(column, key, settings)
    out.metrics[f"{column.name}.p_value"] = column.p_value
    out.metrics[f"{column.name}.p_value_holm"] = column.p_value_holm
    out.metrics[f"{column.name}.n_groups"] = float(column.in_gaps.sum())
    if not np.isfinite(column.p_value):
        reason = ("n_permutations = 0" if settings.n_permutations == 0
                  else column_reason(column, "largest_gap", settings))
        for key in ("p_value", "p_value_holm"):
            out.not_evaluated[f"{column.name}.{key}"] = reason


def _add_largest_gap(out: FlatMetrics, metric: str, key: str, usable: list[ColumnResult],
                     boots: list[Replicates], no_pair: str) -> None:
    """``metric`` = the largest gap ``key`` over the columns; its interval is the max-|t|
    band over every column's pairwise differences together."""
    defined = [i for i, c in enumerate(usable) if np.isfinite(c.gaps[key])]
    if not defined:
        out.metrics[metric] = float("nan")
        out.not_evaluated[metric] = no_pair if not usable else f"{key.replace('_', ' ')} is undefined in every column"
        return
    value, best = max((usable[i].gaps[key], i) for i in defined)
    out.metrics[metric] = float(value)
    out.n[metric] = usable[best].n_compared
    if boots:
        observed = np.concatenate([contrasts(usable[i], key, usable[i].values, usable[i].rates) for i in defined])
        replicated = np.concatenate([contrasts(usable[i], key, *boots[i]) for i in defined], axis=-1)
        lo, hi = max_difference_interval(observed, replicated)
        if np.isfinite(lo):
            out.intervals[metric] = (lo, hi)


def _add_worst_group_accuracy(out: FlatMetrics, usable: list[ColumnResult], boots: list[Replicates],
                              no_pair: str) -> None:
    metric = "worst_group_accuracy"
    if not usable:
        out.metrics[metric] = float("nan")
        out.not_evaluated[metric] = no_pair
        return
    value, at = min((c.gaps[metric], i) for i, c in enumerate(usable))
    out.metrics[metric] = float(value)
    out.n[metric] = usable[at].n_compared
    if boots:
        observed = np.concatenate([c.values[c.in_gaps, 0] for c in usable])
        replicated = np.concatenate([b.values[:, c.in_gaps, 0] for c, b in zip(usable, boots)], axis=1)
        lo, hi = min_value_interval(observed, replicated)
        if np.isfinite(lo):
            out.intervals[metric] = (lo, hi)


def column_reason(column: ColumnResult, key: str, settings: Settings) -> str:
    """Why the column's metric ``key`` is undefined."""
    if column.in_gaps.sum() < 2:
        sizes = ", ".join(f"{g} n={int(k)}" for g, k in zip(column.grouping.names, column.sizes)) or "none"
        return f"{column.name} has fewer than two groups of at least {settings.min_group_size} images ({sizes})"
    metric = key.removesuffix("_gap").removesuffix("_ratio")
    if metric == "selection_rate" and settings.macro:
        return "selection rate averaged over all classes is always 1/K; name fairness.positive_class to compare it"
    return (f"{metric.replace('_', ' ')} is defined in fewer than two compared groups of {column.name} "
            "(e.g. a group with one class only)")
