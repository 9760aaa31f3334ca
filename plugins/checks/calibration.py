"""Calibration: do the model's probabilities mean what they say?

Everything comes from the shared forward pass (logits and labels); the image encoder is not
run again. Temperature scaling is fitted on one stratified part of the images and judged on
the other, so its benefit is not measured on the images it was fitted to.

Definitions (they matter when comparing with other tools):

* ECE and MCE use the top-label confidence (the probability of the predicted class) and
  whether that prediction is right, in equal-width bins over [0, 1] that are half-open
  [lo, hi) with the last one closed. This is torchmetrics' ``MulticlassCalibrationError``
  (also for two classes; its ``BinaryCalibrationError`` bins p(positive class) instead),
  except that torchmetrics puts a confidence of exactly 1.0 in a bin of its own. It is
  netcal's ``ECE``/``MCE`` exactly.
* Equal-mass ECE puts the inner bin edges at the confidence quantiles (netcal's
  ``equal_intervals=False``).
* Class-wise ECE is the mean over classes of the ECE of p(class) against "is this class"
  (Kull et al., 2019): torchmetrics' ``BinaryCalibrationError`` per class, averaged.
* Brier is halved for two classes (range 0 to 1) and summed over classes otherwise (0 to 2),
  as scikit-learn's ``brier_score_loss`` reports it.

Bias and intervals. The binned ("plug-in") ECE above, ``ece_plugin``, is what torchmetrics
and netcal report, but it estimates the population's binned ECE with an upward bias of about
sqrt(2 / pi) * (spread of a bin's mean) per bin: a perfectly calibrated model shows ECE ~0.11
on 50 images and ~0.035 on 500 in 15 bins. Its bootstrap percentile interval therefore misses
the population value most of the time at small n (simulated coverage 0 to 80%). ``ece`` and
``classwise_ece`` are debiased instead: each bin contributes sqrt(max(0, d^2 - v)), with d the
bin's mean of (outcome - confidence) and v the estimated variance of that mean, at least
c(1 - c) / count for the bin's mean confidence c (the squared gap is debiased, as in Kumar,
Liang and Ma 2019, then the root taken). Their 95% interval is the estimate plus or minus the larger
distance to the 2.5th or 97.5th percentile of the debiased estimate over a bootstrap of
images (of subjects when the data name them), floored at 0. In simulation (tests/
test_coverage_fairness_calibration.py) it covered the population ECE in at least 93% of
draws at 50 and at 500 images, for calibrated and miscalibrated populations alike; it is
conservative (near 99%) when the true ECE is moderate and the sample small.
"""

from __future__ import annotations

import math

import numpy as np

from mcaudit import Check, CheckResult, Param, Table, hookimpl
from mcaudit.metrics import (
    bootstrap_interval,
    brier_score,
    calibration_bins,
    equal_mass_edges,
    equal_width_edges,
    expected_calibration_error,
    max_calibration_error,
    negative_log_likelihood,
    top_label,
)

# Temperatures outside this range mean the logits carry (almost) no usable ranking signal.
T_MIN, T_MAX = 1e-2, 1e2
MIN_SPLIT = 10  # fewer images than this on either side of the split: no temperature scaling


class CalibrationCheck(Check):
    name = "calibration"
    description = (
        "Whether predicted probabilities match how often the model is right: expected and "
        "maximum calibration error, Brier score, log loss, reliability diagram, and how much "
        "temperature scaling (one number dividing the logits) would fix on held-out images."
    )
    params = {
        "n_bins": Param(15, "confidence bins for ECE, MCE and the reliability diagram", min=2),
        "calibration_fraction": Param(0.5, "share of the images (stratified by class) used to fit the temperature; the rest judge it",
                                      validate=lambda f: _strictly_between(f, 0.0, 1.0)),
        "split_seed": Param(0, "seed of the fit/held-out split (combined with the run seed)"),
        "n_bootstrap": Param(400, "bootstrap resamples (of images, or of subjects when the data name them) for the 95% intervals (0 turns them off)",
                             min=0),
    }
    # The percentile of a 95% interval needs a few hundred resamples to settle; ECE's
    # bootstrap costs little next to the forward pass, so standard affords 400.
    profiles = {"quick": {"n_bootstrap": 100}, "standard": {"n_bootstrap": 400}, "thorough": {"n_bootstrap": 2000}}
    metrics = {
        "ece": "expected calibration error, debiased: image-weighted mean |accuracy - confidence| over equal-width confidence bins, each bin's sampling noise removed (0 is perfect); estimates the population's binned ECE",
        "ece_plugin": "the plain binned ECE (torchmetrics' and netcal's number), biased upwards with few images per bin",
        "ece_equal_mass": "plain ECE with bins holding equal numbers of images (no interval: biased upwards, and its bins depend on the sample)",
        "mce": "maximum calibration error: the largest |accuracy - confidence| over non-empty bins (no interval: a maximum over noisy bins)",
        "classwise_ece": "debiased ECE of every class's probability against 'is this class', averaged over classes",
        "brier": "mean squared error of the probabilities (two classes: (p(positive) - y)^2, 0 to 1; more: summed over classes, 0 to 2)",
        "nll": "negative log-likelihood (log loss) of the true class, in nats",
        "confidence": "mean probability of the predicted class",
        "accuracy": "share of images whose predicted class is right",
        "overconfidence": "confidence minus accuracy (positive: overconfident; negative: underconfident)",
        "temperature": "temperature T fitted by NLL on the calibration split (T > 1 softens overconfident probabilities)",
        "ece_before_scaling": "debiased ECE on the held-out images with the raw logits",
        "ece_after_scaling": "debiased ECE on the held-out images with logits divided by T",
        "nll_before_scaling": "NLL on the held-out images with the raw logits",
        "nll_after_scaling": "NLL on the held-out images with logits divided by T",
        "n_heldout": "images that judge the temperature (not used to fit it)",
    }
    default_thresholds = {"ece": "<= 0.1"}
    threshold_reasons = {
        "ece": "probabilities off by 10 points on average cannot be read as risks; that is the scale of miscalibration "
               "Guo et al. (2017) found in uncalibrated modern networks and that temperature scaling brings down to a few "
               "points, so a model above it needs recalibration before its probabilities are shown to clinicians. Decided "
               "on the debiased ECE's 95% interval, so a small sample reads inconclusive rather than failing",
    }

    def run(self, ctx, params):
        n_bins, fraction = params["n_bins"], params["calibration_fraction"]
        if len(ctx.classes) < 2:
            return CheckResult.skipped("calibration needs at least two classes")
        logits = ctx.forward.logits.double().numpy()
        labels = ctx.forward.labels
        probs = softmax(logits)
        edges = equal_width_edges(n_bins)
        conf, correct = top_label(probs, labels)

        metrics = calibration_metrics(logits, probs, labels, n_bins)
        intervals = self._intervals(ctx, logits, probs, labels, n_bins, params["n_bootstrap"])
        warnings = []
        if len(labels) < 20 * n_bins:
            warnings.append(
                f"{len(labels)} images in {n_bins} bins: the plain ECE (ece_plugin) is biased upwards with few images "
                "per bin; ece is debiased and its interval is wide accordingly"
            )

        scaling = fit_and_judge_temperature(ctx, logits, labels, fraction, params["split_seed"], n_bins)
        calibrated_conf = None
        if scaling is None:
            warnings.append(
                f"temperature scaling skipped: a {fraction:g} split of {len(labels)} images leaves fewer than {MIN_SPLIT} on one side"
            )
        else:
            metrics.update(scaling["metrics"])
            calibrated_conf = softmax(logits / scaling["metrics"]["temperature"]).max(axis=1)
            if scaling["at_bound"]:
                warnings.append(f"fitted temperature hit its bound ({T_MIN:g} to {T_MAX:g}): the logits barely rank the classes")

        tables = [
            Table(
                "Calibration in brief",
                ["measure", "value", "95% interval", "what it means"],
                [[k, float(metrics[k]), _interval_text(intervals.get(k)), self.metrics[k]]
                 for k in ("ece", "ece_plugin", "ece_equal_mass", "mce", "classwise_ece", "brier", "nll", "confidence", "accuracy")],
                note=f"{len(labels)} images. " + INTERVAL_NOTE,
            ),
            reliability_table(conf, correct, edges),
            per_class_table(ctx.classes, probs, labels, n_bins),
        ]
        from mcaudit.reports.plots import to_figure

        figures = [
            to_figure(reliability_figure(conf, correct, edges, "All images"), "Reliability diagram",
                      "bars: accuracy per confidence bin (empty bins have no bar); dashed line: perfect calibration; numbers: images per bin"),
            to_figure(confidence_histogram(conf, correct, edges), "Confidence histogram",
                      "how often the model is how sure; stacked by right and wrong predictions; lines: mean confidence and accuracy"),
        ]
        if scaling is not None:
            tables.append(scaling["table"])
            figures.append(to_figure(scaling["figure"], "Temperature scaling on held-out images",
                                     f"left: raw probabilities; right: logits divided by T = {metrics['temperature']:.3g} (fitted on the other images)"))

        per_image = {"confidence": [float(c) for c in conf]}
        if calibrated_conf is not None:
            per_image["calibrated_confidence"] = [float(c) for c in calibrated_conf]
        return CheckResult(
            metrics=metrics, intervals=intervals, summary=summarise(metrics, intervals),
            tables=tables, figures=figures, warnings=warnings, per_image=per_image,
            sample_size=len(labels), n={"n_heldout": len(labels)} if scaling is None else {
                k: int(metrics["n_heldout"]) for k in ("ece_before_scaling", "ece_after_scaling", "nll_before_scaling", "nll_after_scaling")},
            details={
                "interval_method": INTERVAL_NOTE,
                "resampling_unit": "subject" if ctx.clusters() is not None else "image",
                "n_bins": n_bins,
                "bin_edges": edges.tolist(),
                "bins": {k: v.tolist() for k, v in zip(("count", "confidence", "accuracy"), calibration_bins(conf, correct, edges))},
                "temperature_split": None if scaling is None else scaling["split"],
            },
        )

    @staticmethod
    def _intervals(ctx, logits, probs, labels, n_bins, n_boot):
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


def _strictly_between(value: float, low: float, high: float) -> None:
    if not low < value < high:
        raise ValueError(f"{value!r} must be between {low:g} and {high:g} (exclusive)")


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
    estimate covers both cases (see the module docstring for the simulated coverage).
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


def fit_and_judge_temperature(ctx, logits, labels, fraction, split_seed, n_bins):
    n = len(labels)
    fit_rows = ctx.stratified_rows(int(round(fraction * n)), f"calibration:split:{split_seed}")
    held = np.setdiff1d(np.arange(n), fit_rows)
    if len(fit_rows) < MIN_SPLIT or len(held) < MIN_SPLIT:
        return None
    t = fit_temperature(logits[fit_rows], labels[fit_rows])
    at_bound = t < T_MIN * 1.01 or t > T_MAX / 1.01
    raw, scaled = logits[held], logits[held] / t
    y = labels[held]
    p_raw, p_scaled = softmax(raw), softmax(scaled)
    edges = equal_width_edges(n_bins)
    before = {"ece": _ece(p_raw, y, edges), "nll": negative_log_likelihood(raw, y), "brier": brier_score(p_raw, y),
              "confidence": float(p_raw.max(axis=1).mean())}
    after = {"ece": _ece(p_scaled, y, edges), "nll": negative_log_likelihood(scaled, y), "brier": brier_score(p_scaled, y),
             "confidence": float(p_scaled.max(axis=1).mean())}
    accuracy = float(np.mean(p_raw.argmax(axis=1) == y))
    metrics = {
        "temperature": t,
        "ece_before_scaling": before["ece"],
        "ece_after_scaling": after["ece"],
        "nll_before_scaling": before["nll"],
        "nll_after_scaling": after["nll"],
        "n_heldout": float(len(held)),
    }
    table = Table(
        f"Temperature scaling (T = {t:.3g}, fitted on {len(fit_rows)} images, judged on {len(held)} others)",
        ["probabilities", "ECE", "NLL", "Brier", "mean confidence", "accuracy"],
        [["raw (T = 1)", float(before["ece"]), float(before["nll"]), float(before["brier"]), float(before["confidence"]), accuracy],
         [f"scaled (T = {t:.3g})", float(after["ece"]), float(after["nll"]), float(after["brier"]), float(after["confidence"]), accuracy]],
        note="Dividing the logits by T never changes which class is predicted, so accuracy is the same; "
             "T > 1 means the raw probabilities were overconfident, T < 1 underconfident.",
    )
    from mcaudit.reports.plots import plt  # the headless matplotlib the report uses

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8), dpi=110, sharey=True)
    for ax, p, title in ((axes[0], p_raw, "raw"), (axes[1], p_scaled, f"T = {t:.3g}")):
        c, ok = top_label(p, y)
        draw_reliability(ax, c, ok, edges, f"{title}: plain ECE {expected_calibration_error(c, ok, edges):.3f}")
    return {"metrics": metrics, "table": table, "figure": fig, "at_bound": at_bound,
            "split": {"fit_rows": len(fit_rows), "heldout_rows": len(held)}}


def _ece(probs, labels, edges):
    return debiased_top_label_ece(probs, labels, edges)


def reliability_table(conf, correct, edges) -> Table:
    counts, mean_conf, acc = calibration_bins(conf, correct, edges)
    rows = []
    for lo, hi, n, c, a in zip(edges[:-1], edges[1:], counts, mean_conf, acc):
        label = f"{lo:.2f} to {hi:.2f}"
        rows.append([label, int(n), float(c), float(a), float(a - c)])
    return Table(
        "Reliability by confidence bin", ["confidence bin", "images", "mean confidence", "accuracy", "accuracy - confidence"], rows,
        note="Negative differences: the model is more sure than it is right (overconfident). Empty bins show n/a.",
    )


def per_class_table(classes, probs, labels, n_bins) -> Table:
    edges = equal_width_edges(n_bins)
    rows = []
    for k, name in enumerate(classes):
        is_k = labels == k
        rows.append([name, int(is_k.sum()), float(probs[:, k].mean()), float(is_k.mean()),
                     float(debiased_ece_rows(probs[:, k], is_k, edges)[0])])
    return Table(
        "Per class", ["class", "images", "mean predicted probability", "observed frequency", "class ECE"], rows,
        note="A well-calibrated model predicts each class, on average, as often as it occurs; class ECE bins p(class) "
             "and is debiased as ece is.",
    )


def draw_reliability(ax, conf, correct, edges, title):
    counts, mean_conf, acc = calibration_bins(conf, correct, edges)
    widths = np.diff(edges)
    full = counts > 0
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.bar(edges[:-1][full], acc[full], width=widths[full], align="edge", color="#4c72b0", edgecolor="white", label="accuracy")
    ax.bar(edges[:-1][full], (mean_conf - acc)[full], bottom=acc[full], width=widths[full], align="edge",
           color="none", edgecolor="#c44e52", hatch="//", lw=0.6, label="gap to confidence")
    for lo, w, n in zip(edges[:-1], widths, counts):
        ax.text(lo + w / 2, 1.02, f"{int(n)}", ha="center", va="bottom", fontsize=6, rotation=90,
                color="black" if n else "#aaaaaa")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=7, frameon=False, bbox_to_anchor=(0, 0.93))


def reliability_figure(conf, correct, edges, title):
    from mcaudit.reports.plots import new_figure

    fig, ax = new_figure(5.2, 4.0)
    ece = expected_calibration_error(conf, correct, edges)
    draw_reliability(ax, conf, correct, edges, f"{title}: plain ECE {ece:.3f}")
    return fig


def confidence_histogram(conf, correct, edges):
    from mcaudit.reports.plots import new_figure

    fig, ax = new_figure(5.2, 3.6)
    right = correct.astype(bool)
    ax.hist([conf[right], conf[~right]], bins=edges, stacked=True, color=["#55a868", "#c44e52"], label=["right", "wrong"])
    ax.axvline(conf.mean(), color="black", lw=1.2, label=f"mean confidence {conf.mean():.1%}")
    ax.axvline(correct.mean(), color="black", lw=1.2, ls=":", label=f"accuracy {correct.mean():.1%}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("images")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    return fig


def summarise(metrics, intervals) -> str:
    """Numbers only: whether ECE meets a threshold is the host's verdict, not the summary's."""
    ece, gap = metrics["ece"], metrics["overconfidence"]
    ci = intervals.get("ece")
    ci_text = f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else " (no interval)"
    lean = "higher than" if gap > 0 else "lower than" if gap < 0 else "equal to"
    text = (f"Debiased ECE {ece:.3f}{ci_text}, plain binned ECE {metrics['ece_plugin']:.3f}; mean confidence "
            f"{metrics['confidence']:.1%} is {lean} accuracy {metrics['accuracy']:.1%}.")
    if "temperature" in metrics:
        text += (f" Temperature scaling (T = {metrics['temperature']:.2f}, fitted on other images) changes held-out "
                 f"ECE from {metrics['ece_before_scaling']:.3f} to {metrics['ece_after_scaling']:.3f}.")
    return text


def _interval_text(iv) -> str:
    return f"{iv[0]:.3f} to {iv[1]:.3f}" if iv else "n/a"


@hookimpl
def mcaudit_register_checks(register):
    register(CalibrationCheck)
