"""Do the 95% intervals of the calibration and fairness checks cover the truth 95% of the time?

Each test draws many samples from a population whose true value is known, builds the
check's interval on every sample with the check's own estimator and interval rule (the
bootstrap over images drawn here in one vectorised step instead of one call per sample),
and counts how often the interval holds the truth. At least 93% is required (2,000 draws at
n = 50, 1,000 at n = 500: a Monte Carlo standard error of about 0.5 and 0.7 points).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from mcaudit.plugins.checks.calibration import debiased_ece_rows, symmetric_interval
from mcaudit.plugins.checks.fairness.inference import max_difference_interval, pairwise

N_BOOT = 200
EDGES = np.linspace(0.0, 1.0, 16)  # the calibration check's default 15 bins
DRAWS = {50: 2000, 500: 1000}


def bootstrap_rows(n_draws: int, n: int, n_boot: int, rng) -> np.ndarray:
    """Resample indices (n_draws, n_boot, n) over the images of each draw, not stratified."""
    return rng.integers(0, n, (n_draws, n_boot, n), dtype=np.int32)


def gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x (D, n) read at idx (D, B, n), as (D * B, n)."""
    d, b, n = idx.shape
    flat = idx + (np.arange(d, dtype=np.int64) * n)[:, None, None]
    return x.ravel()[flat].reshape(d * b, n)


# --- ECE ---------------------------------------------------------------------------------
# A binary classifier whose top-label confidence is 0.5 + 0.5 * Beta(2, 1.2) and whose
# chance of being right at confidence c is 0.5 + slope * (c - 0.5): slope 1 is calibrated,
# slope 0.6 overconfident. The population's binned ECE is the integral over each bin.


def population_ece(slope: float) -> float:
    density = lambda c: stats.beta.pdf((c - 0.5) * 2, 2, 1.2) * 2  # noqa: E731
    total = 0.0
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        lo = max(lo, 0.5)
        if hi > lo:
            gap, _ = integrate.quad(lambda c: (0.5 + slope * (c - 0.5) - c) * density(c), lo, hi)
            total += abs(gap)
    return total


def ece_coverage(n: int, slope: float, seed: int) -> tuple[float, float, float]:
    truth = population_ece(slope)
    rng = np.random.default_rng(seed)
    draws = DRAWS[n]
    conf = 0.5 + 0.5 * rng.beta(2, 1.2, (draws, n))
    correct = (rng.random((draws, n)) < 0.5 + slope * (conf - 0.5)).astype(np.float64)
    estimate = debiased_ece_rows(conf, correct, EDGES)
    low, high = np.empty(draws), np.empty(draws)
    step = max(1, 4_000_000 // (N_BOOT * n))
    for start in range(0, draws, step):
        stop = min(draws, start + step)
        idx = bootstrap_rows(stop - start, n, N_BOOT, rng)
        reps = debiased_ece_rows(gather(conf[start:stop], idx), gather(correct[start:stop], idx), EDGES)
        q = np.quantile(reps.reshape(stop - start, N_BOOT), [0.025, 0.975], axis=1)
        for i in range(stop - start):
            low[start + i], high[start + i] = symmetric_interval(estimate[start + i], q[0, i], q[1, i])
    covered = (low <= truth + 1e-12) & (truth <= high + 1e-12)
    return float(covered.mean()), truth, float(np.mean(high - low))


@pytest.mark.parametrize("n", [50, pytest.param(500, marks=pytest.mark.slow)])
@pytest.mark.parametrize("slope", [1.0, 0.6])
def test_ece_interval_covers_the_population_ece(n, slope):
    coverage, truth, width = ece_coverage(n, slope, seed=int(n + 100 * slope))
    print(f"ECE: n={n}, population ECE {truth:.3f}: coverage {coverage:.3f}, mean width {width:.3f}")
    assert coverage >= 0.93, (n, slope, truth, coverage)
    if n == 500:
        assert width < 0.12  # honest, but still able to decide ECE <= 0.1 for a clear case


def test_plain_ece_percentile_interval_does_not_cover_which_is_why_ece_is_debiased():
    """The reason for the debiased estimator: the plain binned ECE's percentile interval of
    a calibrated model at n = 50 almost never contains the population value 0."""
    from mcaudit.metrics import expected_calibration_error

    rng = np.random.default_rng(3)
    conf = 0.5 + 0.5 * rng.beta(2, 1.2, (200, 50))
    correct = (rng.random((200, 50)) < conf).astype(float)
    misses = 0
    for c, ok in zip(conf, correct):
        idx = rng.integers(0, 50, (N_BOOT, 50))
        reps = [expected_calibration_error(c[i], ok[i], EDGES) for i in idx]
        misses += np.quantile(reps, 0.025) > 0
    assert misses / 200 > 0.9


# --- accuracy gap ------------------------------------------------------------------------
# Groups with known accuracies; the true gap is the largest minus the smallest. Draws where a
# group has fewer than the check's min_group_size (20) images are left out, because the check
# does not compare such a group (it shows it as too small to decide).


def group_accuracy(group: np.ndarray, correct: np.ndarray, n_groups: int) -> np.ndarray:
    """Accuracy per group of each row: (M, n) -> (M, G), NaN for a group absent from a row."""
    m, n = group.shape
    key = (np.arange(m)[:, None] * n_groups + group).ravel()
    count = np.bincount(key, minlength=m * n_groups).reshape(m, n_groups)
    hits = np.bincount(key, weights=correct.ravel(), minlength=m * n_groups).reshape(m, n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / count


def gap_coverage(n: int, share, accuracy, seed: int) -> tuple[float, float, float, int]:
    share, accuracy = np.asarray(share), np.asarray(accuracy)
    n_groups = len(share)
    truth = float(accuracy.max() - accuracy.min())
    rng = np.random.default_rng(seed)
    draws = DRAWS[n]
    group = rng.choice(n_groups, (draws, n), p=share)
    correct = (rng.random((draws, n)) < accuracy[group]).astype(np.float64)
    sizes = np.stack([np.bincount(g, minlength=n_groups) for g in group])
    kept = (sizes >= 20).all(axis=1)
    observed = group_accuracy(group, correct, n_groups)
    everyone = np.arange(n_groups)
    covered, widths = [], []
    step = max(1, 4_000_000 // (N_BOOT * n))
    for start in range(0, draws, step):
        stop = min(draws, start + step)
        idx = bootstrap_rows(stop - start, n, N_BOOT, rng)
        reps = group_accuracy(gather(group[start:stop], idx), gather(correct[start:stop], idx), n_groups)
        reps = reps.reshape(stop - start, N_BOOT, n_groups)
        for i in range(stop - start):
            if not kept[start + i]:
                continue
            lo, hi = max_difference_interval(pairwise(observed[start + i], everyone), pairwise(reps[i], everyone))
            covered.append(lo <= truth + 1e-12 <= hi + 2e-12)
            widths.append(hi - lo)
    return float(np.mean(covered)), truth, float(np.mean(widths)), int(kept.sum())


@pytest.mark.parametrize("n", [50, pytest.param(500, marks=pytest.mark.slow)])
@pytest.mark.parametrize("share,accuracy", [([0.5, 0.5], [0.85, 0.70]), ([0.5, 0.5], [0.80, 0.80])])
def test_accuracy_gap_interval_covers_the_true_gap(n, share, accuracy):
    coverage, truth, width, kept = gap_coverage(n, share, accuracy, seed=n + int(100 * accuracy[1]))
    print(f"accuracy gap: n={n}, groups {share} at {accuracy}, true gap {truth:.3f}: coverage {coverage:.3f} "
          f"over {kept} draws, mean width {width:.3f}")
    assert kept >= 0.8 * DRAWS[n]
    assert coverage >= 0.93, (n, share, accuracy, coverage)


@pytest.mark.slow
def test_accuracy_gap_interval_covers_with_three_groups():
    coverage, truth, width, kept = gap_coverage(500, [0.4, 0.3, 0.3], [0.85, 0.80, 0.70], seed=7)
    print(f"accuracy gap: n=500, three groups, true gap {truth:.3f}: coverage {coverage:.3f}, mean width {width:.3f}")
    assert coverage >= 0.93
