"""Presentation: the robust-accuracy and attack tables, the accuracy-against-budget curves and
the drill-down gallery of successful attacks (original, attacked, perturbation amplified)."""

from __future__ import annotations

import numpy as np
import torch

from mcaudit import Gallery, GalleryItem, Table

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


def figures(o: Outcome) -> list:
    from mcaudit.reports import plots

    clean_acc = o.n_correct / o.n if o.n else float("nan")
    curves = [fig for fig in (_curve(plots, o.robust, clean_acc, o.attacks, "linf", o.eps_linf),
                              _curve(plots, o.robust, clean_acc, o.attacks, "l2", o.eps_l2)) if fig is not None]
    return curves


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


def galleries(ctx, source: GallerySource, eps_linf, count: int) -> list[Gallery]:
    """The attacks that succeeded at the largest L-inf budget, most convincing first (highest
    confidence in the wrong answer), from this process's rows: original, attacked and the
    perturbation made visible, with the prediction before and after."""
    from mcaudit.reports import plots

    if count <= 0 or not source.adversarial or not eps_linf or source.model is None:
        return []
    eps = max(eps_linf)
    name = next((a for a in GALLERY_PREFERENCE if (a, eps) in source.adversarial), None)
    if name is None:
        return []
    adv, adv_pred = source.adversarial[(name, eps)]
    clean, clean_pred = source.images[source.keep], source.clean_pred[source.keep]
    fooled = torch.nonzero(adv_pred != clean_pred).flatten()
    if not len(fooled):
        return []
    with torch.no_grad(), ctx.autocast():
        before = source.model(clean[fooled]).float().softmax(dim=1).cpu()
        after = source.model(adv[fooled]).float().softmax(dim=1).cpu()
    order = sorted(range(len(fooled)), key=lambda j: (-float(after[j].max()), j))[:count]
    rows = source.rows[source.keep.cpu().numpy()] if source.rows is not None else None
    items = [_item(plots, ctx, clean[i], adv[i], int(clean_pred[i]), int(adv_pred[i]), before[j], after[j],
                   ctx.source(int(rows[i])) if rows is not None else "")
             for j, i in ((j, int(fooled[j])) for j in order)]
    shown = "shown: the " + (f"{len(items)} " if len(items) > 1 else "") + "most convincing, surest wrong answer first"
    return [Gallery(
        f"Attacked images ({name}, L-inf {budget_label('linf', eps)})", items,
        f"{len(fooled)} of {len(clean)} correctly classified images attacked here changed class; {shown}. "
        "The perturbation is stretched so its largest change is full scale (mid-grey: no change).")]


def _item(plots, ctx, clean, adv, before_class: int, after_class: int, before, after, source: str) -> GalleryItem:
    delta = (adv - clean).detach().float().cpu()
    gain = 0.5 / max(float(delta.abs().max()), 1e-12)
    return GalleryItem(
        pictures=[("original", plots.thumbnail(clean)), ("attacked", plots.thumbnail(adv)),
                  (f"change x{gain:.0f}", plots.thumbnail(plots.amplified(delta)))],
        label=ctx.classes[before_class], prediction=ctx.classes[after_class],
        confidence=float(after[after_class]), source=source,
        notes=[f"before the attack: {ctx.classes[before_class]}, {float(before[before_class]):.0%}",
               f"largest pixel change {float(delta.abs().max()) * 255:.1f}/255"])
