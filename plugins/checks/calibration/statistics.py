"""Calibration statistics: the debiased binned ECE, its symmetric bootstrap interval, and the
plain metrics of the whole image set (definitions in the package docstring)."""

from __future__ import annotations

import numpy as np

from mcaudit.metrics import (
    bootstrap_interval,
    brier_score,
    equal_mass_edges,
    equal_width_edges,
    expected_calibration_error,
    max_calibration_error,
    negative_log_likelihood,
    top_label,
)

INTERVAL_NOTE = (
    "95% intervals: ECE and class-wise ECE are debiased (each bin's sampling noise removed) and their interval is the "
    "estimate plus or minus the larger distance to the 2.5th or 97.5th bootstrap percentile, floored at 0 (coverage "
    "checked by simulation); Brier and NLL use percentile bootstrap intervals. Resampled: images, or whole subjects "
    "when the data name them, not stratified by class. The plain ECE, equal-mass ECE and MCE are biased upwards "
    "with few images per bin and get no interval."
)


def debiased_ece_rows(confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Debiased binned ECE of each row of ``confidence``/``outcome`` (shape (M, n)).

    Per bin, d is the mean of (outcome - confidence) and v the estimated variance of that
    mean; E[d^2] = true gap^2 + v, so sqrt(max(0, d^2 - v)) removes most of the upward bias
    that |d| carries when a bin holds few images. v is the larger of the sample variance and
    c(1 - c), c the bin's mean confidence (the variance of a 0/1 outcome predicted with
    probability c), over the bin's count: a small bin whose outcomes happen to agree would
    otherwise show no noise at all.
    """
    confidence = np.atleast_2d(np.asarray(confidence, dtype=np.float64))
    diff = np.atleast_2d(np.asarray(outcome, dtype=np.float64)) - confidence
    m, n = confidence.shape
    n_bins = len(edges) - 1
    b = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    key = (np.arange(m)[:, None] * n_bins + b).ravel()
    size = m * n_bins
    count = np.bincount(key, minlength=size).reshape(m, n_bins).astype(np.float64)
    total = np.bincount(key, weights=diff.ravel(), minlength=size).reshape(m, n_bins)
    squares = np.bincount(key, weights=(diff * diff).ravel(), minlength=size).reshape(m, n_bins)
    conf_sum = np.bincount(key, weights=confidence.ravel(), minlength=size).reshape(m, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        mean_conf = conf_sum / count
        sample = np.where(count > 1, np.maximum(squares - count * mean * mean, 0.0) / np.maximum(count - 1, 1), 0.0)
        variance_of_mean = np.maximum(sample, mean_conf * (1 - mean_conf)) / count
        gap = np.sqrt(np.maximum(0.0, mean * mean - variance_of_mean))
    return np.where(count > 0, count * gap, 0.0).sum(axis=1) / n


def debiased_top_label_ece(probs: np.ndarray, labels: np.ndarray, edges: np.ndarray) -> float:
    conf, correct = top_label(probs, labels)
    return float(debiased_ece_rows(conf, correct, edges)[0])


def debiased_classwise_ece(probs: np.ndarray, labels: np.ndarray, edges: np.ndarray) -> float:
    k = probs.shape[1]
    return float(debiased_ece_rows(probs.T, (labels[None, :] == np.arange(k)[:, None]), edges).mean())


def symmetric_interval(estimate: float, q_low: float, q_high: float) -> tuple[float, float]:
    """The estimate plus or minus the larger distance to the bootstrap percentiles, floored at 0.

    The debiased ECE is still biased (upwards near 0, downwards for a moderate ECE in small
    samples), so its percentile interval alone misses; reflecting the longer tail around the
    estimate covers both cases (see the package docstring for the simulated coverage).
    """
    if not (np.isfinite(estimate) and np.isfinite(q_low) and np.isfinite(q_high)):
        return float("nan"), float("nan")
    half = max(q_high - estimate, estimate - q_low, 0.0)
    return max(0.0, estimate - half), estimate + half


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibration_metrics(logits: np.ndarray, probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    conf, correct = top_label(probs, labels)
    edges = equal_width_edges(n_bins)
    return {
        "ece": debiased_top_label_ece(probs, labels, edges),
        "ece_plugin": expected_calibration_error(conf, correct, edges),
        "ece_equal_mass": expected_calibration_error(conf, correct, equal_mass_edges(conf, n_bins)),
        "mce": max_calibration_error(conf, correct, edges),
        "classwise_ece": debiased_classwise_ece(probs, labels, edges),
        "brier": brier_score(probs, labels),
        "nll": negative_log_likelihood(logits, labels),
        "confidence": float(conf.mean()),
        "accuracy": float(correct.mean()),
        "overconfidence": float(conf.mean() - correct.mean()),
    }


def calibration_intervals(ctx, logits, probs, labels, n_bins: int, n_boot: int) -> dict[str, tuple[float, float]]:
    """95% intervals of the debiased ECEs, Brier and NLL; each draws from its own named stream."""
    edges = equal_width_edges(n_bins)
    clusters = ctx.clusters()
    out = {}
    debiased = {
        "ece": lambda i: debiased_top_label_ece(probs[i], labels[i], edges),
        "classwise_ece": lambda i: debiased_classwise_ece(probs[i], labels[i], edges),
    }
    for k, f in debiased.items():
        q = bootstrap_interval(f, len(labels), ctx.rng(f"calibration:bootstrap:{k}"), n_boot, clusters=clusters)
        out[k] = symmetric_interval(f(np.arange(len(labels))), *q)
    # Brier and NLL are means over images, for which the percentile bootstrap is fine.
    smooth = {
        "brier": lambda i: brier_score(probs[i], labels[i]),
        "nll": lambda i: negative_log_likelihood(logits[i], labels[i]),
    }
    for k, f in smooth.items():
        out[k] = bootstrap_interval(f, len(labels), ctx.rng(f"calibration:bootstrap:{k}"), n_boot, clusters=clusters)
    return {k: v for k, v in out.items() if np.isfinite(v[0])}
