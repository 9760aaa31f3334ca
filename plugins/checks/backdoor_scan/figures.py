"""The check's figures: the smallest mask per class (audited and reference model, with the MAD
rule's line) and each reversed trigger stamped on a held-out image."""

from __future__ import annotations

import numpy as np

from .rules import MAD_CONSISTENCY


def norms_figure(names, audited, reference, decision, params):
    from mcaudit.reports.plots import new_figure, short_label, to_figure

    areas = np.asarray(audited["area"], dtype=float)
    fig, ax = new_figure(max(4.5, 0.7 * len(names) + 2.5), 3.4)
    x = np.arange(len(names))
    width = 0.4 if reference is not None else 0.8
    colours = ["#c0392b" if f and not decision["blocked"] else "#4c72b0" for f in decision["flagged"]]
    ax.bar(x - (width / 2 if reference is not None else 0), areas * 100, width, color=colours, label="audited model")
    if reference is not None:
        ax.bar(x + width / 2, np.asarray(reference["area"]) * 100, width, color="#bbbbbb", label="reference model")
    if decision["index"] is not None:
        median = float(np.median(areas))
        mad = MAD_CONSISTENCY * float(np.median(np.abs(areas - median)))
        if mad > 0 and median - params["anomaly_threshold"] * mad > 0:
            ax.axhline((median - params["anomaly_threshold"] * mad) * 100, color="#c0392b", linestyle=":", linewidth=1,
                       label=f"MAD rule: flag below (anomaly index {params['anomaly_threshold']:g})")
    ax.set_xticks(x, [short_label(n, 14) for n in names], rotation=30 if len(names) > 3 else 0)
    ax.set_ylabel("smallest mask, % of image")
    ax.set_xlabel("candidate target class")
    ax.legend(fontsize=7)
    return to_figure(fig, "Smallest trigger mask per class",
                     "a backdoored class needs a much smaller stamp than the others (and than on the reference "
                     "model); red bars are flagged")


def reversed_triggers_figure(ctx, inversion: dict, candidates: np.ndarray, rows: np.ndarray, grey: bool):
    from mcaudit.reports.plots import image_grid, short_label, to_figure, to_hwc

    classes = ctx.classes
    images, titles = [], []
    example_rows = rows[:1] if len(rows) else np.array([0])
    example = ctx.load_pixels(example_rows)[0]
    for k, c in enumerate(candidates):
        mask, pattern = inversion["masks"][k], inversion["patterns"][k]
        shown_mask = mask / mask.max().clamp_min(1e-8)
        stamp = (mask * pattern).expand(3, -1, -1)
        stamped = (1 - mask) * example + mask * pattern
        name = short_label(classes[c], 14)
        for img, title in ((shown_mask.expand(3, -1, -1), f"mask → {name}"), (stamp, "mask × pattern"), (stamped, "stamped image")):
            images.append(to_hwc(img))
            titles.append(title)
    fig = image_grid(images, titles, cols=3, cell=1.8, cmap="gray" if grey else None)
    return to_figure(fig, "Reversed triggers",
                     "one row per candidate class: the mask (scaled to its maximum; white = pasted), the stamp "
                     "it pastes, and a held-out clean image with the stamp")
