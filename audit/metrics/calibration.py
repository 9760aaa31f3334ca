"""Calibration: equal-width and equal-mass bins (shared with the fairness engine's per-group
ECE), expected and maximum calibration error, classwise ECE, the Brier score (scikit-learn)
and the negative log-likelihood, computed from logits because scikit-learn's ``log_loss``
takes probabilities and clips them, which caps the loss of a confidently wrong answer."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def equal_width_edges(n_bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def equal_mass_edges(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Edges at the confidence quantiles, so each bin holds about the same number of images."""
    edges = np.quantile(np.asarray(confidence, dtype=np.float64), np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def calibration_bin_index(confidence: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each confidence's bin: half-open [lo, hi), the last bin closed."""
    n_bins = len(edges) - 1
    return np.clip(np.searchsorted(edges, np.asarray(confidence, dtype=np.float64), side="right") - 1, 0, n_bins - 1)


def calibration_bins(confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: image count, mean confidence and mean outcome (NaN in empty bins)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    n_bins = len(edges) - 1
    idx = calibration_bin_index(confidence, edges)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    out_sum = np.bincount(idx, weights=np.asarray(outcome, dtype=np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, conf_sum / counts, out_sum / counts


def expected_calibration_error(confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> float:
    """Count-weighted mean of |mean outcome - mean confidence| over the bins."""
    counts, conf, acc = calibration_bins(confidence, outcome, edges)
    if counts.sum() == 0:
        return float("nan")
    full = counts > 0
    return float(np.sum(counts[full] * np.abs(acc[full] - conf[full])) / counts.sum())


def max_calibration_error(confidence: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> float:
    """Largest |mean outcome - mean confidence| over the non-empty bins."""
    counts, conf, acc = calibration_bins(confidence, outcome, edges)
    full = counts > 0
    return float(np.max(np.abs(acc[full] - conf[full]))) if full.any() else float("nan")


def top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidence of the predicted class and whether that prediction is right."""
    preds = np.argmax(probs, axis=1)
    return probs[np.arange(len(preds)), preds], (preds == labels).astype(np.float64)


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Mean over classes of the ECE of each class's probability against "is this class"."""
    edges = equal_width_edges(n_bins)
    return float(np.mean([expected_calibration_error(probs[:, k], labels == k, edges) for k in range(probs.shape[1])]))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error of the probability vector against the one-hot label.

    Summed over classes (range 0 to 2) for more than two classes; halved for two classes,
    where it equals the mean of (p(positive) - y)^2 (range 0 to 1), as scikit-learn reports it.
    """
    n_classes = probs.shape[1]
    if n_classes == 2:
        return float(skm.brier_score_loss(labels, probs[:, 1], labels=[0, 1]))
    return float(skm.brier_score_loss(labels, probs, labels=np.arange(n_classes), scale_by_half=False))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log softmax(logits)[label], from logits so that a near-zero probability stays finite."""
    z = np.asarray(logits, dtype=np.float64)
    zmax = z.max(axis=1, keepdims=True)
    log_norm = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))
