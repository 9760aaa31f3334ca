"""Paired statistics for two models scored on the same images: the difference in a metric,
a paired interval for it, a p-value, and the Holm correction across several comparisons.

Pairing is the point: two models audited on the same images make many of the same mistakes,
so the difference between them is far more precise than two separate intervals suggest.
Accuracy uses the discordant pairs (McNemar's mid-p test, Newcombe's paired score interval),
the AUROC DeLong's test for correlated ROC curves, and anything else computed from per-image
values a paired bootstrap that draws the same images (or subjects) for both models. A model
is "better" only when the interval of the difference excludes zero and the (Holm-adjusted)
p-value is below 1 - level. Methods and measured coverage: docs/statistics.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np

from mcaudit.metrics.auroc_intervals import _iid_variance, auroc_influence
from mcaudit.metrics.proportions import _z
from mcaudit.metrics.resampling import bootstrap_interval

MCNEMAR_METHOD = "McNemar mid-p test; Newcombe's paired score interval (method 10)"
MCNEMAR_CLUSTER_METHOD = "clustered McNemar test (Durkalski 2003); Wald interval with variance over subjects"
DELONG_METHOD = "DeLong's test for correlated ROC curves"
DELONG_CLUSTER_METHOD = "DeLong's test for correlated ROC curves, influences summed over subjects (Obuchowski 1997)"
BOOTSTRAP_METHOD = "paired percentile bootstrap over images"
BOOTSTRAP_CLUSTER_METHOD = "paired percentile bootstrap over subjects"


@dataclass(frozen=True)
class PairedComparison:
    """Model A against model B on one metric: ``difference`` is A minus B."""

    metric: str
    value_a: float
    value_b: float
    difference: float
    interval: tuple[float, float]
    p_value: float
    method: str
    n: int
    level: float = 0.95
    higher_is_better: bool = True
    p_adjusted: float | None = None

    @property
    def excludes_zero(self) -> bool:
        lo, hi = self.interval
        return bool(lo > 0 or hi < 0)

    @property
    def better(self) -> str | None:
        """"a" or "b" for the model that is better on this metric, None when undecided: the
        interval must exclude zero and the p-value (Holm-adjusted when set) be under 1 - level."""
        p = self.p_value if self.p_adjusted is None else self.p_adjusted
        if not self.excludes_zero or not p < 1 - self.level:
            return None
        a_higher = self.interval[0] > 0
        return "a" if a_higher == self.higher_is_better else "b"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["interval"] = list(self.interval)
        out["better"] = self.better
        return out


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (1979): controls the family-wise error rate for any
    dependence between the tests, uniformly more powerful than Bonferroni. NaN stays NaN and
    does not count as a test."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m = len(tested)
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(1.0, stepped)
    return out


def with_holm(comparisons: Sequence[PairedComparison]) -> list[PairedComparison]:
    """The comparisons with ``p_adjusted`` set by Holm's adjustment across all of them."""
    adjusted = holm([c.p_value for c in comparisons])
    return [replace(c, p_adjusted=None if np.isnan(q) else float(q)) for c, q in zip(comparisons, adjusted)]


def mcnemar_p(only_a, only_b, mid_p: bool = True):
    """Two-sided McNemar test on the discordant pairs (A right and B wrong: ``only_a``; the
    reverse: ``only_b``), exact binomial with p = 1/2, by default the mid-p version, whose
    size stays close to nominal where the exact test is conservative (Fagerland, Lydersen and
    Laake 2013). Arrays allowed; no discordant pair gives 1."""
    from scipy.stats import binom

    only_a, only_b = np.asarray(only_a), np.asarray(only_b)
    total = only_a + only_b
    low = np.minimum(only_a, only_b)
    tail = binom.cdf(low, total, 0.5)
    if mid_p:
        tail = tail - 0.5 * binom.pmf(low, total, 0.5)
    return np.where(total > 0, np.minimum(1.0, 2.0 * tail), 1.0)


def _wilson_bounds(successes, n, z):
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def newcombe_interval(both, only_a, only_b, neither, level: float = 0.95):
    """Newcombe's (1998, method 10) score interval for the difference of two paired
    proportions (A's minus B's): each proportion's Wilson interval, combined with the
    correlation of the 2x2 table. It stays within [-1, 1], does not collapse when the
    models never disagree, and covers near nominal at small n. Arrays allowed."""
    both, only_a, only_b, neither = (np.asarray(x, dtype=np.float64) for x in (both, only_a, only_b, neither))
    n = both + only_a + only_b + neither
    z = _z(level)
    p1, l1, u1 = _wilson_bounds(both + only_a, n, z)
    p2, l2, u2 = _wilson_bounds(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(margins > 0, (both * neither - only_a * only_b) / np.sqrt(margins), 0.0)
    d = p1 - p2
    below = np.sqrt(np.maximum(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = np.sqrt(np.maximum(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return np.maximum(-1.0, d - below), np.minimum(1.0, d + above)


def _cluster_totals(values: np.ndarray, clusters) -> np.ndarray:
    _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    return np.bincount(cluster_of, weights=values)


def _normal_p(estimate: float, variance: float) -> float:
    from scipy.stats import norm

    if not variance > 0:
        return 1.0 if estimate == 0 else float("nan")
    return float(2 * norm.sf(abs(estimate) / np.sqrt(variance)))


def accuracy_difference(correct_a, correct_b, level: float = 0.95, clusters=None) -> PairedComparison:
    """Accuracy of A minus accuracy of B on the same images (``correct_*``: one boolean per
    image). Images independent: McNemar's mid-p test and Newcombe's interval. With
    ``clusters`` (one subject id per image): the clustered McNemar statistic of Durkalski et
    al. (2003), sum over subjects of (A-only minus B-only) squared over the sum of squares,
    and a Wald interval whose variance comes from the same subject totals."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("accuracy_difference: correct_a and correct_b must be 1-d and of one length")
    n = len(a)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    diff = (only_a - only_b) / n if n else float("nan")
    common = dict(metric="accuracy", value_a=float(a.mean()) if n else float("nan"),
                  value_b=float(b.mean()) if n else float("nan"), difference=float(diff), n=n, level=level)
    if clusters is None:
        lo, hi = newcombe_interval(int(np.sum(a & b)), only_a, only_b, int(np.sum(~a & ~b)), level)
        return PairedComparison(interval=(float(lo), float(hi)), p_value=float(mcnemar_p(only_a, only_b)),
                                method=MCNEMAR_METHOD, **common)
    per_image = a.astype(np.float64) - b.astype(np.float64)
    totals = _cluster_totals(per_image, clusters)
    k = len(totals)
    from scipy.stats import chi2

    squares = float(np.sum(totals**2))
    p = float(chi2.sf(totals.sum() ** 2 / squares, 1)) if squares > 0 else 1.0
    counts = _cluster_totals(np.ones(n), clusters)
    variance = k / (k - 1) * float(np.sum((totals - counts * diff) ** 2)) / n**2 if k > 1 else float("nan")
    half = _z(level) * np.sqrt(variance)
    return PairedComparison(interval=(float(max(-1.0, diff - half)), float(min(1.0, diff + half))), p_value=p,
                            method=MCNEMAR_CLUSTER_METHOD, **common)


def _macro_influence(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray | None]:
    """The AUROC of :func:`mcaudit.metrics.auroc_ovr` with each image's influence; the positive
    mask when binary (its variance is per group), None for a macro mean."""
    if scores.ndim == 1 or scores.shape[1] == 2:
        positive = labels == 1
        auc, influence = auroc_influence(positive, scores if scores.ndim == 1 else scores[:, 1])
        return auc, influence, positive
    targets = [k for k in range(scores.shape[1]) if 0 < np.sum(labels == k) < len(labels)]
    parts = [auroc_influence(labels == k, scores[:, k]) for k in targets]
    if not parts:
        return float("nan"), np.full(len(labels), np.nan), None
    return float(np.mean([p[0] for p in parts])), np.mean([p[1] for p in parts], axis=0), None


def auroc_difference(labels, scores_a, scores_b, level: float = 0.95, clusters=None) -> PairedComparison:
    """AUROC of A minus AUROC of B on the same images, with DeLong, DeLong and
    Clarke-Pearson's (1988) test for correlated ROC curves: the variance of the difference
    is that of the difference of each image's influence (structural components). Scores: one
    column (binary, class 1 positive) or class probabilities (n, k), as
    :func:`mcaudit.metrics.auroc_ovr` takes them (macro one-vs-rest for k > 2). With
    ``clusters`` the influences are summed within each subject first (Obuchowski 1997)."""
    labels = np.asarray(labels)
    sa, sb = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    auc_a, inf_a, positive = _macro_influence(labels, sa)
    auc_b, inf_b, _ = _macro_influence(labels, sb)
    delta = inf_a - inf_b
    diff = auc_a - auc_b
    if clusters is not None:
        totals = _cluster_totals(delta, clusters)
        k = len(totals)
        variance = k / (k - 1) * float(np.sum(totals**2)) if k > 1 else float("nan")
        method = DELONG_CLUSTER_METHOD
    elif positive is not None:
        variance, method = _iid_variance(delta, positive), DELONG_METHOD
    else:
        variance, method = len(delta) / (len(delta) - 1) * float(np.sum(delta**2)), DELONG_METHOD
    half = _z(level) * np.sqrt(variance) if np.isfinite(variance) else float("nan")
    interval = (float(max(-1.0, diff - half)), float(min(1.0, diff + half)))
    return PairedComparison(metric="auroc", value_a=float(auc_a), value_b=float(auc_b), difference=float(diff),
                            interval=interval, p_value=_normal_p(diff, variance), method=method,
                            n=len(labels), level=level)


def paired_bootstrap(statistic: Callable[[np.ndarray], float], values_a, values_b, rng: np.random.Generator, *,
                     metric: str = "metric", n_boot: int = 2000, level: float = 0.95, clusters=None,
                     batched: bool = False, higher_is_better: bool = True) -> PairedComparison:
    """Paired percentile bootstrap of ``statistic(values_a) - statistic(values_b)``, for any
    metric computed from per-image values (correctness, per-image losses, confidences,
    rows of probabilities): every replicate draws the same images (or, with ``clusters``,
    the same subjects) for both models, which is what pairs them. With ``batched`` the
    statistic takes stacked values, shape (n_boot, n, ...), and returns one value per row.
    The p-value inverts the percentile interval: twice the smaller share of replicates on
    either side of zero (with at least one replicate counted, so never exactly 0)."""
    a, b = np.asarray(values_a), np.asarray(values_b)
    if len(a) != len(b):
        raise ValueError("paired_bootstrap: values_a and values_b must have one row per image, the same images")
    replicates: list[np.ndarray] = []

    def difference(idx: np.ndarray):
        value = np.asarray(statistic(a[idx]), dtype=np.float64) - np.asarray(statistic(b[idx]), dtype=np.float64)
        replicates.append(np.atleast_1d(value))
        return value

    interval = bootstrap_interval(difference, len(a), rng, n_boot=n_boot, level=level, batched=batched,
                                  clusters=clusters)
    drawn = np.concatenate(replicates) if replicates else np.zeros(0)
    drawn = drawn[np.isfinite(drawn)]
    value_a, value_b = (float(np.ravel(statistic(x[None] if batched else x))[0]) for x in (a, b))
    p = float("nan")
    if len(drawn) and np.isfinite(interval[0]):
        tail = min(np.sum(drawn <= 0), np.sum(drawn >= 0))
        p = float(min(1.0, 2.0 * max(tail, 1) / len(drawn)))
    return PairedComparison(metric=metric, value_a=value_a, value_b=value_b, difference=value_a - value_b,
                            interval=interval, p_value=p, n=len(a), level=level, higher_is_better=higher_is_better,
                            method=BOOTSTRAP_CLUSTER_METHOD if clusters is not None else BOOTSTRAP_METHOD)


def compare_predictions(labels, probs_a, probs_b, level: float = 0.95, clusters=None) -> list[PairedComparison]:
    """Accuracy and AUROC of two models' class probabilities (n, k) on the same images, with
    Holm's adjustment across the two."""
    labels = np.asarray(labels)
    pa, pb = np.asarray(probs_a), np.asarray(probs_b)
    found = [accuracy_difference(pa.argmax(1) == labels, pb.argmax(1) == labels, level, clusters),
             auroc_difference(labels, pa, pb, level, clusters)]
    return with_holm(found)
