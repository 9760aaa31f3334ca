"""Temperature scaling: fit T on one stratified part of the images, judge it on the rest."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mcaudit.metrics import brier_score, equal_width_edges, negative_log_likelihood

from .statistics import debiased_top_label_ece, softmax

# Temperatures outside this range mean the logits carry (almost) no usable ranking signal.
T_MIN, T_MAX = 1e-2, 1e2
MIN_SPLIT = 10  # fewer images than this on either side of the split: no temperature scaling


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T).

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded scalar search on log T
    finds the global minimum.
    """
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits / math.exp(log_t), labels),
        bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded", options={"xatol": 1e-9},
    )
    return float(math.exp(res.x))


@dataclass
class TemperatureScaling:
    """A temperature fitted on ``n_fit`` images and its effect on ``n_heldout`` others."""

    temperature: float
    n_fit: int
    n_heldout: int
    labels: np.ndarray  # of the held-out images
    p_raw: np.ndarray  # held-out probabilities with T = 1
    p_scaled: np.ndarray  # held-out probabilities with logits divided by T
    before: dict[str, float]  # ece, nll, brier, confidence on the held-out images with T = 1
    after: dict[str, float]  # the same with logits divided by T
    accuracy: float  # unchanged by T

    @property
    def at_bound(self) -> bool:
        return self.temperature < T_MIN * 1.01 or self.temperature > T_MAX / 1.01

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "temperature": self.temperature,
            "ece_before_scaling": self.before["ece"],
            "ece_after_scaling": self.after["ece"],
            "nll_before_scaling": self.before["nll"],
            "nll_after_scaling": self.after["nll"],
            "n_heldout": float(self.n_heldout),
        }

    @property
    def split(self) -> dict[str, int]:
        return {"fit_rows": self.n_fit, "heldout_rows": self.n_heldout}


def fit_and_judge_temperature(ctx, logits, labels, fraction, split_seed, n_bins) -> TemperatureScaling | None:
    """None when either side of the split would hold fewer than MIN_SPLIT images."""
    n = len(labels)
    fit_rows = ctx.stratified_rows(int(round(fraction * n)), f"calibration:split:{split_seed}")
    held = np.setdiff1d(np.arange(n), fit_rows)
    if len(fit_rows) < MIN_SPLIT or len(held) < MIN_SPLIT:
        return None
    t = fit_temperature(logits[fit_rows], labels[fit_rows])
    raw, scaled = logits[held], logits[held] / t
    y = labels[held]
    p_raw, p_scaled = softmax(raw), softmax(scaled)
    edges = equal_width_edges(n_bins)
    before = _held_out_scores(raw, p_raw, y, edges)
    after = _held_out_scores(scaled, p_scaled, y, edges)
    accuracy = float(np.mean(p_raw.argmax(axis=1) == y))
    return TemperatureScaling(t, len(fit_rows), len(held), y, p_raw, p_scaled, before, after, accuracy)


def _held_out_scores(logits, probs, labels, edges) -> dict[str, float]:
    return {"ece": debiased_top_label_ece(probs, labels, edges), "nll": negative_log_likelihood(logits, labels),
            "brier": brier_score(probs, labels), "confidence": float(probs.max(axis=1).mean())}
