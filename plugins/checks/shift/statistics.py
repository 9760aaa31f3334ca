"""Numbers from the per-image outcome: accuracy and balanced accuracy per corruption and
severity with their intervals, the accuracy drop against clean, the corruption error and
mean corruption error (mCE) against a reference model (Hendrycks and Dietterich 2019), and
the expected calibration error per severity.

Intervals are those of docs/statistics.md: Wilson for a proportion (on the effective sample
size when slices share a subject), the Jeffreys posterior of the mean recall for balanced
accuracy (a bootstrap over subjects when they are named), and a paired percentile bootstrap
over images or subjects for differences and ratios computed on the same images.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mcaudit.metrics import (balanced_accuracy_interval, balanced_accuracy_of, bootstrap_interval,
                             cluster_wilson_interval, confusion_resamples, equal_width_edges,
                             expected_calibration_error, percentile_interval, wilson_interval)

N_BOOT = 2000


class Numbers:
    """Metrics, intervals, counts and interval methods, filled by the functions below."""

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.intervals: dict[str, tuple[float, float]] = {}
        self.counts: dict[str, tuple[int, int]] = {}
        self.methods: dict[str, str] = {}
        self.not_evaluated: dict[str, str] = {}

    def put(self, name: str, value: float, interval=None, method: str = "", count=None) -> None:
        self.metrics[name] = float(value)
        if interval is not None and np.all(np.isfinite(interval)):
            self.intervals[name] = (float(interval[0]), float(interval[1]))
            self.methods[name] = method
        if count is not None:
            self.counts[name] = (int(count[0]), int(count[1]))


def accuracy_with_interval(correct: np.ndarray, clusters) -> tuple[float, tuple[float, float], str]:
    n, k = len(correct), int(correct.sum())
    if clusters is None:
        return k / n, wilson_interval(k, n), "Wilson"
    return k / n, cluster_wilson_interval(correct, clusters), "Wilson on the effective sample size (subjects)"


def confusion_counts(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """The confusion matrix (rows true, columns predicted) by one bincount: the same counts as
    scikit-learn's, without its input validation, which cost more than the rest of the
    statistics over a plan's 46 cells."""
    cells = np.asarray(labels, dtype=np.int64) * n_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(cells, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_with_interval(labels, preds, n_classes: int, rng, clusters) -> tuple[float, tuple[float, float], str]:
    cm = confusion_counts(labels, preds, n_classes)
    value = float(balanced_accuracy_of(cm)) if len(labels) else float("nan")
    if clusters is None:
        lo, hi = balanced_accuracy_interval(cm, rng)
        return value, (float(lo), float(hi)), "Jeffreys posterior of the mean recall"
    cms = confusion_resamples(labels, preds, n_classes, rng, n_boot=N_BOOT, clusters=clusters)
    return value, percentile_interval(balanced_accuracy_of(cms)), "percentile bootstrap over subjects"


def paired_interval(statistic: Callable[[np.ndarray], np.ndarray], n: int, rng, clusters) -> tuple[tuple[float, float], str]:
    """Percentile bootstrap of ``statistic(indices)`` resampling images (batched) or subjects."""
    if clusters is None:
        return bootstrap_interval(statistic, n, rng, n_boot=N_BOOT, batched=True), "paired percentile bootstrap over images"
    single = lambda idx: float(statistic(idx[None])[0])  # noqa: E731
    return bootstrap_interval(single, n, rng, n_boot=N_BOOT, clusters=clusters), "paired percentile bootstrap over subjects"


def cell_numbers(out: Numbers, outcome, plan, n_classes: int, rng: Callable, clusters) -> None:
    """Accuracy and balanced accuracy, clean and per (corruption, severity)."""
    labels, n = outcome.labels, len(outcome.labels)
    cells = [("clean", outcome.clean_pred)] + [(f"{c}.s{s}", outcome.pred[(c, s)]) for c, s in plan.cells]
    for name, pred in cells:
        correct = pred == labels
        acc, ci, method = accuracy_with_interval(correct, clusters)
        out.put("clean_accuracy" if name == "clean" else f"accuracy.{name}", acc, ci, method, (correct.sum(), n))
        bal, ci, method = balanced_with_interval(labels, pred, n_classes, rng(f"shift:balanced:{name}"), clusters)
        out.put("clean_balanced_accuracy" if name == "clean" else f"balanced_accuracy.{name}", bal, ci, method)


def correctness(outcome, plan, corruption: str, reference: bool = False) -> np.ndarray:
    """n x severities: 1 where the (reference) model is right on the corrupted image."""
    source = outcome.ref_pred if reference else outcome.pred
    return np.stack([source[(corruption, s)] == outcome.labels for s in plan.severities], axis=1).astype(np.float64)


def replicate_means(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Column means of ``values`` (n x k) over each replicate's indices (rows of ``idx``): an
    (n_boot x k) array, a block of replicates at a time so memory stays near 32 MB at any n."""
    block = max(1, (1 << 22) // max(1, values.size))
    return np.concatenate([values[idx[a:a + block]].mean(axis=1) for a in range(0, len(idx), block)])


def drop_intervals(drops: np.ndarray, plan, rng: Callable, clusters) -> list[tuple[tuple[float, float], str]]:
    """Intervals of each corruption's drop, then of their mean and their worst (n x corruptions
    ``drops``). Over images, all from one set of paired replicates (the per-corruption means of
    each replicate give every statistic, so one draw serves them all); over subjects, one
    cluster bootstrap per statistic."""
    n, k = drops.shape
    if clusters is not None:
        stats = [lambda idx, j=j: drops[idx, j].mean(axis=-1) for j in range(k)]
        stats += [lambda idx: drops[idx].mean(axis=(-1, -2)), lambda idx: drops[idx].mean(axis=-2).max(axis=-1)]
        streams = [f"shift:drop:{c}" for c in plan.corruptions] + ["shift:drop:mean", "shift:drop:worst"]
        return [paired_interval(f, n, rng(name), clusters) for f, name in zip(stats, streams)]
    method = "paired percentile bootstrap over images"
    if n < 2:
        return [((float("nan"), float("nan")), method)] * (k + 2)
    means = replicate_means(drops, rng("shift:drop").integers(0, n, (N_BOOT, n)))
    columns = [means[:, j] for j in range(k)] + [means.mean(axis=1), means.max(axis=1)]
    return [(percentile_interval(values), method) for values in columns]


def drop_numbers(out: Numbers, outcome, plan, rng: Callable, clusters) -> None:
    """Accuracy drop against clean per corruption (mean over severities), its mean over
    corruptions and its worst, each with a paired bootstrap interval; relative error."""
    clean = (outcome.clean_pred == outcome.labels).astype(np.float64)
    drops = np.stack([clean - correctness(outcome, plan, c).mean(axis=1) for c in plan.corruptions], axis=1)
    clean_error = 1 - clean.mean()
    intervals = drop_intervals(drops, plan, rng, clusters)
    for j, c in enumerate(plan.corruptions):
        out.put(f"accuracy_drop.{c}", drops[:, j].mean(), *intervals[j])
        error = 1 - correctness(outcome, plan, c).mean()
        out.put(f"relative_error.{c}", error / clean_error if clean_error > 0 else float("nan"))
    out.put("mean_accuracy_drop", drops.mean(), *intervals[-2])
    out.put("worst_accuracy_drop", drops.mean(axis=0).max(), *intervals[-1])


def _ce(wrong: np.ndarray, ref_wrong: np.ndarray, clean: np.ndarray, ref_clean: np.ndarray, idx):
    """CE and relative CE per corruption from (..., n, corruptions, severities) error arrays."""
    e, r = wrong[idx].mean(axis=-3).sum(axis=-1), ref_wrong[idx].mean(axis=-3).sum(axis=-1)
    s = wrong.shape[-1]
    e0, r0 = clean[idx].mean(axis=-1)[..., None] * s, ref_clean[idx].mean(axis=-1)[..., None] * s
    with np.errstate(divide="ignore", invalid="ignore"):
        return e / r, (e - e0) / (r - r0)


def reference_numbers(out: Numbers, outcome, plan, rng: Callable, clusters) -> None:
    """CE, relative CE and their means (mCE, relative mCE) against the reference model."""
    if outcome.ref_clean is None:
        reason = "no reference model: give --reference-model (the public checkpoint the model was fine-tuned from)"
        for name in ["mce", "relative_mce"] + [f"{k}.{c}" for k in ("ce", "relative_ce") for c in plan.corruptions]:
            out.not_evaluated[name] = reason
        return
    wrong = 1 - np.stack([correctness(outcome, plan, c) for c in plan.corruptions], axis=1)
    ref_wrong = 1 - np.stack([correctness(outcome, plan, c, reference=True) for c in plan.corruptions], axis=1)
    clean = (outcome.clean_pred != outcome.labels).astype(np.float64)
    ref_clean = (outcome.ref_clean != outcome.labels).astype(np.float64)
    n = len(clean)
    ce, rel = _ce(wrong, ref_wrong, clean, ref_clean, slice(None))
    for j, c in enumerate(plan.corruptions):
        out.put(f"ce.{c}", ce[j])
        out.put(f"relative_ce.{c}", rel[j])
    ci, method = paired_interval(lambda idx: _ce(wrong, ref_wrong, clean, ref_clean, idx)[0].mean(axis=-1), n,
                                 rng("shift:mce"), clusters)
    out.put("mce", ce.mean(), ci, method)
    out.put("relative_mce", rel.mean())


def calibration_numbers(out: Numbers, outcome, plan, n_bins: int = 15) -> None:
    """Expected calibration error (top label, equal-width bins), clean and per severity with
    the corruptions pooled."""
    edges = equal_width_edges(n_bins)
    out.put("ece.clean", expected_calibration_error(outcome.clean_conf, outcome.clean_pred == outcome.labels, edges))
    for s in plan.severities:
        conf = np.concatenate([outcome.conf[(c, s)] for c in plan.corruptions])
        hit = np.concatenate([outcome.pred[(c, s)] == outcome.labels for c in plan.corruptions])
        out.put(f"ece.s{s}", expected_calibration_error(conf, hit, edges))


def compute(outcome, plan, n_classes: int, rng: Callable, clusters) -> Numbers:
    out = Numbers()
    cell_numbers(out, outcome, plan, n_classes, rng, clusters)
    drop_numbers(out, outcome, plan, rng, clusters)
    reference_numbers(out, outcome, plan, rng, clusters)
    calibration_numbers(out, outcome, plan)
    out.metrics["n_images"] = float(len(outcome.labels))
    return out


def worst_corruption(numbers: Numbers, plan) -> str:
    return max(plan.corruptions, key=lambda c: numbers.metrics[f"accuracy_drop.{c}"])
