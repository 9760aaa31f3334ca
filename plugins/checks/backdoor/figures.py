"""The check's figures: attack success and its cost per target class, and each learned trigger
on an example image."""

from __future__ import annotations

import numpy as np
import torch


def trigger_figure(shown: list, epsilon: float, grey: bool):
    """Each learned trigger (noise amplified to be visible, and the patch) on an example image."""
    from mcaudit.reports.plots import image_grid, short_label, to_figure, to_hwc

    amplify = 0.5 / max(epsilon, 1e-8)
    images, titles = [], []
    for target, trigger, example, asr in shown:
        with torch.no_grad():
            noise = trigger.noise.clamp(-epsilon, epsilon)
            pattern = (0.5 + noise * amplify) * (1 - trigger.mask) + trigger.patch.clamp(0, 1) * trigger.mask
            triggered = trigger(example)
            # in units of the noise bound, so the noise shows at full scale (the patch saturates)
            change = ((triggered - example).abs() / max(epsilon, 1e-8)).clamp(0, 1)
        images += [to_hwc(t[0]) for t in (pattern, example, triggered, change)]
        titles += [f"trigger for {short_label(target, 16)}", "clean image", f"triggered: {asr:.0%} success", "|change| / bound"]
    fig = image_grid(images, titles, cols=4, cell=2.0, cmap="gray" if grey else None)
    return to_figure(
        fig, "Learned triggers",
        f"one row per target class; noise amplified ×{amplify:.0f} around mid-grey (actual bound ±{epsilon:.4f}), "
        "patch in the bottom-right corner shown as is; the change is shown in units of the bound; success = share of triggered held-out images of other "
        "classes sent to the target by the backdoored prompts",
    )


def summary_figure(rows: list[list]):
    from mcaudit.reports.plots import new_figure, short_label, to_figure

    names = [str(r[0]) for r in rows]
    x = np.arange(len(names))
    series = [("attack success rate", 3), ("base rate", 4), ("clean acc., backdoored", 6), ("clean acc., honest", 7)]
    fig, ax = new_figure(max(4.5, 1.2 * len(names) + 2.5), 3.4)
    w = 0.8 / len(series)
    for k, (label, col) in enumerate(series):
        vals = [np.nan if r[col] is None else float(r[col]) for r in rows]
        ax.bar(x + (k - (len(series) - 1) / 2) * w, vals, w, label=label)
    ax.set_xticks(x, [short_label(n, 16) for n in names], rotation=30 if len(names) > 3 else 0)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("share of held-out images")
    ax.set_xlabel("target class")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    return to_figure(fig, "Backdoor success and its cost", "held-out images; attack success rate on triggered images of other classes")
