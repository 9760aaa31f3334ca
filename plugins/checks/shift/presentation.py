"""What the report shows: the table per corruption, the severity-by-corruption heat map, one
image under every corruption at every severity, the accuracy curve per family, the summary."""

from __future__ import annotations

import numpy as np

from mcaudit import Table

from .severities import CORRUPTIONS


def _fmt(value) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.3f}"


def table(numbers, plan, n: int, modality: str, source: str) -> Table:
    m = numbers.metrics
    columns = ["corruption", "family"] + [f"accuracy s{s}" for s in plan.severities] + ["accuracy drop", "95% CI"]
    has_ref = "mce" in m
    if has_ref:
        columns += ["CE", "relative CE"]
    rows = []
    for c in plan.corruptions:
        lo, hi = numbers.intervals.get(f"accuracy_drop.{c}", (float("nan"),) * 2)
        row = [c, CORRUPTIONS[c].family] + [_fmt(m[f"accuracy.{c}.s{s}"]) for s in plan.severities]
        row += [_fmt(m[f"accuracy_drop.{c}"]), f"{_fmt(lo)} to {_fmt(hi)}"]
        if has_ref:
            row += [_fmt(m[f"ce.{c}"]), _fmt(m[f"relative_ce.{c}"])]
        rows.append(row)
    note = (f"{n} images, modality {modality} (from {source}); clean accuracy {m['clean_accuracy']:.3f}. The accuracy "
            "drop is clean accuracy minus the mean accuracy over the severities, with a paired bootstrap interval. "
            "CE is the corruption error summed over severities relative to the reference model's (100% = as robust as "
            "the reference); relative CE does the same for the error added to clean error.")
    return Table("Accuracy per corruption and severity", columns, rows, note=note)


def heat_map(numbers, plan):
    from mcaudit.reports import plots

    grid = np.array([[numbers.metrics[f"accuracy.{c}.s{s}"] for c in plan.corruptions] for s in plan.severities])
    fig, ax = plots.new_figure(max(4.0, 0.7 * len(plan.corruptions) + 1.5), 0.45 * len(plan.severities) + 1.8)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(plan.corruptions)), [plots.short_label(c, 16) for c in plan.corruptions], rotation=40, ha="right")
    ax.set_yticks(range(len(plan.severities)), [f"severity {s}" for s in plan.severities])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if grid[i, j] > 0.6 else "white")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return plots.to_figure(fig, "Accuracy by corruption and severity",
                           f"Clean accuracy is {numbers.metrics['clean_accuracy']:.2f}; darker cells lose more.")


def accuracy_curves(numbers, plan):
    from mcaudit.reports import plots

    families = list(dict.fromkeys(CORRUPTIONS[c].family for c in plan.corruptions))
    fig, axes = plots.plt.subplots(1, len(families), figsize=(3.2 * len(families), 3.0), dpi=110, squeeze=False,
                                   sharey=True)
    xs = [0] + list(plan.severities)
    for ax, family in zip(axes[0], families):
        for c in plan.corruptions:
            if CORRUPTIONS[c].family == family:
                ys = [numbers.metrics["clean_accuracy"]] + [numbers.metrics[f"accuracy.{c}.s{s}"] for s in plan.severities]
                ax.plot(xs, ys, marker="o", label=plots.short_label(c, 18))
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy")
    return plots.to_figure(fig, "Accuracy against severity, per family",
                           "Each line is one corruption; severity 0 is the clean image.")


def mosaic(images: dict, corruptions: list[str], severities: list[int], gap: int = 2) -> np.ndarray:
    """The images tiled in one array, a row per corruption and a column per severity, on white."""
    h, w = next(iter(images.values())).shape[:2]
    grid = np.ones((len(corruptions) * (h + gap) - gap, len(severities) * (w + gap) - gap, 3))
    for i, c in enumerate(corruptions):
        for j, s in enumerate(severities):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = np.clip(images[(c, s)], 0, 1)
    return grid


def examples(images: dict, plan, source: str):
    from mcaudit.reports import plots

    # one axes holding a mosaic, not an axes per image: matplotlib's cost is per axes, and a
    # gallery of 9 corruptions x 6 severities cost more than the statistics behind the check
    severities = sorted({s for _, s in images})
    h, w = next(iter(images.values())).shape[:2]
    tile = min(1.1, max(0.7, w / plots.DPI))  # inches: no larger than the image's own pixels need
    fig, ax = plots.new_figure(tile * len(severities) + 1.6, tile * len(plan.corruptions) + 0.6)
    ax.imshow(mosaic(images, plan.corruptions, severities), interpolation="nearest")
    ax.set_xticks([j * (w + 2) + w / 2 for j in range(len(severities))], [f"s{s}" if s else "clean" for s in severities])
    ax.set_yticks([i * (h + 2) + h / 2 for i in range(len(plan.corruptions))],
                  [plots.short_label(c, 14) for c in plan.corruptions])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return plots.to_figure(fig, "One image under every corruption and severity", f"The image is {source}.")


def summary(numbers, plan, worst: str, n: int, modality: str) -> str:
    m, ci = numbers.metrics, numbers.intervals
    top = max(plan.severities)
    drop_ci = ci.get(f"accuracy_drop.{worst}")
    text = (f"Acquisition shift ({modality}: {len(plan.corruptions)} corruptions at severities "
            f"{', '.join(map(str, plan.severities))}) on {n} images: clean accuracy {m['clean_accuracy']:.1%}; "
            f"the worst corruption is {worst}, where accuracy falls to {m[f'accuracy.{worst}.s{top}']:.1%} at severity "
            f"{top} (mean drop {m[f'accuracy_drop.{worst}']:.1%}"
            + (f", 95% CI {drop_ci[0]:.1%} to {drop_ci[1]:.1%}" if drop_ci else "") + ")")
    if "mce" in m:
        text += f"; mCE against the reference model {m['mce']:.1%}"
    return text + "."
