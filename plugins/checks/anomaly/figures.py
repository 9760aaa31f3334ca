"""The anomaly check's figures: ROC curves and score histograms per OOD set, and examples of
the generated OOD images. The check imports this module only when it draws, so listing the
plugins does not load matplotlib."""

from __future__ import annotations

import math

import numpy as np

from mcaudit import Figure
from mcaudit.reports.plots import image_grid, new_figure, roc_figure, to_figure, to_hwc

from .evaluation import SET_TITLES
from .scores import SCORES


def roc_curves(set_name, id_eval, scores, n_classes) -> Figure:
    curves = []
    for s in SCORES:
        is_id = np.r_[np.ones(len(id_eval[s]), bool), np.zeros(len(scores[s]), bool)]
        curves.append((s, is_id, np.r_[id_eval[s], scores[s]]))
    caption = "One curve per score; the dashed line is 95% TPR, where FPR@95 is read. The dotted diagonal is chance."
    if n_classes == 2:
        caption += " With two classes MSP and MCM rank images identically, so their curves coincide."
    return roc_figure(curves, f"ROC curves: audited images vs {SET_TITLES[set_name]}", caption,
                      xlabel="OOD images accepted as in-distribution (FPR)", ylabel="audited images accepted (TPR)",
                      legend_title="score (AUROC)", tpr_line=0.95)


def score_histogram(set_name, score_name, id_scores, ood_scores) -> Figure:
    fig, ax = new_figure(5.2, 3.2)
    both = np.r_[id_scores, ood_scores]
    # A few extreme OOD scores would squash the plot; they are drawn in the leftmost bin.
    lo = min(float(np.quantile(both, 0.02)), float(id_scores.min()))
    bins = np.linspace(lo, both.max() + 1e-12, 31)
    ax.hist(np.maximum(id_scores, lo), bins=bins, alpha=0.6, label="audited (held-out)", density=True)
    ax.hist(np.maximum(ood_scores, lo), bins=bins, alpha=0.6, label=SET_TITLES[set_name], density=True)
    threshold = np.sort(id_scores)[::-1][max(1, math.ceil(0.95 * len(id_scores) - 1e-9)) - 1]
    ax.axvline(threshold, color="black", ls="--", lw=1, label="accepts 95% of audited")
    ax.set_xlabel(f"{score_name} score (higher = more like the audited images)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return to_figure(fig, f"Score distributions, {SET_TITLES[set_name]} ({score_name}, the best score)",
                     "Images right of the dashed line would be accepted as in-distribution; "
                     "scores below the axis start are counted in the leftmost bin.")


def generated_examples(original, near_examples, far_examples) -> Figure:
    items = ([("audited image", original)] + [(f"near: {k}", v) for k, v in near_examples.items()]
             + [(f"far: {k}", v) for k, v in far_examples.items()])
    fig = image_grid([to_hwc(img) for _, img in items], [t for t, _ in items], cols=4)
    return to_figure(fig, "Examples of the generated OOD images",
                     "Near-OOD images are audited images under one strong corruption each; far-OOD images are not medical images at all.")
