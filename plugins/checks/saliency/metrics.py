"""Faithfulness, sanity and localisation measures of attribution maps.

Deletion and insertion curves follow Petsiuk et al. (RISE, 2018): pixels are replaced by a
baseline (deletion) or revealed on top of it (insertion) in order of relevance, and the target
score is read after every step. After step ``k`` of ``S`` the ``(k * H * W) // S`` most
relevant pixels are changed, all colour channels at once; the area under a curve is the
trapezoid rule over the fraction of pixels changed. A faithful map has a low deletion area and
a high insertion area.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

BASELINES = ("blur", "mean", "black")


# -- baselines and pixel order ------------------------------------------------------------
def baseline_images(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """What a removed pixel becomes: a heavy blur of the image, its mean colour, or black."""
    if kind == "black":
        return torch.zeros_like(pixels)
    if kind == "mean":
        return pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels).clone()
    if kind == "blur":
        # A blur wide enough to erase lesion-sized detail (sigma 1/20 of the image side) while
        # keeping the overall brightness, so the deleted image stays in the data's range.
        sigma = max(1.0, max(pixels.shape[-2:]) / 20.0)
        kernel = min(2 * int(np.ceil(3 * sigma)) + 1, 2 * (min(pixels.shape[-2:]) // 2) - 1)
        return TF.gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])
    raise ValueError(f"unknown baseline {kind!r}")


def pixel_ranks(
    maps: torch.Tensor, generator: torch.Generator, positions: np.ndarray | None = None, total: int | None = None,
) -> torch.Tensor:
    """(N, H*W) rank of every pixel, 0 for the most relevant; ties are broken at random.

    Rectified maps (Grad-CAM) have large flat regions; a fixed tie order (say, raster order)
    would make the curve depend on where the image's top-left corner is.

    Under torchrun a process holds only its share of the images: ``positions`` says where each
    of ``maps`` sits among ``total`` images. The generator still draws one shuffle for every one
    of the ``total`` images, in order, so an image's tie order is the same however the images
    are split across processes.
    """
    n, hw = maps.shape[0], int(np.prod(maps.shape[1:]))
    slots = _slots(n, positions, total)
    ranks = torch.empty((n, hw), dtype=torch.long)
    for p in range(len(slots)):
        shuffle = torch.randperm(hw, generator=generator)
        i = slots[p]
        if i < 0:
            continue
        values = maps[i].reshape(-1).float().cpu()[shuffle]
        order = shuffle[torch.argsort(values, descending=True, stable=True)]
        ranks[i, order] = torch.arange(hw)
    return ranks


def random_ranks(n: int, hw: int, generator: torch.Generator, positions: np.ndarray | None = None) -> torch.Tensor:
    """The ranks a random attribution gives: a uniform random pixel order per image.

    The generator draws an order for each of the ``n`` images; only those at ``positions``
    (all when None) are returned, so a process holding some of the images gets the same
    orders for them as a single process would.
    """
    slots = _slots(n if positions is None else len(positions), positions, n)
    ranks = torch.empty((int((slots >= 0).sum()), hw), dtype=torch.long)
    for p in range(n):
        order = torch.argsort(torch.randperm(hw, generator=generator))
        if slots[p] >= 0:
            ranks[slots[p]] = order
    return ranks


def _slots(n: int, positions: np.ndarray | None, total: int | None) -> np.ndarray:
    """For each of ``total`` images, the index among the ``n`` held ones (-1: held elsewhere)."""
    if positions is None:
        return np.arange(n)
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) != n or total is None or (n and (positions.min() < 0 or positions.max() >= total)):
        raise ValueError("positions must give one place in 0..total-1 for each map")
    slots = np.full(total, -1, dtype=np.int64)
    slots[positions] = np.arange(n)
    return slots


def changed_counts(n_pixels: int, steps: int) -> list[int]:
    return [(k * n_pixels) // steps for k in range(steps + 1)]


# -- curves ---------------------------------------------------------------------------------
def perturbation_curves(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    baselines: torch.Tensor,
    ranks: torch.Tensor,
    steps: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves, each (M, N, steps + 1), for M pixel orders of N images.

    ``ranks`` is (M, N, H*W). ``score(images, image_index)`` returns the target score of each
    perturbed image. The (image, order, curve, step) states are laid out image by image and
    scored ``batch_size`` at a time, so every step of an image shares the fewest forward passes
    that fit in memory, and nothing larger than one batch is ever built.
    """
    m, n, hw = ranks.shape
    device = pixels.device
    counts = torch.tensor(changed_counts(hw, steps), device=device)
    # Per image: the untouched image and the full baseline (the ends of every curve, shared by
    # all orders), then each order's inner steps of both curves. A state is (order o, curve c
    # (0 deletion, 1 insertion), step k); (0, 0, 0) is the image and (0, 1, 0) the baseline.
    inner = torch.arange(1, steps)
    o_in, c_in, k_in = (t.reshape(-1) for t in torch.meshgrid(torch.arange(m), torch.arange(2), inner, indexing="ij"))
    per_image = len(o_in) + 2
    o_idx = torch.cat([torch.zeros(2, dtype=torch.long), o_in]).repeat(n).to(device)
    c_idx = torch.cat([torch.tensor([0, 1]), c_in]).repeat(n).to(device)
    k_idx = torch.cat([torch.zeros(2, dtype=torch.long), k_in]).repeat(n).to(device)
    i_idx = torch.arange(n).repeat_interleave(per_image).to(device)
    ranks = ranks.to(device)
    shape = pixels.shape[-2:]
    scores = torch.empty(len(i_idx), dtype=torch.float64)
    for start in range(0, len(i_idx), batch_size):
        sl = slice(start, start + batch_size)
        i, o, c, k = i_idx[sl], o_idx[sl], c_idx[sl], k_idx[sl]
        changed = (ranks[o, i] < counts[k][:, None]).reshape(-1, 1, *shape)
        # deletion: changed pixels show the baseline; insertion: changed pixels show the image
        show_base = changed ^ (c == 1).view(-1, 1, 1, 1)
        states = torch.where(show_base, baselines[i], pixels[i])
        with torch.no_grad():
            scores[sl] = score(states, i).double().cpu()
    scores = scores.view(n, per_image).numpy()
    deletion = np.empty((m, n, steps + 1))
    insertion = np.empty((m, n, steps + 1))
    image, baseline = scores[:, 0], scores[:, 1]
    deletion[:, :, 0] = insertion[:, :, steps] = image
    deletion[:, :, steps] = insertion[:, :, 0] = baseline
    if steps > 1:
        both = scores[:, 2:].reshape(n, m, 2, steps - 1).transpose(1, 0, 2, 3)
        deletion[:, :, 1:steps] = both[:, :, 0]
        insertion[:, :, 1:steps] = both[:, :, 1]
    return deletion, insertion


def curve_area(curves: np.ndarray) -> np.ndarray:
    """Trapezoid area under curves sampled at evenly spaced fractions 0..1 (last axis)."""
    steps = curves.shape[-1] - 1
    return (curves[..., :-1] + curves[..., 1:]).sum(axis=-1) / (2.0 * steps)


# -- sanity: how much a map changes when the model is randomised ------------------------------
def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, 1-based, ties sharing their mean rank (as Spearman needs)."""
    flat = values.reshape(-1, values.shape[-1])
    out = np.empty(flat.shape, dtype=np.float64)
    for row, x in enumerate(flat):
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        out[row] = ((ends - counts + 1 + ends) / 2.0)[inverse]
    return out.reshape(values.shape)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Spearman correlation per image between the absolute values of two (N, H, W) map sets.

    Absolute values, as in Adebayo et al. (2018): a map whose sign flips but whose shape
    survives randomisation still fails the test. NaN where a map is constant.
    """
    x = average_ranks(a.abs().flatten(1).double().numpy())
    y = average_ranks(b.abs().flatten(1).double().numpy())
    x -= x.mean(axis=1, keepdims=True)
    y -= y.mean(axis=1, keepdims=True)
    denom = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (x * y).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


def normalised_abs(maps: torch.Tensor) -> torch.Tensor:
    """Absolute maps scaled to [0, 1] per image (all-zero maps stay zero)."""
    a = maps.abs().float()
    peak = a.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return a / peak


def structural_similarity(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, size: int = 11) -> np.ndarray:
    """Mean SSIM (Wang et al., 2004) per image of two (N, H, W) map sets, each in [0, 1].

    Gaussian window (11 x 11, sigma 1.5), data range 1, borders reflected so that every pixel
    counts once, averaged over the image (torchmetrics' convention).
    """
    size = min(size, 2 * (min(a.shape[-2:]) // 2) - 1)
    pad = (size - 1) // 2
    a = F.pad(a.double().unsqueeze(1), (pad, pad, pad, pad), mode="reflect")
    b = F.pad(b.double().unsqueeze(1), (pad, pad, pad, pad), mode="reflect")
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).view(1, 1, size, size)

    # the five local statistics in one convolution
    stats = F.conv2d(torch.cat([a, b, a * a, b * b, a * b], dim=1).flatten(0, 1).unsqueeze(1), window)
    mu_a, mu_b, aa, bb, ab = stats.view(len(a), 5, *stats.shape[-2:]).unbind(dim=1)
    var_a = aa - mu_a**2
    var_b = bb - mu_b**2
    cov = ab - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim.flatten(1).mean(dim=1).numpy()


# -- localisation against a region mask ------------------------------------------------------
def pointing_hits(maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """1 where the map's maximum falls inside the mask (Zhang et al., 2018), else 0."""
    flat = maps.flatten(1)
    peak = flat.argmax(dim=1)
    return masks.flatten(1)[torch.arange(len(flat)), peak].double().numpy()


def mass_inside(maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Share of the positive attribution that lies inside the mask (NaN for an all-negative map)."""
    pos = maps.clamp_min(0).flatten(1).double()
    total = pos.sum(dim=1)
    inside = (pos * masks.flatten(1).double()).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.nan).numpy()


def top_fraction_iou(maps: torch.Tensor, masks: torch.Tensor, percent: float) -> np.ndarray:
    """IoU between the mask and the map's top ``percent`` % of pixels."""
    flat = maps.flatten(1).double()
    m = masks.flatten(1)
    k = max(1, int(round(flat.shape[1] * percent / 100.0)))
    top = torch.zeros_like(m)
    top.scatter_(1, torch.topk(flat, k, dim=1).indices, True)
    inter = (top & m).sum(dim=1).double()
    union = (top | m).sum(dim=1).double()
    return (inter / union.clamp_min(1)).numpy()
