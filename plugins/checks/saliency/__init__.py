"""Saliency: do the model's explanations say something true about it, and where does it look?

For a stratified subsample of images the check computes captum attribution maps for the
predicted class (or a prompt the user names), then asks three questions of each method:

* faithfulness: do the pixels it ranks highest drive the score? (deletion and insertion
  curves, compared with a random pixel order);
* sanity: do its maps depend on what the model learned? (model parameter randomisation,
  Adebayo et al. 2018);
* localisation: where the data has region masks or boxes, does the evidence fall inside them?

A method is recommended only if it passes the sanity test, and among those that do, the most
faithful is named; when none passes, that is a finding in itself (see ``run``). Sizing: the
``quick`` profile (8 images, Saliency and Grad-CAM, 5 curve steps, one cascade point) is a
smoke test; ``standard`` explains 100 images with five methods, 20 curve steps and three
cascade points, which wants a GPU; ``thorough`` 300 images, every method and every layer.
The curve and attribution batch sizes bound memory. Under torchrun each process explains its
share of the images and the per-image results are gathered, so the metrics equal a single
process's (GradientSHAP's random draws and the random pixel orders are tied to the image, not
to the process that handles it).

This module holds the check itself. Its pieces: ``inputs`` (parameters, rows, targets, pixels,
masks), ``attributions`` (the captum methods), ``tower`` (finding and randomising the image
tower), ``metrics`` (faithfulness, sanity and localisation measures), ``explanation`` (measuring
this process's maps and gathering every process's), ``verdicts`` (means, intervals, sanity
verdicts, the recommendation), ``report`` (tables, summary, figures) and ``figures`` (the plots).
"""

from __future__ import annotations

import numpy as np

from mcaudit import Check, CheckResult, Param, hookimpl

from . import report
from .attributions import METHOD_LABELS, attribution_maps
from .explanation import LOCALISATION, Evidence, explain, gather_evidence
from .inputs import (applicable_methods, attribution_settings, choose_rows, classifier_and_targets, load_pixels,
                     positive, unreadable_masks, valid_methods)
from .metrics import BASELINES
from .tower import ImageTower, find_image_tower
from .verdicts import Judgement, judge
from .verdicts import recommend as _recommend  # noqa: F401  (tests import these names from here)
from .verdicts import sanity_verdicts as _sanity_verdicts  # noqa: F401


class SaliencyCheck(Check):
    name = "saliency"
    description = (
        "Attribution maps (captum: Integrated Gradients, Saliency, Input x Gradient, GradientSHAP, "
        "Occlusion, Grad-CAM) tested for faithfulness (deletion and insertion curves against a "
        "random order), for sanity (model parameter randomisation) and, where the data has "
        "masks or boxes, for localisation (pointing game, attribution mass and top-pixel IoU in the mask)."
    )
    params = {
        "methods": Param(
            ["integrated_gradients", "saliency", "input_x_gradient", "gradient_shap", "grad_cam"],
            "attribution methods, any of: " + ", ".join(METHOD_LABELS), validate=lambda names: valid_methods(names),
        ),
        # at least 2: intervals over images need two of them
        "n_images": Param(100, "images to explain, a stratified subsample (classes in proportion)", min=2),
        "n_mask_images": Param(100, "images with a region mask added for localisation, when the data has masks (0: none)",
                               min=0),
        "target_prompt": Param("", "explain the similarity to this prompt instead of the predicted class"),
        "steps": Param(20, "steps of the deletion and insertion curves", min=1),
        "baseline": Param("blur", "what removed pixels become in the curves", choices=BASELINES),
        "curve_score": Param(
            "logit", "score read along the curves: the target's similarity logit (what the maps explain) or "
            "its softmax probability over the classes (saturates for confident models)",
            choices=("logit", "probability"),
        ),
        "ig_steps": Param(32, "Integrated Gradients path steps", min=1),
        "shap_samples": Param(16, "GradientSHAP samples per image", min=1),
        "occlusion_window": Param(0, "Occlusion patch side in pixels (0: one eighth of the image side); stride is half of it",
                                  min=0),
        "internal_batch_size": Param(64, "model evaluations per pass inside Integrated Gradients, GradientSHAP and Occlusion",
                                     min=1),
        "curve_batch_size": Param(256, "perturbed images per forward pass when scoring the curves", min=1),
        "cascade_points": Param(
            3, "points of the top-down randomisation cascade at which maps are recomputed, evenly "
            "spread and always ending with the whole tower randomised (0: skip the test)", min=0,
        ),
        "sanity_max_spearman": Param(0.5, "a method passes the sanity test when the 95% interval of its maps' mean rank "
                                          "correlation with the whole tower randomised lies at or below this, and "
                                          "fails it when the interval lies above", min=-1, max=1),
        "top_percent": Param(20.0, "share of the most relevant pixels compared with the mask for the IoU, in %",
                             max=100, validate=lambda v: positive(v)),
        "overlays_per_class": Param(2, "images of each class shown in the overlay grid", min=0),
        "gallery": Param(3, "images shown in the drill-down with their heat map: this many of the most faithful "
                            "maps and as many of the least faithful", min=0, max=20),
        "n_bootstrap": Param(1000, "bootstrap resamples over images (patients where the data name them) for the 95% "
                                   "intervals (0 turns them off)", min=0),
    }
    metrics = {
        "<method>.deletion_auc": "area under the deletion curve (lower: the top pixels matter more)",
        "<method>.insertion_auc": "area under the insertion curve (higher: the top pixels suffice)",
        "<method>.deletion_gain": "random order's deletion area minus the method's (> 0: better than random)",
        "<method>.insertion_gain": "method's insertion area minus the random order's (> 0: better than random)",
        "random.deletion_auc": "deletion area of a random pixel order",
        "random.insertion_auc": "insertion area of a random pixel order",
        "<method>.randomisation_spearman": "mean rank correlation of |map| before and after randomising the whole image tower (low is good)",
        "<method>.randomisation_ssim": "mean SSIM of the normalised |map| before and after randomising the whole image tower (low is good)",
        "<method>.sanity_passed": "1 when the maps clearly change under randomisation (the 95% interval of the rank "
                                  "correlation at most sanity_max_spearman), 0 when clearly not, undefined in between",
        "recommended_deletion_gain": "deletion gain over random of the recommended method: the most faithful "
                                     "(deletion plus insertion gain) of those that pass the sanity test",
        "recommended_insertion_gain": "insertion gain over random of the recommended method",
        "recommended_mass_in_mask": "attribution mass inside the masks of the recommended method",
        "mask_share": "mean share of the image inside the mask (the mass a uniform map puts there)",
        "<method>.pointing_game": "share of masked images whose most relevant pixel lies in the mask",
        "<method>.mass_in_mask": "mean share of the positive attribution inside the mask",
        "<method>.top_iou": "mean IoU of the top top_percent % pixels with the mask",
        "n_images": "images explained",
        "n_mask_images": "explained images that have a mask",
    }
    default_thresholds = {
        "recommended_deletion_gain": "> 0",
        "recommended_insertion_gain": "> 0",
        "recommended_mass_in_mask": {"rule": "> mask_share", "severity": "warn"},
    }
    threshold_reasons = {
        "recommended_deletion_gain": (
            "a map whose most relevant pixels, removed first, lower the score no faster than a random pixel order "
            "explains nothing about the prediction (deletion metric, Petsiuk et al. 2018; Samek et al. 2017); "
            "decided on the 95% interval over images"),
        "recommended_insertion_gain": (
            "likewise, revealing the map's top pixels first must restore the score faster than a random order"),
        "recommended_mass_in_mask": (
            "warn only: a map that puts no more of its positive mass inside the annotated region than a uniform map "
            "would (the region's share of the image) does not point at the finding; a model may rightly use context "
            "outside the annotation, so this is worth a look rather than a failure"),
    }
    profiles = {
        "quick": {"methods": ["saliency", "grad_cam"], "n_images": 8, "n_mask_images": 8, "steps": 5, "ig_steps": 8,
                  "shap_samples": 4, "cascade_points": 1, "n_bootstrap": 200, "overlays_per_class": 1,
                  "gallery": 2},
        "standard": {"methods": ["integrated_gradients", "saliency", "input_x_gradient", "gradient_shap", "grad_cam"],
                     "n_images": 100, "n_mask_images": 100, "steps": 20, "ig_steps": 32, "shap_samples": 16,
                     "cascade_points": 3, "n_bootstrap": 1000},
        "thorough": {"methods": list(METHOD_LABELS), "n_images": 300, "n_mask_images": 300, "steps": 50,
                     "ig_steps": 64, "shap_samples": 32, "cascade_points": 1000, "n_bootstrap": 2000},
    }

    def run(self, ctx, params):
        with ctx.frozen_model():  # attributions need gradients for the pixels only
            return self._run(ctx, params, list(params["methods"]))

    def _run(self, ctx, params, methods):
        rows = choose_rows(ctx, params)
        # Under torchrun each process explains its share of the images; the per-image results
        # are gathered below, so every process computes the metrics from all of them.
        local = ctx.shard_rows(rows)
        classifier, targets, target_name = classifier_and_targets(ctx, local, params["target_prompt"])
        tower = find_image_tower(classifier)
        methods, warnings = applicable_methods(methods, tower)
        if not methods:
            return CheckResult.skipped("no attribution method applies to this model: " + "; ".join(warnings))

        pixels = load_pixels(ctx, local)
        settings = attribution_settings(ctx, params, pixels)
        maps = {m: attribution_maps(m, classifier, tower, pixels, targets, settings, ctx.autocast, rows=local) for m in methods}
        per_row, cascade, masks = explain(ctx, params, methods, classifier, pixels, targets, maps, settings, rows, local)
        evidence = gather_evidence(ctx, local, per_row, methods, cascade)
        warnings += unreadable_masks(ctx, rows, evidence.merged)
        judged = judge(ctx, params, methods, rows, evidence)
        figures = report.figures(ctx, rows, local, pixels, maps, masks, evidence, params, target_name)
        result = _result(ctx, params, methods, rows, tower, target_name, evidence, judged, figures, warnings)
        result.galleries = report.galleries(ctx, rows, local, pixels, maps, judged, params["gallery"])
        return result


def _result(ctx, params, methods, rows, tower: ImageTower, target_name: str, ev: Evidence, judged: Judgement,
            figures: list, warnings: list[str]) -> CheckResult:
    metrics, intervals, verdicts, cascade = judged.metrics, judged.intervals, judged.verdicts, ev.cascade
    has_masks = bool(ev.has_mask.any())
    n_masked = int(ev.has_mask.sum())
    return CheckResult(
        metrics=metrics, intervals=intervals,
        summary=report.summary(methods, metrics, verdicts, judged.recommended, has_masks, target_name),
        tables=report.tables(methods, metrics, intervals, cascade, has_masks, params, verdicts),
        figures=figures, warnings=warnings + judged.warnings, findings=judged.findings,
        not_evaluated=judged.not_evaluated, sample_size=len(rows),
        n={k: n_masked for k in metrics if k.endswith(LOCALISATION + ("mask_share",))},
        details={
            "target": target_name, "methods": methods, "image_tower": tower.kind,
            "notes": [tower.note] if tower.note else [], "recommended": judged.recommended, "sanity": verdicts,
            "rows": [int(r) for r in rows], "sources": [ctx.source(int(r)) for r in rows],
            "cascade_levels": cascade["levels"] if cascade else [],
            "cascade_spearman": {m: [float(np.nanmean(v)) for v in vs] for m, vs in cascade["spearman"].items()} if cascade else {},
            "mean_deletion_curve": {k: v.mean(axis=0).tolist() for k, v in ev.deletion.items()},
            "mean_insertion_curve": {k: v.mean(axis=0).tolist() for k, v in ev.insertion.items()},
            "paired_columns": _paired_columns(judged),
        },
        per_image={f"{m}.{key}": ctx.per_image(rows, judged.values[f"{m}.{key}"])
                   for key in ("deletion_auc", "insertion_auc", "deletion_gain", "insertion_gain", "mass_in_mask") for m in methods
                   if f"{m}.{key}" in judged.values},
    )


def _paired_columns(judged: Judgement) -> dict[str, str]:
    """The recommended method's metrics with the per-image column each is the mean of (over
    the images where it is defined), for image-by-image comparisons of runs (mcaudit.comparison)."""
    if not judged.recommended:
        return {}
    keys = ("deletion_gain", "insertion_gain", "mass_in_mask")
    return {f"recommended_{k}": f"{judged.recommended}.{k}" for k in keys
            if f"recommended_{k}" in judged.metrics and f"{judged.recommended}.{k}" in judged.values}


@hookimpl
def mcaudit_register_checks(register):
    register(SaliencyCheck)
