"""Explaining this process's images and measuring the explanations: deletion and insertion
curves against a random pixel order, the randomisation cascade (sanity), localisation in the
masks; and the per-image results of every process gathered into Evidence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attributions import attribution_maps
from .inputs import load_masks
from .metrics import (baseline_images, mass_inside, normalised_abs, perturbation_curves, pixel_ranks, pointing_hits,
                      random_ranks, rank_correlation, structural_similarity, top_fraction_iou)
from .tower import detached_copy, find_image_tower, randomise_parameters

LOCALISATION = ("pointing_game", "mass_in_mask", "top_iou")


@dataclass
class Evidence:
    """Every process's per-image results, gathered: the curves per method (and the random
    order), the cascade's correlations, which images have a mask, and all gathered columns."""

    deletion: dict[str, np.ndarray]
    insertion: dict[str, np.ndarray]
    has_mask: np.ndarray
    cascade: dict | None
    merged: dict[str, np.ndarray]


def explain(ctx, params, methods, classifier, pixels, targets, maps, settings, rows, local):
    """This process's per-image results (curves, cascade correlations, localisation), keyed
    for ``ctx.gather_rows``; also the cascade's levels and the masks of the local rows."""
    positions = np.searchsorted(rows, local)
    deletion, insertion = faithfulness(ctx, params, classifier, pixels, targets, maps, positions, len(rows))
    per_row: dict[str, np.ndarray] = {}
    for name in deletion:
        per_row[f"deletion:{name}"], per_row[f"insertion:{name}"] = deletion[name], insertion[name]
    cascade = None
    if params["cascade_points"] > 0:
        cascade = randomisation(ctx, params, classifier, pixels, targets, maps, settings, local)
        for m in cascade["spearman"]:
            # (images, cascade points): one column per point of the cascade
            per_row[f"spearman:{m}"] = np.stack(cascade["spearman"][m], axis=1)
            per_row[f"ssim:{m}"] = np.stack(cascade["ssim"][m], axis=1)
    masks, unreadable = load_masks(ctx, local)
    has_mask = np.array([mk is not None and bool(mk.any()) for mk in masks], dtype=bool)
    per_row["has_mask"] = has_mask
    per_row["mask_unreadable"] = unreadable
    if ctx.world.active or has_mask.any():
        # Under torchrun every process reports localisation columns (NaN without a mask),
        # since whether any image has a mask is only known once they are gathered.
        per_row.update(localisation(methods, maps, masks, has_mask, params["top_percent"]))
    return per_row, cascade, masks


def localisation(methods, maps, masks, has_mask, top_percent) -> dict[str, np.ndarray]:
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


def faithfulness(ctx, params, classifier, pixels, targets, maps, positions, total):
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


def randomisation(ctx, params, classifier, pixels, targets, maps, settings, rows):
    """Maps recomputed at each point of the top-down cascade that randomises the image tower's
    layers, compared with the trained model's maps (rank correlation and SSIM per image)."""
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


def gather_evidence(ctx, local, per_row, methods, cascade) -> Evidence:
    """The per-row results of every process; the cascade's columns become per-point arrays again."""
    _, merged = ctx.gather_rows(local, per_row)
    if cascade is not None:
        cascade["spearman"] = {m: [np.ascontiguousarray(c) for c in merged[f"spearman:{m}"].T] for m in cascade["spearman"]}
        cascade["ssim"] = {m: [np.ascontiguousarray(c) for c in merged[f"ssim:{m}"].T] for m in cascade["ssim"]}
    return Evidence({n: merged[f"deletion:{n}"] for n in ["random", *methods]},
                    {n: merged[f"insertion:{n}"] for n in ["random", *methods]},
                    merged["has_mask"].astype(bool), cascade, merged)
