"""Presentation of the saliency check: the faithfulness, sanity and localisation tables, the
figures (overlays gathered from every process, mean curves, cascade) and the summary."""

from __future__ import annotations

import numpy as np
import torch

from mcaudit import Gallery, GalleryItem, Table

from .attributions import METHOD_LABELS
from .explanation import Evidence
from .figures import cascade_figure, curves_figure, overlay_grid

MAX_OVERLAY_ROWS = 12


def _cell(metrics, intervals, key, fmt="{:.3f}"):
    value = metrics.get(key)
    if value is None or not np.isfinite(value):
        return None
    text = fmt.format(value)
    if key in intervals:
        lo, hi = intervals[key]
        text += f" ({fmt.format(lo)} to {fmt.format(hi)})"
    return text


def tables(methods, metrics, intervals, cascade, has_masks, params, verdicts) -> list[Table]:
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


def figures(ctx, rows, local, pixels, maps, masks, ev: Evidence, params, target_name):
    """The report's figures. The evidence covers all of ``rows``;
    ``pixels``, ``maps`` and ``masks`` only the ``local`` rows this process explained."""
    from mcaudit.reports.plots import short_label  # matplotlib loads only when a report is drawn

    has_mask, cascade = ev.has_mask, ev.cascade
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
    out = []
    if chosen:
        classes, preds, labels_true = ctx.classes, ctx.forward.preds, ctx.forward.labels
        titles = [f"{short_label(classes[labels_true[rows[i]]], 18)}\n→ {short_label(classes[preds[rows[i]]], 18)}"
                  for i in chosen]
        out.append(overlay_grid(
            torch.from_numpy(grid["pixels"]), {m: torch.from_numpy(grid[f"map:{m}"]) for m in maps},
            [torch.from_numpy(mk) if has_mask[i] else None for i, mk in zip(chosen, grid["mask"])], titles, labels,
        ))
    score_name = f"{params['curve_score']} of the {target_name}"
    out.append(curves_figure(ev.deletion, ev.insertion, labels, score_name))
    if cascade is not None and len(cascade["levels"]) > 1:
        out.append(cascade_figure(cascade["levels"], {m: [float(np.nanmean(v)) for v in vs] for m, vs in cascade["spearman"].items()}, labels))
    return out


def galleries(ctx, rows, local, pixels, maps, judged, count: int) -> list[Gallery]:
    """The ``count`` images whose map was most faithful and the ``count`` least faithful
    (deletion plus insertion gain over a random order, per image), each with its heat map,
    for the recommended method, else the most faithful on average. Only this process's images
    have pixels at hand, so under torchrun the first process shows its own share."""
    from mcaudit.reports.plots import heat_overlay, thumbnail  # matplotlib loads only when a report is drawn

    if count <= 0 or not ctx.world.is_main or not len(local):
        return []
    method = judged.recommended or max(maps, key=lambda m: np.nan_to_num(
        judged.metrics.get(f"{m}.deletion_gain", np.nan) + judged.metrics.get(f"{m}.insertion_gain", np.nan), nan=-np.inf))
    gain = judged.values[f"{method}.deletion_gain"] + judged.values[f"{method}.insertion_gain"]
    positions = np.searchsorted(rows, local)  # where each local image sits among ``rows``
    ranked = sorted((i for i in range(len(local)) if np.isfinite(gain[positions[i]])), key=lambda i: (-gain[positions[i]], i))
    picked = {"most faithful": ranked[:count], "least faithful": ranked[count:][::-1][:count]}
    why = "the recommended method" if judged.recommended else "no method passed the sanity test; the most faithful on average"
    out = []
    for kind, chosen in picked.items():
        items = []
        for i in chosen:
            row, p = int(local[i]), positions[i]
            pred = int(ctx.forward.preds[row])
            items.append(GalleryItem(
                [("image", thumbnail(pixels[i])), (METHOD_LABELS[method], thumbnail(heat_overlay(pixels[i], maps[method][i])))],
                label=ctx.classes[int(ctx.forward.labels[row])], prediction=ctx.classes[pred],
                confidence=float(ctx.forward.probs[row, pred]), source=ctx.source(row),
                notes=[f"deletion gain {judged.values[f'{method}.deletion_gain'][p]:+.3f}",
                       f"insertion gain {judged.values[f'{method}.insertion_gain'][p]:+.3f}"]))
        if items:
            out.append(Gallery(
                f"{METHOD_LABELS[method]} maps, {kind} first", items,
                f"{METHOD_LABELS[method]} ({why}): the images where its map {'best' if kind == 'most faithful' else 'least'} "
                "predicts which pixels matter (deletion plus insertion gain over a random pixel order); bright: "
                "where the map says the model looked"))
    return out


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


def summary(methods, metrics, verdicts, recommended, has_masks, target_name) -> str:
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
