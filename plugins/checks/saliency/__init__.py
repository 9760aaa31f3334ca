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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mcaudit import Check, CheckResult, Finding, InputError, Param, Table, hookimpl
from mcaudit.metrics import bootstrap_interval

from .attributions import METHOD_LABELS, AttributionSettings, attribution_maps
from .metrics import (
    BASELINES,
    baseline_images,
    curve_area,
    mass_inside,
    normalised_abs,
    perturbation_curves,
    pixel_ranks,
    pointing_hits,
    random_ranks,
    rank_correlation,
    structural_similarity,
    top_fraction_iou,
)
from .tower import detached_copy, find_image_tower, randomise_parameters

MAX_OVERLAY_ROWS = 12
LOCALISATION = ("pointing_game", "mass_in_mask", "top_iou")


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
            "attribution methods, any of: " + ", ".join(METHOD_LABELS), validate=lambda names: _methods(names),
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
                             max=100, validate=lambda v: _positive(v)),
        "overlays_per_class": Param(2, "images of each class shown in the overlay grid", min=0),
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
                  "shap_samples": 4, "cascade_points": 1, "n_bootstrap": 200, "overlays_per_class": 1},
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
        rows = _choose_rows(ctx, params)
        # Under torchrun each process explains its share of the images; the per-image results
        # are gathered below, so every process computes the metrics from all of them.
        local = ctx.shard_rows(rows)
        classifier, targets, target_name = _classifier_and_targets(ctx, local, params["target_prompt"])
        tower = find_image_tower(classifier)
        warnings, notes = [], [tower.note] if tower.note else []
        if "grad_cam" in methods and not tower.has_grad_cam:
            methods = [m for m in methods if m != "grad_cam"]
            warnings.append(f"Grad-CAM skipped: {tower.note or 'no image block found'}")
        if not methods:
            return CheckResult.skipped("no attribution method applies to this model: " + "; ".join(warnings))

        pixels = _load_pixels(ctx, local)
        settings = _settings(ctx, params, pixels)
        maps = {m: attribution_maps(m, classifier, tower, pixels, targets, settings, ctx.autocast, rows=local) for m in methods}
        per_row, cascade, masks = _explain(ctx, params, methods, classifier, pixels, targets, maps, settings, rows, local)
        _, merged = ctx.gather_rows(local, per_row)
        deletion = {n: merged[f"deletion:{n}"] for n in ["random", *methods]}
        insertion = {n: merged[f"insertion:{n}"] for n in ["random", *methods]}
        has_mask = merged["has_mask"].astype(bool)
        warnings += _unreadable_masks(ctx, rows, merged)
        if cascade is not None:
            cascade["spearman"] = {m: [np.ascontiguousarray(c) for c in merged[f"spearman:{m}"].T] for m in cascade["spearman"]}
            cascade["ssim"] = {m: [np.ascontiguousarray(c) for c in merged[f"ssim:{m}"].T] for m in cascade["ssim"]}
        values = _per_image_values(methods, deletion, insertion, cascade, merged, has_mask)
        means, intervals = _means_and_intervals(ctx, rows, values, params["n_bootstrap"])
        metrics = {"n_images": float(len(rows)), "n_mask_images": float(has_mask.sum())} | means

        verdicts = {}
        if cascade is not None:
            verdicts = _sanity_verdicts(methods, metrics, intervals, params["sanity_max_spearman"])
            warnings += _sanity_warnings(verdicts, metrics)
        for m in methods:
            if metrics[f"{m}.deletion_gain"] <= 0 and metrics[f"{m}.insertion_gain"] <= 0:
                warnings.append(f"{METHOD_LABELS[m]} is no better than a random pixel order on deletion or insertion")
        has_masks = bool(has_mask.any())
        recommended, findings, not_evaluated = _recommend(methods, metrics, intervals, verdicts, cascade is not None,
                                                          has_masks)
        _copy_recommended(recommended, metrics, intervals)

        tables = _tables(methods, metrics, intervals, cascade, has_masks, params, verdicts)
        figures = _figures(ctx, rows, local, pixels, maps, masks, has_mask, deletion, insertion, cascade, params, target_name)
        n_masked = int(has_mask.sum())
        return CheckResult(
            metrics=metrics, intervals=intervals,
            summary=_summary(methods, metrics, verdicts, recommended, has_masks, target_name),
            tables=tables, figures=figures, warnings=warnings, findings=findings, not_evaluated=not_evaluated,
            sample_size=len(rows), n={k: n_masked for k in metrics if k.endswith(LOCALISATION + ("mask_share",))},
            details={
                "target": target_name, "methods": methods, "image_tower": tower.kind, "notes": notes,
                "recommended": recommended, "sanity": verdicts,
                "rows": [int(r) for r in rows], "sources": [ctx.source(int(r)) for r in rows],
                "cascade_levels": cascade["levels"] if cascade else [],
                "cascade_spearman": {m: [float(np.nanmean(v)) for v in vs] for m, vs in cascade["spearman"].items()} if cascade else {},
                "mean_deletion_curve": {k: v.mean(axis=0).tolist() for k, v in deletion.items()},
                "mean_insertion_curve": {k: v.mean(axis=0).tolist() for k, v in insertion.items()},
            },
            per_image={f"{m}.{key}": ctx.per_image(rows, values[f"{m}.{key}"])
                       for key in ("deletion_auc", "insertion_auc", "mass_in_mask") for m in methods
                       if f"{m}.{key}" in values},
        )


def _explain(ctx, params, methods, classifier, pixels, targets, maps, settings, rows, local):
    """This process's per-image results (curves, cascade correlations, localisation), keyed
    for ``ctx.gather_rows``; also the cascade's levels and the masks of the local rows."""
    positions = np.searchsorted(rows, local)
    deletion, insertion = _faithfulness(ctx, params, classifier, pixels, targets, maps, positions, len(rows))
    per_row: dict[str, np.ndarray] = {}
    for name in deletion:
        per_row[f"deletion:{name}"], per_row[f"insertion:{name}"] = deletion[name], insertion[name]
    cascade = None
    if params["cascade_points"] > 0:
        cascade = _randomisation(ctx, params, classifier, pixels, targets, maps, settings, local)
        for m in cascade["spearman"]:
            # (images, cascade points): one column per point of the cascade
            per_row[f"spearman:{m}"] = np.stack(cascade["spearman"][m], axis=1)
            per_row[f"ssim:{m}"] = np.stack(cascade["ssim"][m], axis=1)
    masks, unreadable = _load_masks(ctx, local)
    has_mask = np.array([mk is not None and bool(mk.any()) for mk in masks], dtype=bool)
    per_row["has_mask"] = has_mask
    per_row["mask_unreadable"] = unreadable
    if ctx.world.active or has_mask.any():
        # Under torchrun every process reports localisation columns (NaN without a mask),
        # since whether any image has a mask is only known once they are gathered.
        per_row.update(_localisation(methods, maps, masks, has_mask, params["top_percent"]))
    return per_row, cascade, masks


def _unreadable_masks(ctx, rows, merged) -> list[str]:
    unreadable = np.flatnonzero(merged["mask_unreadable"].astype(bool))
    if not unreadable.size:
        return []
    first = ctx.dataset.records[int(ctx.forward.indices[rows[unreadable[0]]])].mask
    return [f"{unreadable.size} of {len(rows)} images had a mask that could not be read "
            f"(first: {first}); they were explained without a region"]


def _per_image_values(methods, deletion, insertion, cascade, merged, has_mask) -> dict[str, np.ndarray]:
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


def _means_and_intervals(ctx, rows, values, n_boot):
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


def _sanity_warnings(verdicts, metrics) -> list[str]:
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


def _copy_recommended(recommended, metrics, intervals) -> None:
    if not recommended:
        return
    for key in ("deletion_gain", "insertion_gain", "mass_in_mask"):
        if f"{recommended}.{key}" in metrics:
            metrics[f"recommended_{key}"] = metrics[f"{recommended}.{key}"]
            if f"{recommended}.{key}" in intervals:
                intervals[f"recommended_{key}"] = intervals[f"{recommended}.{key}"]


# -- steps of run() ------------------------------------------------------------------------------
def _methods(names: list[Any]) -> list[str]:
    """Param validation of ``methods``: known names, normalised ("Grad-CAM" -> grad_cam), each once."""
    methods = []
    # a name list may still hold "saliency,grad_cam" from a configuration file
    for m in (part for name in names for part in str(name).split(",")):
        m = m.strip().lower().replace("-", "_").replace(" ", "_")
        if not m:
            continue
        if m not in METHOD_LABELS:
            raise ValueError(f"unknown method {m!r} (choose from {', '.join(METHOD_LABELS)})")
        if m not in methods:
            methods.append(m)
    if not methods:
        raise ValueError("name at least one method")
    return methods


def _positive(value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be positive, got {value!r}")


def _load_masks(ctx, rows) -> tuple[list, np.ndarray]:
    """Each row's region, or None; a mask file that cannot be read costs that image its region,
    not the check (the rows it costs are counted in a warning)."""
    from mcaudit.data.images import UnreadableImage

    masks, unreadable = [], np.zeros(len(rows), dtype=bool)
    for i, r in enumerate(rows):
        try:
            masks.append(ctx.load_mask(int(r)))
        except UnreadableImage:
            masks.append(None)
            unreadable[i] = True
    return masks, unreadable


def _choose_rows(ctx, params) -> np.ndarray:
    """The stratified subsample, plus images that carry a mask so that localisation has data."""
    rows = set(ctx.stratified_rows(params["n_images"], "saliency:rows").tolist())
    records, indices = ctx.dataset.records, ctx.forward.indices
    masked = [r for r in range(len(ctx.forward)) if records[int(indices[r])].has_region and r not in rows]
    if masked and params["n_mask_images"] > 0:
        pick = ctx.rng("saliency:mask-rows").permutation(len(masked))[: params["n_mask_images"]]
        rows.update(masked[i] for i in pick)
    return np.array(sorted(rows), dtype=np.int64)


def _classifier_and_targets(ctx, rows, prompt: str):
    if prompt.strip():
        with torch.no_grad():
            text = ctx.model.encode_text([prompt.strip()]).float().to(ctx.device)
        features = torch.cat([ctx.class_features.detach().clone().to(ctx.device), text])
        classifier = ctx.model.zero_shot_classifier(features).to(ctx.device).eval()
        targets = torch.full((len(rows),), len(features) - 1, dtype=torch.long, device=ctx.device)
        return classifier, targets, f"prompt {prompt.strip()!r}"
    classifier = ctx.classifier()
    if classifier.class_features.is_inference():
        # The shared class embeddings are made under inference mode; autograd needs a plain copy.
        classifier.class_features = classifier.class_features.clone()
    targets = torch.as_tensor(ctx.forward.preds[rows], dtype=torch.long, device=ctx.device)
    return classifier, targets, "predicted class"


def _load_pixels(ctx, rows) -> torch.Tensor:
    if len(rows) == 0:  # a torchrun process whose share of the images is empty
        return torch.zeros((0, 3, *ctx.model.image_size), device=ctx.device)
    return torch.cat([p for _, p, _ in ctx.iter_batches(rows, desc="saliency: images")])


def _localisation(methods, maps, masks, has_mask, top_percent) -> dict[str, np.ndarray]:
    """Per method and image: pointing hit, attribution mass and top-pixel IoU in the mask (NaN without one)."""
    out = {f"{m}.{key}": np.full(len(has_mask), np.nan) for m in methods for key in LOCALISATION}
    out["mask_share"] = np.full(len(has_mask), np.nan)
    if has_mask.any():
        held = np.flatnonzero(has_mask)
        stack = torch.stack([masks[i].bool().cpu() for i in held])
        out["mask_share"][has_mask] = stack.flatten(1).double().mean(dim=1).numpy()
        for m in methods:
            sub = maps[m][torch.as_tensor(held)]
            values = (pointing_hits(sub, stack), mass_inside(sub, stack), top_fraction_iou(sub, stack, top_percent))
            for key, v in zip(LOCALISATION, values):
                out[f"{m}.{key}"][has_mask] = v
    return out


def _settings(ctx, params, pixels) -> AttributionSettings:
    side = min(pixels.shape[-2:])
    window = params["occlusion_window"] or max(2, side // 8)
    if window > side:
        raise InputError(f"saliency.occlusion_window: {window} is larger than the {side}-pixel image")
    return AttributionSettings(
        batch_size=ctx.batch_size, internal_batch_size=params["internal_batch_size"],
        ig_steps=params["ig_steps"], shap_samples=params["shap_samples"],
        occlusion_window=window, occlusion_stride=max(1, window // 2),
        seed=int(ctx.rng("saliency:attributions").integers(0, 2**31)),
    )


def _faithfulness(ctx, params, classifier, pixels, targets, maps, positions, total):
    """Deletion and insertion curves of the held images; ``positions`` are their places among
    the ``total`` images, so each gets the same random pixel order in any process."""
    generator = ctx.torch_generator("saliency:pixel-order")
    hw = pixels.shape[-2] * pixels.shape[-1]
    orders = {"random": random_ranks(total, hw, generator, positions)}
    orders.update({m: pixel_ranks(a, generator, positions, total) for m, a in maps.items()})
    names = list(orders)
    if len(pixels) == 0:  # a torchrun process whose share of the images is empty
        empty = np.empty((0, params["steps"] + 1))
        return {n: empty for n in names}, {n: empty for n in names}
    probability = params["curve_score"] == "probability"

    def score(images, image_index):
        with ctx.autocast():
            logits = classifier(images).float()
        if probability:
            logits = logits.softmax(dim=1)
        return logits[torch.arange(len(images), device=logits.device), targets[image_index]]

    baselines = baseline_images(pixels, params["baseline"])
    deletion, insertion = perturbation_curves(
        score, pixels, baselines, torch.stack([orders[n] for n in names]), params["steps"], params["curve_batch_size"],
    )
    return ({n: deletion[i] for i, n in enumerate(names)}, {n: insertion[i] for i, n in enumerate(names)})


def _randomisation(ctx, params, classifier, pixels, targets, maps, settings, rows):
    copy = detached_copy(classifier)
    tower = find_image_tower(copy)
    levels = tower.levels
    n_levels = len(levels)
    points = n_levels if params["cascade_points"] >= n_levels else params["cascade_points"]
    checkpoints = sorted({int(round(v)) for v in np.linspace(1, n_levels, points)}) if points > 1 else [n_levels]
    generator = ctx.torch_generator("saliency:randomise")
    methods = [m for m in maps if m != "grad_cam" or tower.has_grad_cam]
    spearman = {m: [] for m in methods}
    ssim = {m: [] for m in methods}
    names = []
    done = 0
    for point in checkpoints:
        while done < point:
            randomise_parameters(levels[done][1], generator)
            done += 1
        names.append(levels[point - 1][0])
        for m in methods:
            if len(pixels) == 0:  # a torchrun process whose share of the images is empty
                spearman[m].append(np.empty(0))
                ssim[m].append(np.empty(0))
                continue
            shuffled = attribution_maps(m, copy, tower, pixels, targets, settings, ctx.autocast, rows=rows)
            spearman[m].append(rank_correlation(maps[m], shuffled))
            ssim[m].append(structural_similarity(normalised_abs(maps[m]), normalised_abs(shuffled)))
    del copy
    return {"levels": names, "all_levels": [n for n, _ in levels], "spearman": spearman, "ssim": ssim}


# -- report ---------------------------------------------------------------------------------
def _cell(metrics, intervals, key, fmt="{:.3f}"):
    value = metrics.get(key)
    if value is None or not np.isfinite(value):
        return None
    text = fmt.format(value)
    if key in intervals:
        lo, hi = intervals[key]
        text += f" ({fmt.format(lo)} to {fmt.format(hi)})"
    return text


def _tables(methods, metrics, intervals, cascade, has_masks, params, verdicts) -> list[Table]:
    label = METHOD_LABELS
    tables = [Table(
        "Faithfulness: deletion and insertion curves (mean over images, 95% interval)",
        ["method", "deletion area (lower is better)", "insertion area (higher is better)",
         "deletion gain over random", "insertion gain over random"],
        [[label[m], _cell(metrics, intervals, f"{m}.deletion_auc"), _cell(metrics, intervals, f"{m}.insertion_auc"),
          _cell(metrics, intervals, f"{m}.deletion_gain", "{:+.3f}"), _cell(metrics, intervals, f"{m}.insertion_gain", "{:+.3f}")]
         for m in methods]
        + [["random pixel order", _cell(metrics, intervals, "random.deletion_auc"), _cell(metrics, intervals, "random.insertion_auc"), None, None]],
        note=f"score: target {params['curve_score']}; removed pixels become the image's {params['baseline']} baseline; {params['steps']} steps",
    )]
    if cascade is not None:
        levels = cascade["levels"]
        cols = ["method", "rank correlation, whole tower random", "SSIM, whole tower random", "passes"]
        cols += [f"rank correlation after + {lv}" for lv in levels[:-1]]
        rows = []
        for m in cascade["spearman"]:
            rows.append(
                [label[m], _cell(metrics, intervals, f"{m}.randomisation_spearman"), _cell(metrics, intervals, f"{m}.randomisation_ssim"),
                 {"pass": "yes", "fail": "NO", "undecided": "undecided"}.get(verdicts.get(m), "no verdict")]
                + [f"{np.nanmean(v):.3f}" for v in cascade["spearman"][m][:-1]]
            )
        tables.append(Table(
            "Sanity: maps of the trained model against maps of a randomised image tower",
            cols, rows,
            note=f"layers randomised from the top: {', '.join(cascade['all_levels'])}; a method passes when the 95% "
                 f"interval of the rank correlation with the whole tower random lies at or below "
                 f"{params['sanity_max_spearman']:g}, fails when it lies above, and is undecided when it straddles it; "
                 "only a method that passes is recommended",
        ))
    if has_masks:
        tables.append(Table(
            "Localisation against the annotated regions, masks or boxes (mean over annotated images, 95% interval)",
            ["method", "pointing game hit rate", "attribution mass inside the mask", f"IoU of top {params['top_percent']:g}% pixels"],
            [[label[m], _cell(metrics, intervals, f"{m}.pointing_game"), _cell(metrics, intervals, f"{m}.mass_in_mask"),
              _cell(metrics, intervals, f"{m}.top_iou")] for m in methods],
            note=f"{int(metrics['n_mask_images'])} images with a mask",
        ))
    return tables


def _figures(ctx, rows, local, pixels, maps, masks, has_mask, deletion, insertion, cascade, params, target_name):
    """The report's figures. ``has_mask``, the curves and the cascade cover all of ``rows``;
    ``pixels``, ``maps`` and ``masks`` only the ``local`` rows this process explained."""
    from mcaudit.reports.plots import short_label

    from .figures import cascade_figure, curves_figure, overlay_grid

    labels = dict(METHOD_LABELS, random="random order")
    chosen = _overlay_rows(ctx, rows, has_mask, params["overlays_per_class"])
    grid = None
    if chosen:
        # Under torchrun the overlay images may be held by other processes: gather them.
        mine = np.flatnonzero(np.isin(local, rows[chosen]))
        idx = torch.as_tensor(mine, dtype=torch.long)
        side = tuple(pixels.shape[-2:])
        held = {
            "pixels": pixels[idx.to(pixels.device)].cpu().numpy(),
            "mask": np.stack([masks[i].bool().cpu().numpy() if masks[i] is not None else np.zeros(side, bool) for i in mine])
            if len(mine) else np.zeros((0, *side), bool),
        }
        held.update({f"map:{m}": a[idx].numpy() for m, a in maps.items()})
        _, grid = ctx.gather_rows(local[mine], held)
    if not ctx.world.is_main:  # only the first process writes the report
        return []
    figures = []
    if chosen:
        classes, preds, labels_true = ctx.classes, ctx.forward.preds, ctx.forward.labels
        titles = [f"{short_label(classes[labels_true[rows[i]]], 18)}\n→ {short_label(classes[preds[rows[i]]], 18)}"
                  for i in chosen]
        figures.append(overlay_grid(
            torch.from_numpy(grid["pixels"]), {m: torch.from_numpy(grid[f"map:{m}"]) for m in maps},
            [torch.from_numpy(mk) if has_mask[i] else None for i, mk in zip(chosen, grid["mask"])], titles, labels,
        ))
    score_name = f"{params['curve_score']} of the {target_name}"
    figures.append(curves_figure(deletion, insertion, labels, score_name))
    if cascade is not None and len(cascade["levels"]) > 1:
        figures.append(cascade_figure(cascade["levels"], {m: [float(np.nanmean(v)) for v in vs] for m, vs in cascade["spearman"].items()}, labels))
    return figures


def _overlay_rows(ctx, rows, has_mask, per_class) -> list[int]:
    """Positions in ``rows``: a few images of each class, those with a mask first."""
    if per_class <= 0:
        return []
    labels = ctx.forward.labels[rows]
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = sorted(members, key=lambda i: (not has_mask[i], i))
        chosen.extend(int(i) for i in members[:per_class])
    return sorted(chosen)[:MAX_OVERLAY_ROWS]


def _sanity_verdicts(methods, metrics, intervals, bound: float) -> dict[str, str]:
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


def _recommend(methods, metrics, intervals, verdicts, sanity_run: bool, has_masks: bool):
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


def _summary(methods, metrics, verdicts, recommended, has_masks, target_name) -> str:
    """Facts only: which methods pass the sanity test, which one is the most faithful of those."""
    label = METHOD_LABELS
    parts = [f"Explaining the {target_name} on {int(metrics['n_images'])} images"]
    if verdicts:
        groups = {v: [label[m] for m in methods if verdicts[m] == v] for v in ("pass", "fail", "undecided", "no verdict")}
        said = {"pass": "pass", "fail": "fail", "undecided": "are undecided on", "no verdict": "have constant maps under"}
        parts.append(", ".join(f"{', '.join(names)} {said[v]}" for v, names in groups.items() if names)
                     + " the randomisation sanity test")
    else:
        parts.append("the randomisation sanity test was not run")
    if recommended:
        text = (f"of those that pass, {label[recommended]} is the most faithful (deletion "
                f"{metrics[f'{recommended}.deletion_gain']:+.3f}, insertion {metrics[f'{recommended}.insertion_gain']:+.3f} "
                "vs a random pixel order)")
        share = metrics.get(f"{recommended}.mass_in_mask", float("nan"))
        if has_masks and np.isfinite(share):
            text += f"; {share:.0%} of its positive attribution falls inside the masks, which cover {metrics['mask_share']:.0%} of the image"
        parts.append(text)
    else:
        parts.append("no method is recommended")
    return "; ".join(parts) + "."


def _nanmean(values: np.ndarray) -> float:
    ok = values[np.isfinite(values)]
    return float(ok.mean()) if len(ok) else float("nan")


@hookimpl
def mcaudit_register_checks(register):
    register(SaliencyCheck)
