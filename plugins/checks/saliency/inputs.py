"""What the saliency check explains and with what: validation of its parameters, the rows
chosen, the classifier and targets, the pixels and masks loaded, the attribution settings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mcaudit import InputError
from mcaudit.data.images import UnreadableImage

from .attributions import METHOD_LABELS, AttributionSettings
from .tower import ImageTower


def valid_methods(names: list[Any]) -> list[str]:
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


def positive(value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be positive, got {value!r}")


def applicable_methods(methods: list[str], tower: ImageTower) -> tuple[list[str], list[str]]:
    """The methods this model's image tower allows, and a warning for each one dropped."""
    if "grad_cam" in methods and not tower.has_grad_cam:
        return [m for m in methods if m != "grad_cam"], [f"Grad-CAM skipped: {tower.note or 'no image block found'}"]
    return methods, []


def choose_rows(ctx, params) -> np.ndarray:
    """The stratified subsample, plus images that carry a mask so that localisation has data."""
    rows = set(ctx.stratified_rows(params["n_images"], "saliency:rows").tolist())
    records, indices = ctx.dataset.records, ctx.forward.indices
    masked = [r for r in range(len(ctx.forward)) if records[int(indices[r])].has_region and r not in rows]
    if masked and params["n_mask_images"] > 0:
        pick = ctx.rng("saliency:mask-rows").permutation(len(masked))[: params["n_mask_images"]]
        rows.update(masked[i] for i in pick)
    return np.array(sorted(rows), dtype=np.int64)


def classifier_and_targets(ctx, rows, prompt: str):
    """The differentiable classifier, the class index each row's map explains, and its name."""
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


def load_pixels(ctx, rows) -> torch.Tensor:
    if len(rows) == 0:  # a torchrun process whose share of the images is empty
        return torch.zeros((0, 3, *ctx.model.image_size), device=ctx.device)
    return torch.cat([p for _, p, _ in ctx.iter_batches(rows, desc="saliency: images")])


def load_masks(ctx, rows) -> tuple[list, np.ndarray]:
    """Each row's region, or None; a mask file that cannot be read costs that image its region,
    not the check (the rows it costs are counted in a warning)."""
    masks, unreadable = [], np.zeros(len(rows), dtype=bool)
    for i, r in enumerate(rows):
        try:
            masks.append(ctx.load_mask(int(r)))
        except UnreadableImage:
            masks.append(None)
            unreadable[i] = True
    return masks, unreadable


def unreadable_masks(ctx, rows, merged) -> list[str]:
    unreadable = np.flatnonzero(merged["mask_unreadable"].astype(bool))
    if not unreadable.size:
        return []
    first = ctx.dataset.records[int(ctx.forward.indices[rows[unreadable[0]]])].mask
    return [f"{unreadable.size} of {len(rows)} images had a mask that could not be read "
            f"(first: {first}); they were explained without a region"]


def attribution_settings(ctx, params, pixels) -> AttributionSettings:
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
