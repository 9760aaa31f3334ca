"""Matplotlib figures as PNG bytes for the report (headless backend, one shared style).

Every check draws through this module, so the style lives here: the Okabe-Ito palette, which
stays distinguishable to colour-blind readers, paired with line styles as a second cue; no
text under MIN_FONT_PT (10 pt at 110 dpi is 15 px at natural size, still 10 px when a wide grid
is shrunk to a 1400 px page); and figures saved with their whole legend (bbox "tight"), so
nothing is clipped.
"""

from __future__ import annotations

import contextlib
import io

import matplotlib
import matplotlib.text

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cycler import cycler  # noqa: E402

from mcaudit.check_api import Figure  # noqa: E402

# Okabe & Ito (2008), "Color universal design": blue, vermillion, bluish green, orange,
# reddish purple, sky blue, black, yellow; yellow last, as it is faint on white.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
LINE_STYLES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2))]
MIN_FONT_PT = 10.0
DPI = 110
STYLE = {
    "axes.prop_cycle": cycler(color=OKABE_ITO) + cycler(linestyle=LINE_STYLES),
    "font.size": 10.5,
    "axes.titlesize": 11,
    "axes.labelsize": 10.5,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "legend.title_fontsize": MIN_FONT_PT,
    "figure.titlesize": 12,
    "image.cmap": "cividis",
    "savefig.dpi": DPI,
}
matplotlib.rcParams.update(STYLE)


def legible(fig) -> None:
    """Raise every text of ``fig`` to at least MIN_FONT_PT, whatever size its check asked for."""
    for text in fig.findobj(matplotlib.text.Text):
        if text.get_fontsize() < MIN_FONT_PT:
            text.set_fontsize(MIN_FONT_PT)


def short_label(text: str, width: int = 24) -> str:
    """``text`` cut to ``width`` characters with an ellipsis, for axis and legend labels."""
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def to_hwc(image) -> np.ndarray:
    """A C x H x W image (torch tensor or numpy array, 1 or 3 channels) as H x W x 3 numpy
    floats in [0, 1], which is what ``imshow`` and the image grids take."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.clip(arr, 0.0, 1.0)


def roc_figure(curves, title: str, caption: str = "", xlabel: str = "false positive rate",
               ylabel: str = "true positive rate", legend_title: str = "(AUROC)", tpr_line: float | None = None) -> Figure:
    """ROC curves, one per ``(label, positive, scores)``: each labelled with its AUROC, the
    chance diagonal dotted, and optionally a dashed line at ``tpr_line``."""
    from mcaudit.metrics import auroc_binary, roc_points

    fig, ax = new_figure(5.2, 4.0)
    for label, positive, scores in curves:
        fpr, tpr, _ = roc_points(positive, scores)
        ax.plot(fpr, tpr, label=f"{short_label(label)} ({auroc_binary(positive, scores):.3f})", lw=1.4)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    if tpr_line is not None:
        ax.axhline(tpr_line, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", title=legend_title)
    return to_figure(fig, title, caption)


def new_figure(width: float = 5.0, height: float = 3.6):
    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI)
    return fig, ax


def to_figure(fig, title: str, caption: str = "") -> Figure:
    buf = io.BytesIO()
    try:
        with literal_text(fig):
            legible(fig)
            fig.tight_layout()
            legible(fig)  # tight_layout draws, which makes the tick labels
            fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.08, metadata={"Software": None})
    finally:
        plt.close(fig)
    return Figure(title=title, png=buf.getvalue(), caption=caption)


@contextlib.contextmanager
def literal_text(fig):
    """Draw every text of ``fig`` as written, without matplotlib's mathtext.

    Labels, titles, legends and ticks carry class names, subgroup values and prompts from the
    user's data; a value such as ``$x^{$`` would otherwise be parsed as TeX and fail the whole
    figure (and its check). No mcaudit figure uses mathtext on purpose. Tick labels are made
    while drawing, so the setting also applies until the figure is saved.
    """
    with matplotlib.rc_context({"text.parse_math": False}):
        for text in fig.findobj(matplotlib.text.Text):
            text.set_parse_math(False)
        yield


def confusion_figure(cm: np.ndarray, classes: list[str], title: str = "Confusion matrix") -> Figure:
    n = len(classes)
    size = min(9.0, 2.5 + 0.5 * n)
    fig, ax = new_figure(size, size * 0.85)
    row_sums = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, np.maximum(row_sums, 1))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    short = [c if len(c) <= 18 else c[:16] + "…" for c in classes]
    ax.set_xticks(range(n), short, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), short)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black", fontsize=9)
    return to_figure(fig, title, "counts; colour is the share of the true class (row)")


def image_grid(images: list[np.ndarray], titles: list[str], cols: int = 4, cell: float = 1.8, cmap=None) -> "plt.Figure":
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * (cell + 0.35)), dpi=DPI, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img, cmap=cmap, vmin=None if cmap is None else 0, vmax=None if cmap is None else 1)
        ax.set_title(title, fontsize=MIN_FONT_PT)
    return fig


THUMB_PX = 112


def thumbnail(image, px: int = THUMB_PX, quality: int = 82) -> bytes:
    """A small JPEG of ``image`` (anything ``to_hwc`` takes), at most ``px`` on its longer
    side: a drill-down picture for :class:`mcaudit.GalleryItem` (a few kB, so a gallery
    barely adds to the report's size)."""
    from PIL import Image

    arr = (to_hwc(image) * 255 + 0.5).astype(np.uint8)
    picture = Image.fromarray(arr)
    picture.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def heat_overlay(image, heat, alpha: float = 0.55, cmap: str = "inferno") -> np.ndarray:
    """``image`` in grey with the positive part of ``heat`` (H x W) over it in ``cmap``,
    scaled to its 99.5th percentile so one hot pixel does not wash out the rest; H x W x 3."""
    grey = to_hwc(image).mean(axis=2, keepdims=True)
    if hasattr(heat, "detach"):
        heat = heat.detach().float().cpu().numpy()
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0, None)
    top = float(np.quantile(heat, 0.995)) if heat.max() > 0 else 1.0
    colours = matplotlib.colormaps[cmap](np.clip(heat / max(top, 1e-12), 0, 1))[..., :3]
    return np.clip((1 - alpha) * grey + alpha * colours, 0.0, 1.0).astype(np.float32)


def amplified(delta) -> np.ndarray:
    """A perturbation made visible: stretched so its largest change is full scale, mid-grey
    where nothing changed; H x W x 3."""
    if hasattr(delta, "detach"):
        delta = delta.detach().float().cpu().numpy()
    delta = np.asarray(delta, dtype=np.float32)
    return to_hwc(0.5 + delta / (2 * max(float(np.abs(delta).max()), 1e-12)))
