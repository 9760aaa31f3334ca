"""Intervals for proportions: Wilson and Clopper-Pearson from scipy.stats, Wilson on an
effective sample size for items clustered by patient, and the Jeffreys posterior of balanced
accuracy (a mean of per-class proportions). Each was chosen for its coverage, measured in
tests/test_coverage.py and written up in docs/statistics.md."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=8)
def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion: near-nominal coverage even for small n or a
    proportion near 0 or 1, where the Wald interval collapses (Brown, Cai and DasGupta 2001)."""
    if trials > 0 and (successes != int(successes) or trials != int(trials)):
        # effective counts (n shrunk by a design effect) are not integers, which scipy's
        # binomtest requires; the score interval is the same formula for any n
        return _wilson_from_share(successes / trials, float(trials), level)
    return _binomial_interval(successes, trials, level, "wilson")


def _binomial_interval(successes: int, trials: int, level: float, method: str) -> tuple[float, float]:
    if trials <= 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method=method)
    return float(max(0.0, ci.low)), float(min(1.0, ci.high))


def clopper_pearson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion: coverage at least nominal for every n
    and p, at the price of some width; for small samples such as attacked-image subsets."""
    return _binomial_interval(successes, trials, level, "exact")


def cluster_wilson_interval(correct: np.ndarray, clusters: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Wilson interval for the share of ``correct`` items when items of one cluster (patient)
    are correlated: the sample size is shrunk by the design effect, the ratio-estimator
    variance over clusters divided by the binomial one (Kish 1965; for clustered
    proportions, Dean and Pagano 2015). Never narrower than the plain Wilson interval. Where
    the design effect cannot be estimated (every item agrees, or one cluster) each cluster
    counts as one item, the most a cluster can weigh."""
    correct = np.asarray(correct, dtype=np.float64)
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan")
    _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(cluster_of.max()) + 1
    p = float(correct.mean())
    if n_clusters < 2 or p in (0.0, 1.0):
        return _wilson_from_share(p, float(n_clusters), level)
    residual = np.bincount(cluster_of, weights=correct - p, minlength=n_clusters)
    var_cluster = n_clusters / (n_clusters - 1) * np.sum(residual**2) / n**2
    design_effect = max(1.0, var_cluster / (p * (1 - p) / n))
    return _wilson_from_share(p, n / design_effect, level)


def _wilson_from_share(p: float, trials: float, level: float) -> tuple[float, float]:
    z = _z(level)
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def balanced_accuracy_interval(cm: np.ndarray, rng: np.random.Generator, level: float = 0.95,
                               n_draws: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Interval for balanced accuracy from the posterior of the mean per-class recall
    (Brodersen et al. 2010), each recall with its Jeffreys Beta(k + 1/2, n - k + 1/2)
    posterior, as the Jeffreys interval for one proportion (Brown, Cai and DasGupta 2001).

    Unlike a bootstrap it does not collapse when a model predicts one class almost always
    (recalls at 0 and 1 do not move under resampling). ``cm`` may be a stack (..., k, k) of
    confusion matrices; classes without images are left out, as in the point estimate.
    Returns (lower, upper) arrays of the stack's shape (0-d for one matrix).

    The posterior pulls a recall of 0 of 2 up to about 0.17, so with several tiny classes the
    posterior quantiles can miss the observed balanced accuracy itself (HAM10000: 0.156 with
    quantiles 0.172 to 0.408). An interval that excludes its own estimate contradicts the
    number printed beside it, so the interval is widened to reach the estimate, as Brown, Cai
    and DasGupta set the Jeffreys bound to 0 (or 1) when none (or all) succeed; widening only
    adds coverage.
    """
    cm = np.asarray(cm)
    support = cm.sum(axis=-1).astype(np.float64)
    hits = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    present = support > 0
    a = np.where(present, hits + 0.5, 1.0)
    b = np.where(present, support - hits + 0.5, 1.0)
    draws = rng.beta(a, b, size=(n_draws,) + a.shape)
    n_present = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(present, draws, 0.0).sum(axis=-1) / n_present
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.where(present, hits / np.maximum(support, 1), 0.0).sum(axis=-1) / n_present
    lo, hi = np.minimum(lo, observed), np.maximum(hi, observed)
    none = n_present == 0
    return np.where(none, np.nan, lo), np.where(none, np.nan, hi)
