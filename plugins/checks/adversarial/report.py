"""Presentation: the robust-accuracy and attack tables, the accuracy-against-budget curves and
the gallery of successful attacks."""

from __future__ import annotations

import numpy as np
import torch

from mcaudit import Table

from .attacks import ATTACKS
from .budgets import budget_label, norm_name
from .campaign import GallerySource, Outcome

GALLERY_PREFERENCE = ("pgd_linf", "apgd_ce", "fgsm", "apgd_dlr", "square")


def tables(o: Outcome, table_rows) -> list[Table]:
    return [Table(
        "Robust accuracy per attack and budget",
        ["attack", "norm", "budget (eps)", "robust accuracy", "95% CI", "attack success rate", "95% CI",
         "images flipped"],
        table_rows,
        note=(f"{o.n} images, {o.n_correct} classified correctly before the attack; only those were attacked. "
              f"Success rate is the share of them whose class the attack flipped. Intervals are exact "
              f"(Clopper-Pearson) 95% intervals for a proportion. "
              + ("The perturbation was confined to one grey channel replicated to three. " if o.grey else "")
              + " ".join(o.notes)).strip(),
    ), Table("Attacks", ["attack", "norm", "kind", "what it does"],
             [[a, norm_name(ATTACKS[a][0]), "white-box" if ATTACKS[a][1] else "black-box", ATTACKS[a][2]]
              for a in o.attacks])]


def figures(ctx, o: Outcome, gallery: GallerySource, count: int) -> list:
    from mcaudit.reports import plots

    clean_acc = o.n_correct / o.n if o.n else float("nan")
    curves = [fig for fig in (_curve(plots, o.robust, clean_acc, o.attacks, "linf", o.eps_linf),
                              _curve(plots, o.robust, clean_acc, o.attacks, "l2", o.eps_l2)) if fig is not None]
    shown = _gallery(plots, ctx, gallery, o.eps_linf, count)
    return curves + ([shown] if shown is not None else [])


def _curve(plots, robust, clean_acc, attacks, norm, eps_list):
    names = [a for a in attacks if ATTACKS[a][0] == norm]
    if not names or not eps_list:
        return None
    fig, ax = plots.new_figure(5.4, 3.6)
    scale = 255.0 if norm == "linf" else 1.0
    xs = [0.0] + [e * scale for e in eps_list]
    for name in names:
        ys = [clean_acc] + [robust[(name, norm, e)].mean() for e in eps_list]
        ax.plot(xs, ys, marker="o", label=name)
    if len(names) > 1:
        worst = [clean_acc] + [np.logical_and.reduce([robust[(a, norm, e)] for a in names]).mean() for e in eps_list]
        ax.plot(xs, worst, color="black", linestyle="--", marker="s", label="worst case")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("budget eps (x 1/255)" if norm == "linf" else "budget eps (L2 norm)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.to_figure(
        fig, f"Robust accuracy against the {norm_name(norm)} budget",
        "Accuracy of the attacked subsample under each attack as the perturbation budget grows; "
        "eps 0 is the clean accuracy. Curves must fall with eps; a curve that rises hints at gradient masking.")


def _gallery(plots, ctx, source: GallerySource, eps_linf, count):
    """Successful attacks at the largest L-inf budget, from this process's rows."""
    if count <= 0 or not source.adversarial or not eps_linf:
        return None
    eps = max(eps_linf)
    name = next((a for a in GALLERY_PREFERENCE if (a, eps) in source.adversarial), None)
    if name is None:
        return None
    adv, adv_pred = source.adversarial[(name, eps)]
    clean_pred = source.clean_pred[source.keep]
    fooled = torch.nonzero(adv_pred != clean_pred).flatten()[:count].tolist()
    if not fooled:
        return None
    tiles, row_labels = _gallery_rows(plots, ctx.classes, source.images[source.keep], adv, clean_pred, adv_pred, fooled)
    mosaic, centres_x, centres_y = _mosaic(tiles)
    fig, ax = plots.new_figure(6.0, 0.6 + 1.9 * len(tiles))
    ax.imshow(mosaic, cmap="gray" if mosaic.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(centres_x, ["clean", "perturbation (amplified)", "attacked"], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(centres_y, row_labels, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return plots.to_figure(
        fig, f"Attack gallery ({name}, L-inf {budget_label('linf', eps)})",
        "Each row: the clean image, the perturbation stretched to the full grey range so it is visible "
        "(mid-grey is no change), and the attacked image; the row label gives the model's prediction before "
        "and after the attack.")


def _gallery_rows(plots, classes, clean, adv, clean_pred, adv_pred, fooled):
    """Per fooled image: the clean, amplified-perturbation and attacked tiles, and the row label."""
    tiles, row_labels = [], []
    for i in fooled:
        c = clean[i].detach().float().cpu()
        a = adv[i].detach().float().cpu()
        delta = a - c
        amp = 0.5 + delta / (2 * max(float(delta.abs().max()), 1e-12))
        tiles.append([plots.to_hwc(c), plots.to_hwc(amp), plots.to_hwc(a)])
        row_labels.append(f"{plots.short_label(classes[int(clean_pred[i])], 16)}\n"
                          f"-> {plots.short_label(classes[int(adv_pred[i])], 16)}")
    return tiles, row_labels


def _mosaic(tiles: list[list[np.ndarray]], gap: int = 2) -> tuple[np.ndarray, list[float], list[float]]:
    """Equal-sized images laid out in rows, separated by white gaps; also the tile centres.

    One mosaic in one axes is far cheaper to lay out and encode than a grid of subplots."""
    h, w = tiles[0][0].shape[:2]
    cols = len(tiles[0])
    shape = (len(tiles) * (h + gap) - gap, cols * (w + gap) - gap) + tiles[0][0].shape[2:]
    out = np.ones(shape, dtype=np.float32)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    centres_x = [c * (w + gap) + (w - 1) / 2 for c in range(cols)]
    centres_y = [r * (h + gap) + (h - 1) / 2 for r in range(len(tiles))]
    return out, centres_x, centres_y
