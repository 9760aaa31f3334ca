"""Paired statistics of one metric of two runs, computed from their samples.csv, and the
unpaired fallback computed from the two reported intervals.

A paired method is used only after it reproduces each run's reported value from samples.csv
(to ``TOLERANCE``): samples.csv keeps 8 significant digits and a check may compute its metric
on other rows or in another way, and a paired test of a number other than the reported one
would compare something the reader never saw.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import numpy as np

from mcaudit.metrics.proportions import _z
from mcaudit.paired import PairedComparison, accuracy_difference, auroc_difference, paired_bootstrap

from .runs import ComparedRun

TOLERANCE = 1e-6
WALD_METHOD = ("unpaired Wald comparison of the two reported intervals (se = width / 2z); conservative when the "
               "runs' errors are positively correlated, as they are on the same images")


class NotPaired(Exception):
    """Why a paired method cannot be used for this metric (the message goes into the method)."""


class NoPairedMethod(NotPaired):
    """The metric has no paired method at all: the unpaired comparison is the plan, not a fallback."""


def wald_difference(metric: str, value_a: float, value_b: float, interval_a, interval_b, level: float,
                    higher_is_better: bool) -> PairedComparison:
    """Difference of two independent estimates, each with a symmetric normal interval read
    back from its reported interval; a normal p-value."""
    from scipy.stats import norm

    z = _z(level)
    se_a, se_b = ((hi - lo) / (2 * z) for lo, hi in (interval_a, interval_b))
    diff = value_a - value_b
    se = math.sqrt(se_a**2 + se_b**2)
    if se > 0:
        p = float(2 * norm.sf(abs(diff) / se))
    else:  # no spread reported: equal values are not different, unequal ones cannot be tested
        p = 1.0 if diff == 0 else float("nan")
    return PairedComparison(metric=metric, value_a=value_a, value_b=value_b, difference=diff,
                            interval=(diff - z * se, diff + z * se), p_value=p, method=WALD_METHOD, n=0,
                            level=level, higher_is_better=higher_is_better)


# --- columns of samples.csv -------------------------------------------------------------------


def _column(run: ComparedRun, name: str) -> list[str]:
    rows = run.samples or []
    if not rows or name not in rows[0]:
        raise NotPaired(f"{run.label}'s samples.csv has no column {name}")
    return [row.get(name) or "" for row in rows]


def _numbers(run: ComparedRun, name: str) -> np.ndarray:
    """A numeric column, NaN for empty cells."""
    try:
        return np.array([float(v) if v != "" else np.nan for v in _column(run, name)])
    except ValueError:
        raise NotPaired(f"{run.label}'s samples.csv column {name} is not numeric") from None


def _class_index(run: ComparedRun, name: str) -> np.ndarray:
    from mcaudit.reports.samples import text_cell

    classes = run.results["dataset"].get("classes") or []
    index = {text_cell(c): i for i, c in enumerate(classes)}
    cells = _column(run, name)
    if any(c not in index for c in cells):
        raise NotPaired(f"{run.label}'s samples.csv column {name} holds a class not in its results.json")
    return np.array([index[c] for c in cells])


def _probs(run: ComparedRun) -> np.ndarray:
    classes = run.results["dataset"].get("classes") or []
    return np.stack([_numbers(run, f"p_{c}") for c in classes], axis=1)


def clusters_of(run: ComparedRun) -> np.ndarray | None:
    """Subject ids where samples.csv names them: images of one patient are resampled together."""
    rows = run.samples or []
    if not rows or "subject" not in rows[0]:
        return None
    return np.array([row.get("subject") or f"row-{i}" for i, row in enumerate(rows)])


def _verify(run: ComparedRun, what: str, recomputed: float, reported: float) -> None:
    if not (np.isfinite(recomputed) and abs(recomputed - reported) <= TOLERANCE):
        raise NotPaired(f"{what} recomputed from {run.label}'s samples.csv ({recomputed:.6g}) does not reproduce "
                        f"the reported {reported:.6g}")


# --- statistics of stacked per-image rows: shape (..., n, d) -> (...) ---------------------------


def _recall_mean(values: np.ndarray) -> np.ndarray:
    """Balanced accuracy of rows (label, prediction): mean recall over the classes present."""
    labels, preds = values[..., 0], values[..., 1]
    k = int(values[..., :2].max()) + 1
    recalls = []
    for c in range(k):
        support = (labels == c).sum(axis=-1)
        hits = ((labels == c) & (preds == c)).sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(support > 0, hits / np.maximum(support, 1), np.nan))
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.stack(recalls, axis=-1), axis=-1)


def _mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


def _ece_statistic(n_bins: int) -> Callable[[np.ndarray], np.ndarray]:
    from mcaudit.plugins.checks.calibration import debiased_ece_rows

    edges = np.linspace(0.0, 1.0, n_bins + 1)

    def ece(values: np.ndarray) -> np.ndarray:
        flat = values.reshape(-1, values.shape[-2], 2)
        out = debiased_ece_rows(flat[..., 0], flat[..., 1], edges)
        return out.reshape(values.shape[:-2])

    return ece


def _bootstrap(statistic, a: np.ndarray, b: np.ndarray, metric: str, ctx: dict) -> PairedComparison:
    clusters = ctx["clusters"]
    return paired_bootstrap(statistic, a, b, ctx["rng"], metric=metric, n_boot=ctx["n_boot"], level=ctx["level"],
                            clusters=clusters, batched=clusters is None, higher_is_better=ctx["higher_is_better"])


# --- the metrics with a paired method ---------------------------------------------------------


def _accuracy(a: ComparedRun, b: ComparedRun, metric: str, reported: tuple, ctx: dict) -> PairedComparison:
    ca, cb = (_numbers(r, "correct") for r in (a, b))
    for run, c, value in zip((a, b), (ca, cb), reported):
        _verify(run, metric, float(np.mean(c)), value)
    return accuracy_difference(ca == 1, cb == 1, ctx["level"], ctx["clusters"])


def _auroc(a: ComparedRun, b: ComparedRun, metric: str, reported: tuple, ctx: dict) -> PairedComparison:
    labels = _class_index(a, "label")
    found = auroc_difference(labels, _probs(a), _probs(b), ctx["level"], ctx["clusters"])
    for run, value, want in zip((a, b), (found.value_a, found.value_b), reported):
        _verify(run, metric, value, want)
    return found


def _per_image_rows(run: ComparedRun) -> np.ndarray:
    return np.stack([_class_index(run, "label"), _class_index(run, "prediction")], axis=1)


def _balanced(a: ComparedRun, b: ComparedRun, metric: str, reported: tuple, ctx: dict) -> PairedComparison:
    ra, rb = _per_image_rows(a), _per_image_rows(b)
    for run, rows, value in zip((a, b), (ra, rb), reported):
        _verify(run, metric, float(_recall_mean(rows)), value)
    return _bootstrap(_recall_mean, ra, rb, metric, ctx)


def _recall(a: ComparedRun, b: ComparedRun, metric: str, reported: tuple, ctx: dict) -> PairedComparison:
    classes = a.results["dataset"].get("classes") or []
    name = metric.split(".", 1)[1]
    if name not in classes:
        raise NotPaired(f"{name} is not one of the classes")
    of_class = _class_index(a, "label") == classes.index(name)
    ca, cb = (_numbers(r, "correct")[of_class] for r in (a, b))
    for run, c, value in zip((a, b), (ca, cb), reported):
        _verify(run, metric, float(np.mean(c)) if len(c) else float("nan"), value)
    ctx = dict(ctx, clusters=None if ctx["clusters"] is None else ctx["clusters"][of_class])
    return _bootstrap(_mean, ca, cb, metric, ctx)


def _ece(a: ComparedRun, b: ComparedRun, metric: str, reported: tuple, ctx: dict) -> PairedComparison:
    params = [(r.results["checks"]["calibration"].get("params") or {}).get("n_bins") for r in (a, b)]
    if params[0] is None or params[0] != params[1]:
        raise NotPaired("the runs' calibration n_bins are unknown or differ")
    statistic = _ece_statistic(int(params[0]))
    rows = [np.stack([np.nanmax(_probs(r), axis=1), _numbers(r, "correct")], axis=1) for r in (a, b)]
    for run, values, want in zip((a, b), rows, reported):
        _verify(run, "the debiased ECE", float(statistic(values)), want)
    return _bootstrap(statistic, rows[0], rows[1], metric, ctx)


BUILT_IN: dict[str, Callable] = {
    "performance.accuracy": _accuracy,
    "performance.auroc_macro": _auroc,
    "performance.balanced_accuracy": _balanced,
    "calibration.ece": _ece,
}


def _declared_column(run: ComparedRun, check: str, metric: str) -> str:
    details = run.results["checks"][check].get("details") or {}
    column = (details.get("paired_columns") or {}).get(metric)
    if not column:
        raise NoPairedMethod(f"{check} in {run.label} declares no per-image column for {metric}")
    return f"{check}.{column}"


def _declared(a: ComparedRun, b: ComparedRun, check: str, metric: str, reported: tuple, ctx: dict) -> PairedComparison:
    """A metric its check declared to be the mean of a per-image column (details.paired_columns):
    compared on the images both runs filled in, McNemar for 0/1 columns, else a paired
    bootstrap of the mean."""
    columns = [_declared_column(r, check, metric) for r in (a, b)]
    va, vb = _numbers(a, columns[0]), _numbers(b, columns[1])
    for run, values, column, want in zip((a, b), (va, vb), columns, reported):
        filled = values[np.isfinite(values)]
        _verify(run, f"the mean of {column}", float(filled.mean()) if len(filled) else float("nan"), want)
    both = np.isfinite(va) & np.isfinite(vb)
    if both.sum() < 2:
        raise NotPaired(f"fewer than two images have {columns[0]} in both runs")
    va, vb = va[both], vb[both]
    clusters = None if ctx["clusters"] is None else ctx["clusters"][both]
    if np.isin(np.r_[va, vb], (0.0, 1.0)).all():
        found = replace(accuracy_difference(va == 1, vb == 1, ctx["level"], clusters), metric=metric,
                        higher_is_better=ctx["higher_is_better"])
    else:
        found = _bootstrap(_mean, va, vb, metric, dict(ctx, clusters=clusters))
    return replace(found, method=f"{found.method}, on the per-image column {columns[0]}")


def paired_statistic(a: ComparedRun, b: ComparedRun, check: str, metric: str, reported: tuple, ctx: dict) -> PairedComparison:
    """The paired comparison of ``check.metric``; raises :class:`NotPaired` with the reason
    when there is no paired method for it or it does not reproduce the reported values.
    ``ctx``: level, n_boot, rng, clusters, higher_is_better."""
    name = f"{check}.{metric}"
    if name in BUILT_IN:
        found = BUILT_IN[name](a, b, metric, reported, ctx)
    elif check == "performance" and metric.startswith("recall."):
        found = _recall(a, b, metric, reported, ctx)
    else:
        found = _declared(a, b, check, metric, reported, ctx)
    return replace(found, metric=name, higher_is_better=ctx["higher_is_better"])
