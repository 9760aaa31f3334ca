"""Calibration: do the model's probabilities mean what they say?

The check is here; ``statistics`` holds the debiased ECE, its interval and the plain metrics,
``temperature`` the fitted temperature scaling, ``presentation`` the tables, figures and summary.

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

from mcaudit import Check, CheckResult, Param, hookimpl
from mcaudit.metrics import calibration_bins, equal_width_edges, top_label

from .presentation import (
    calibration_figures,
    calibration_tables,
    confidence_histogram,
    draw_reliability,
    per_class_table,
    reliability_figure,
    reliability_table,
    summarise,
)
from .statistics import (
    INTERVAL_NOTE,
    calibration_intervals,
    calibration_metrics,
    debiased_classwise_ece,
    debiased_ece_rows,
    debiased_top_label_ece,
    softmax,
    symmetric_interval,
)
from .temperature import MIN_SPLIT, T_MAX, T_MIN, TemperatureScaling, fit_and_judge_temperature, fit_temperature

__all__ = [
    "CalibrationCheck", "INTERVAL_NOTE", "MIN_SPLIT", "T_MAX", "T_MIN", "TemperatureScaling", "calibration_figures",
    "calibration_intervals", "calibration_metrics", "calibration_tables", "confidence_histogram",
    "debiased_classwise_ece", "debiased_ece_rows", "debiased_top_label_ece", "draw_reliability",
    "fit_and_judge_temperature", "fit_temperature", "per_class_table", "reliability_figure", "reliability_table",
    "softmax", "summarise", "symmetric_interval",
]


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
                                      above=0, below=1),
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
        intervals = calibration_intervals(ctx, logits, probs, labels, n_bins, params["n_bootstrap"])
        scaling = fit_and_judge_temperature(ctx, logits, labels, fraction, params["split_seed"], n_bins)
        per_image = {"confidence": [float(c) for c in conf]}
        if scaling is not None:
            metrics.update(scaling.metrics)
            per_image["calibrated_confidence"] = [float(c) for c in softmax(logits / scaling.temperature).max(axis=1)]
        return CheckResult(
            metrics=metrics, intervals=intervals, summary=summarise(metrics, intervals),
            tables=calibration_tables(metrics, intervals, self.metrics, ctx.classes, probs, labels, n_bins, scaling),
            figures=calibration_figures(probs, labels, n_bins, scaling),
            warnings=_warnings(len(labels), n_bins, fraction, scaling), per_image=per_image,
            sample_size=len(labels), n={"n_heldout": len(labels)} if scaling is None else {
                k: scaling.n_heldout for k in ("ece_before_scaling", "ece_after_scaling", "nll_before_scaling", "nll_after_scaling")},
            details={
                "interval_method": INTERVAL_NOTE,
                "resampling_unit": "subject" if ctx.clusters() is not None else "image",
                "n_bins": n_bins,
                "bin_edges": edges.tolist(),
                "bins": {k: v.tolist() for k, v in zip(("count", "confidence", "accuracy"), calibration_bins(conf, correct, edges))},
                "temperature_split": None if scaling is None else scaling.split,
            },
        )


def _warnings(n_images: int, n_bins: int, fraction: float, scaling: TemperatureScaling | None) -> list[str]:
    warnings = []
    if n_images < 20 * n_bins:
        warnings.append(
            f"{n_images} images in {n_bins} bins: the plain ECE (ece_plugin) is biased upwards with few images "
            "per bin; ece is debiased and its interval is wide accordingly"
        )
    if scaling is None:
        warnings.append(
            f"temperature scaling skipped: a {fraction:g} split of {n_images} images leaves fewer than {MIN_SPLIT} on one side"
        )
    elif scaling.at_bound:
        warnings.append(f"fitted temperature hit its bound ({T_MIN:g} to {T_MAX:g}): the logits barely rank the classes")
    return warnings


@hookimpl
def mcaudit_register_checks(register):
    register(CalibrationCheck)
