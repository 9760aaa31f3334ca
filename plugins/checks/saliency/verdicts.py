"""From per-image numbers to the check's verdicts: each metric as a mean with a bootstrap
interval over images, the sanity verdict per method, the warnings, and the recommended method
(the most faithful of those that pass the sanity test)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcaudit import Finding
from mcaudit.metrics import bootstrap_interval

from .attributions import METHOD_LABELS
from .explanation import LOCALISATION, Evidence
from .metrics import curve_area


@dataclass
class Judgement:
    """The metrics, their intervals and what the check concludes from them."""

    values: dict[str, np.ndarray]  # the per-image numbers each metric is the mean of
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    verdicts: dict[str, str]
    recommended: str | None
    findings: list[Finding]
    not_evaluated: dict[str, str]
    warnings: list[str]


def judge(ctx, params, methods, rows, ev: Evidence) -> Judgement:
    values = per_image_values(methods, ev.deletion, ev.insertion, ev.cascade, ev.merged, ev.has_mask)
    means, intervals = means_and_intervals(ctx, rows, values, params["n_bootstrap"])
    metrics = {"n_images": float(len(rows)), "n_mask_images": float(ev.has_mask.sum())} | means
    verdicts, warnings = {}, []
    if ev.cascade is not None:
        verdicts = sanity_verdicts(methods, metrics, intervals, params["sanity_max_spearman"])
        warnings += sanity_warnings(verdicts, metrics)
    for m in methods:
        if metrics[f"{m}.deletion_gain"] <= 0 and metrics[f"{m}.insertion_gain"] <= 0:
            warnings.append(f"{METHOD_LABELS[m]} is no better than a random pixel order on deletion or insertion")
    recommended, findings, not_evaluated = recommend(methods, metrics, intervals, verdicts, ev.cascade is not None,
                                                     bool(ev.has_mask.any()))
    copy_recommended(recommended, metrics, intervals)
    return Judgement(values, metrics, intervals, verdicts, recommended, findings, not_evaluated, warnings)


def per_image_values(methods, deletion, insertion, cascade, merged, has_mask) -> dict[str, np.ndarray]:
    """Every per-image number a metric is the mean of, in the order their intervals are drawn."""
    values: dict[str, np.ndarray] = {}
    for name in ["random", *methods]:
        values[f"{name}.deletion_auc"] = curve_area(deletion[name])
        values[f"{name}.insertion_auc"] = curve_area(insertion[name])
    for m in methods:
        values[f"{m}.deletion_gain"] = values["random.deletion_auc"] - values[f"{m}.deletion_auc"]
        values[f"{m}.insertion_gain"] = values[f"{m}.insertion_auc"] - values["random.insertion_auc"]
    if cascade is not None:
        for m in methods:
            values[f"{m}.randomisation_spearman"] = cascade["spearman"][m][-1]
            values[f"{m}.randomisation_ssim"] = cascade["ssim"][m][-1]
    if has_mask.any():
        for m in methods:
            for key in LOCALISATION:
                values[f"{m}.{key}"] = merged[f"{m}.{key}"]
        values["mask_share"] = merged["mask_share"]
    return values


def means_and_intervals(ctx, rows, values, n_boot):
    """Each metric as the mean of its finite per-image values, with a bootstrap interval over
    images (patients where the data name them) where one can be drawn: the sanity verdict and
    the tables read these intervals, so an undefined one must be absent, not NaN."""
    metrics: dict[str, float] = {}
    intervals = {}
    rng = ctx.rng("saliency:bootstrap")
    clusters = ctx.clusters(rows)
    for key, v in values.items():
        metrics[key] = _nanmean(v)
        finite = np.isfinite(v)
        ok = v[finite]
        lo, hi = bootstrap_interval(lambda i, v=ok: float(v[i].mean()), len(ok), rng, n_boot,
                                    clusters=None if clusters is None else clusters[finite])
        if np.isfinite(lo):
            intervals[key] = (lo, hi)
    return metrics, intervals


def sanity_warnings(verdicts, metrics) -> list[str]:
    """Records each method's sanity verdict in ``metrics``; warns about those that fail or cannot be judged."""
    warnings = []
    for m, verdict in verdicts.items():
        metrics[f"{m}.sanity_passed"] = {"pass": 1.0, "fail": 0.0}.get(verdict, float("nan"))
        if verdict == "no verdict":
            warnings.append(f"{METHOD_LABELS[m]}: maps are constant, so the randomisation test has no verdict")
        elif verdict == "fail":
            warnings.append(
                f"{METHOD_LABELS[m]} fails the randomisation sanity test: its maps keep a rank "
                f"correlation of {metrics[f'{m}.randomisation_spearman']:.2f} with the original after the "
                f"whole image tower is randomised, so they show the image more than what the model learned"
            )
    return warnings


def copy_recommended(recommended, metrics, intervals) -> None:
    if not recommended:
        return
    for key in ("deletion_gain", "insertion_gain", "mass_in_mask"):
        if f"{recommended}.{key}" in metrics:
            metrics[f"recommended_{key}"] = metrics[f"{recommended}.{key}"]
            if f"{recommended}.{key}" in intervals:
                intervals[f"recommended_{key}"] = intervals[f"{recommended}.{key}"]


def sanity_verdicts(methods, metrics, intervals, bound: float) -> dict[str, str]:
    """Per method: pass, fail or undecided on the 95% interval of the mean rank correlation
    (the point value where there is no interval), or "no verdict" for constant maps."""
    out = {}
    for m in methods:
        rho = metrics.get(f"{m}.randomisation_spearman", float("nan"))
        if not np.isfinite(rho):
            out[m] = "no verdict"
            continue
        lo, hi = intervals.get(f"{m}.randomisation_spearman", (rho, rho))
        out[m] = "pass" if hi <= bound else "fail" if lo > bound else "undecided"
    return out


def recommend(methods, metrics, intervals, verdicts, sanity_run: bool, has_masks: bool):
    """The recommended method (the most faithful of those that pass the sanity test, or None),
    the findings when none can be recommended, and the recommended_* metrics left unevaluated."""
    findings: list[Finding] = []
    reason = ""
    passing = [m for m in methods if verdicts.get(m) == "pass"]
    if not sanity_run:
        reason = "the randomisation sanity test was turned off (cascade_points 0), so no method can be recommended"
    elif not passing:
        undecided = [METHOD_LABELS[m] for m in methods if verdicts.get(m) == "undecided"]
        failed = [METHOD_LABELS[m] for m in methods if verdicts.get(m) in ("fail", "no verdict")]
        if undecided:
            reason = (f"no method clearly passes the randomisation sanity test ({', '.join(undecided)}: 95% interval "
                      "straddles the bound), so none can be recommended; explain more images")
            findings.append(Finding("inconclusive", reason))
        else:
            reason = (f"no attribution method passes the randomisation sanity test ({', '.join(failed)}): their maps "
                      "barely change when the image tower's weights are randomised, so none of them shows what the "
                      "model learned and none can be recommended")
            findings.append(Finding("fail", reason))
    not_evaluated = {}
    if reason:
        for key in ("deletion_gain", "insertion_gain", "mass_in_mask"):
            not_evaluated[f"recommended_{key}"] = reason
        return None, findings, not_evaluated
    recommended = max(passing, key=lambda m: metrics[f"{m}.deletion_gain"] + metrics[f"{m}.insertion_gain"])
    if not has_masks:
        not_evaluated["recommended_mass_in_mask"] = "the explained images have no region masks or boxes"
    return recommended, findings, not_evaluated


def _nanmean(values: np.ndarray) -> float:
    ok = values[np.isfinite(values)]
    return float(ok.mean()) if len(ok) else float("nan")
