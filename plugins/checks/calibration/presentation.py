"""What the calibration check shows: tables, the reliability diagram, the confidence histogram,
the temperature-scaling comparison and the one-paragraph summary."""

from __future__ import annotations

import numpy as np

from mcaudit import Table
from mcaudit.metrics import calibration_bins, equal_width_edges, expected_calibration_error, top_label

from .statistics import INTERVAL_NOTE, debiased_ece_rows
from .temperature import TemperatureScaling

BRIEF = ("ece", "ece_plugin", "ece_equal_mass", "mce", "classwise_ece", "brier", "nll", "confidence", "accuracy")


def calibration_tables(metrics, intervals, meaning: dict[str, str], classes, probs, labels, n_bins: int,
                       scaling: TemperatureScaling | None) -> list[Table]:
    """The brief (``meaning`` explains each measure), the reliability bins, per class, temperature scaling."""
    conf, correct = top_label(probs, labels)
    tables = [
        Table(
            "Calibration in brief",
            ["measure", "value", "95% interval", "what it means"],
            [[k, float(metrics[k]), _interval_text(intervals.get(k)), meaning[k]] for k in BRIEF],
            note=f"{len(labels)} images. " + INTERVAL_NOTE,
        ),
        reliability_table(conf, correct, equal_width_edges(n_bins)),
        per_class_table(classes, probs, labels, n_bins),
    ]
    if scaling is not None:
        tables.append(temperature_table(scaling))
    return tables


def calibration_figures(probs, labels, n_bins: int, scaling: TemperatureScaling | None) -> list:
    from mcaudit.reports.plots import to_figure

    conf, correct = top_label(probs, labels)
    edges = equal_width_edges(n_bins)
    figures = [
        to_figure(reliability_figure(conf, correct, edges, "All images"), "Reliability diagram",
                  "bars: accuracy per confidence bin (empty bins have no bar); dashed line: perfect calibration; numbers: images per bin"),
        to_figure(confidence_histogram(conf, correct, edges), "Confidence histogram",
                  "how often the model is how sure; stacked by right and wrong predictions; lines: mean confidence and accuracy"),
    ]
    if scaling is not None:
        figures.append(to_figure(temperature_figure(scaling, edges), "Temperature scaling on held-out images",
                                 f"left: raw probabilities; right: logits divided by T = {scaling.temperature:.3g} (fitted on the other images)"))
    return figures


def reliability_table(conf, correct, edges) -> Table:
    counts, mean_conf, acc = calibration_bins(conf, correct, edges)
    rows = []
    for lo, hi, n, c, a in zip(edges[:-1], edges[1:], counts, mean_conf, acc):
        label = f"{lo:.2f} to {hi:.2f}"
        rows.append([label, int(n), float(c), float(a), float(a - c)])
    return Table(
        "Reliability by confidence bin", ["confidence bin", "images", "mean confidence", "accuracy", "accuracy - confidence"], rows,
        note="Negative differences: the model is more sure than it is right (overconfident). Empty bins show n/a.",
    )


def per_class_table(classes, probs, labels, n_bins) -> Table:
    edges = equal_width_edges(n_bins)
    rows = []
    for k, name in enumerate(classes):
        is_k = labels == k
        rows.append([name, int(is_k.sum()), float(probs[:, k].mean()), float(is_k.mean()),
                     float(debiased_ece_rows(probs[:, k], is_k, edges)[0])])
    return Table(
        "Per class", ["class", "images", "mean predicted probability", "observed frequency", "class ECE"], rows,
        note="A well-calibrated model predicts each class, on average, as often as it occurs; class ECE bins p(class) "
             "and is debiased as ece is.",
    )


def temperature_table(s: TemperatureScaling) -> Table:
    t, before, after = s.temperature, s.before, s.after
    return Table(
        f"Temperature scaling (T = {t:.3g}, fitted on {s.n_fit} images, judged on {s.n_heldout} others)",
        ["probabilities", "ECE", "NLL", "Brier", "mean confidence", "accuracy"],
        [["raw (T = 1)", float(before["ece"]), float(before["nll"]), float(before["brier"]), float(before["confidence"]), s.accuracy],
         [f"scaled (T = {t:.3g})", float(after["ece"]), float(after["nll"]), float(after["brier"]), float(after["confidence"]), s.accuracy]],
        note="Dividing the logits by T never changes which class is predicted, so accuracy is the same; "
             "T > 1 means the raw probabilities were overconfident, T < 1 underconfident.",
    )


def temperature_figure(s: TemperatureScaling, edges):
    from mcaudit.reports.plots import plt  # the headless matplotlib the report uses

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8), dpi=110, sharey=True)
    for ax, p, title in ((axes[0], s.p_raw, "raw"), (axes[1], s.p_scaled, f"T = {s.temperature:.3g}")):
        c, ok = top_label(p, s.labels)
        draw_reliability(ax, c, ok, edges, f"{title}: plain ECE {expected_calibration_error(c, ok, edges):.3f}")
    return fig


def draw_reliability(ax, conf, correct, edges, title):
    counts, mean_conf, acc = calibration_bins(conf, correct, edges)
    widths = np.diff(edges)
    full = counts > 0
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.bar(edges[:-1][full], acc[full], width=widths[full], align="edge", color="#0072B2", edgecolor="white", label="accuracy")
    ax.bar(edges[:-1][full], (mean_conf - acc)[full], bottom=acc[full], width=widths[full], align="edge",
           color="none", edgecolor="#D55E00", hatch="//", lw=0.6, label="gap to confidence")
    for lo, w, n in zip(edges[:-1], widths, counts):
        ax.text(lo + w / 2, 1.02, f"{int(n)}", ha="center", va="bottom", fontsize=6, rotation=90,
                color="black" if n else "#aaaaaa")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=7, frameon=False, bbox_to_anchor=(0, 0.93))


def reliability_figure(conf, correct, edges, title):
    from mcaudit.reports.plots import new_figure

    fig, ax = new_figure(5.2, 4.0)
    ece = expected_calibration_error(conf, correct, edges)
    draw_reliability(ax, conf, correct, edges, f"{title}: plain ECE {ece:.3f}")
    return fig


def confidence_histogram(conf, correct, edges):
    from mcaudit.reports.plots import new_figure

    fig, ax = new_figure(5.2, 3.6)
    right = correct.astype(bool)
    _, _, bars = ax.hist([conf[right], conf[~right]], bins=edges, stacked=True, color=["#0072B2", "#D55E00"],
                         label=["right", "wrong"])
    for patch in bars[1]:
        patch.set_hatch("//")  # wrong: hatched as well as vermillion, for readers who cannot tell the colours apart
    ax.axvline(conf.mean(), color="black", lw=1.2, label=f"mean confidence {conf.mean():.1%}")
    ax.axvline(correct.mean(), color="black", lw=1.2, ls=":", label=f"accuracy {correct.mean():.1%}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("images")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    return fig


def summarise(metrics, intervals) -> str:
    """Numbers only: whether ECE meets a threshold is the host's verdict, not the summary's."""
    ece, gap = metrics["ece"], metrics["overconfidence"]
    ci = intervals.get("ece")
    ci_text = f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else " (no interval)"
    lean = "higher than" if gap > 0 else "lower than" if gap < 0 else "equal to"
    text = (f"Debiased ECE {ece:.3f}{ci_text}, plain binned ECE {metrics['ece_plugin']:.3f}; mean confidence "
            f"{metrics['confidence']:.1%} is {lean} accuracy {metrics['accuracy']:.1%}.")
    if "temperature" in metrics:
        text += (f" Temperature scaling (T = {metrics['temperature']:.2f}, fitted on other images) changes held-out "
                 f"ECE from {metrics['ece_before_scaling']:.3f} to {metrics['ece_after_scaling']:.3f}.")
    return text


def _interval_text(iv) -> str:
    return f"{iv[0]:.3f} to {iv[1]:.3f}" if iv else "n/a"
