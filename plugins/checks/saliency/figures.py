"""Report figures of the saliency check: overlays, mean curves and the randomisation cascade."""

from __future__ import annotations

import numpy as np
import torch

from mcaudit.check_api import Figure


def overlay_grid(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    masks: list[torch.Tensor | None],
    titles: list[str],
    labels: dict[str, str],
) -> Figure:
    """One row per image: the image (mask outlined), then each method's heat map over it."""
    import matplotlib.pyplot as plt

    from mcaudit.reports.plots import to_figure, to_hwc

    methods = list(maps)
    cols = 1 + len(methods)
    rows = len(images)
    cell = 1.6
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell + 0.4), dpi=100, squeeze=False)
    grey = images.float().mean(dim=1).cpu().numpy()
    for r in range(rows):
        mask = masks[r]
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(to_hwc(images[r]))
                ax.set_ylabel(titles[r], fontsize=7)
            else:
                heat = maps[methods[c - 1]][r].clamp_min(0).numpy()
                top = float(np.quantile(heat, 0.995)) if heat.max() > 0 else 1.0
                ax.imshow(grey[r], cmap="gray", vmin=0, vmax=1)
                ax.imshow(heat / max(top, 1e-12), cmap="inferno", vmin=0, vmax=1, alpha=0.6)
            if mask is not None and bool(mask.any()):
                ax.contour(mask.numpy().astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            if r == 0:
                ax.set_title("image" if c == 0 else labels[methods[c - 1]], fontsize=8)
    caption = (
        "Each row is one audited image (label and prediction at the left); each column a method's "
        "positive evidence for the explained target, brightest where the method says the model "
        "looked. Cyan outline: the annotated region (mask), where the data has one."
    )
    return to_figure(fig, "Attribution maps", caption)


def curves_figure(deletion: dict[str, np.ndarray], insertion: dict[str, np.ndarray], labels: dict[str, str], score_name: str) -> Figure:
    """Mean deletion and insertion curves over images, one line per method and for random."""
    import matplotlib.pyplot as plt

    from mcaudit.reports.plots import to_figure

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), dpi=100)
    for ax, curves, title in ((axes[0], deletion, "Deletion (lower is better)"), (axes[1], insertion, "Insertion (higher is better)")):
        for name, c in curves.items():
            x = np.linspace(0, 1, c.shape[-1])
            style = {"color": "grey", "linestyle": "--"} if name == "random" else {}
            ax.plot(x, c.mean(axis=0), label=labels.get(name, name), **style)
        ax.set_xlabel("fraction of pixels changed, most relevant first")
        ax.set_ylabel(score_name)
        ax.set_title(title, fontsize=9)
    axes[1].legend(fontsize=7, loc="best")
    caption = (
        "Mean over the audited images of the target score as the most relevant pixels are "
        "removed (left) or revealed (right). A faithful method falls faster than the grey "
        "random order on the left and rises faster on the right."
    )
    return to_figure(fig, "Deletion and insertion curves", caption)


def cascade_figure(levels: list[str], spearman: dict[str, list[float]], labels: dict[str, str]) -> Figure:
    """Rank correlation with the original maps as more of the image tower is randomised."""
    from mcaudit.reports.plots import new_figure, to_figure

    fig, ax = new_figure(max(4.5, 0.7 * len(levels) + 2), 3.2)
    x = np.arange(len(levels))
    for name, values in spearman.items():
        ax.plot(x, values, marker="o", label=labels.get(name, name))
    ax.set_xticks(x, [f"+ {lv}" for lv in levels], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(-0.1, 1.05)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_ylabel("rank correlation with original")
    ax.legend(fontsize=7)
    caption = (
        "Model parameter randomisation test (Adebayo et al., 2018): the image tower's layers are "
        "re-initialised from the top down; each point is the mean Spearman correlation between "
        "the maps of the trained and the partly randomised model. Maps that stay correlated do "
        "not depend on what the model learned."
    )
    return to_figure(fig, "Randomisation sanity check", caption)
