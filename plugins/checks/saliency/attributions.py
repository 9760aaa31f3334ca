"""Attribution maps from captum: one (H, W) relevance map per image, batched on the device."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mcaudit import ZeroShotClassifier
from mcaudit.batching import in_batches

from .tower import ImageTower

METHOD_LABELS = {
    "integrated_gradients": "Integrated Gradients",
    "saliency": "Saliency (gradient)",
    "input_x_gradient": "Input x Gradient",
    "gradient_shap": "GradientSHAP",
    "occlusion": "Occlusion",
    "grad_cam": "Grad-CAM",
}


@dataclass(frozen=True)
class AttributionSettings:
    batch_size: int  # images per attribution call
    internal_batch_size: int  # model evaluations per pass inside path and perturbation methods
    ig_steps: int
    shap_samples: int
    occlusion_window: int  # pixels
    occlusion_stride: int
    seed: int


@contextlib.contextmanager
def seeded_global_rngs(seed: int, device: torch.device) -> Iterator[None]:
    """Captum draws GradientSHAP's baselines and path points from numpy's and torch's global
    generators; seeding both, and restoring them afterwards, makes maps reproducible without
    disturbing whoever else uses those generators."""
    np_state = np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(np_state)


def attribution_maps(
    method: str,
    classifier: ZeroShotClassifier,
    tower: ImageTower,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    settings: AttributionSettings,
    autocast=contextlib.nullcontext,
    rows: np.ndarray | None = None,
) -> torch.Tensor:
    """(N, H, W) float32 maps on the CPU; larger means more evidence for the target.

    Signed methods keep their sign (summed over colour channels), so deletion removes the
    strongest positive evidence first; Saliency is the largest absolute gradient over channels,
    as Simonyan et al. define it; Grad-CAM is rectified and upsampled bilinearly.

    ``rows`` names the images (their rows in the forward pass; positions 0..N-1 when None).
    GradientSHAP draws random baselines and path points, seeded by the row, so an image's map
    does not depend on which other images it was explained with (under torchrun, on which
    process); the other methods are deterministic.
    """
    if len(pixels) == 0:  # a torchrun process whose share of the images is empty
        return torch.zeros((0, *pixels.shape[-2:]), dtype=torch.float32)
    if method == "gradient_shap":
        # Captum draws GradientSHAP's samples for a whole call at once, so one image per call
        # is what makes the draws per image; each call still evaluates shap_samples copies.
        ids = np.arange(len(pixels)) if rows is None else np.asarray(rows)
        out = []
        for i, row in enumerate(ids):
            with seeded_global_rngs(settings.seed + int(row), pixels.device), autocast():
                maps = _one_batch(method, classifier, tower, pixels[i : i + 1], targets[i : i + 1], settings)
            out.append(maps.detach().float().cpu())
        return torch.cat(out)

    def batch(part: slice) -> torch.Tensor:
        with seeded_global_rngs(settings.seed + part.start, pixels.device), autocast():
            maps = _one_batch(method, classifier, tower, pixels[part], targets[part], settings)
        return maps.detach().float().cpu()

    return in_batches(batch, len(pixels), settings.batch_size)


def _one_batch(method, classifier, tower, x, t, s: AttributionSettings) -> torch.Tensor:
    from captum.attr import (
        GradientShap,
        InputXGradient,
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        Occlusion,
        Saliency,
    )

    x = x.detach().clone().requires_grad_(True)
    if method == "integrated_gradients":
        a = IntegratedGradients(classifier).attribute(
            x, baselines=torch.zeros_like(x), target=t, n_steps=s.ig_steps,
            internal_batch_size=max(len(x), s.internal_batch_size),
        )
        return a.sum(dim=1)
    if method == "saliency":
        return Saliency(classifier).attribute(x, target=t, abs=True).amax(dim=1)
    if method == "input_x_gradient":
        return InputXGradient(classifier).attribute(x, target=t).sum(dim=1)
    if method == "gradient_shap":
        # The reference distribution: a black and a mid-grey image, the same for every batch.
        refs = torch.stack([torch.zeros_like(x[0]), torch.full_like(x[0], 0.5)])
        a = GradientShap(classifier).attribute(x, baselines=refs, target=t, n_samples=s.shap_samples, stdevs=0.0)
        return a.sum(dim=1)
    if method == "occlusion":
        w, st = s.occlusion_window, s.occlusion_stride
        per_eval = max(1, s.internal_batch_size // len(x))
        a = Occlusion(classifier).attribute(
            x.detach(), sliding_window_shapes=(x.shape[1], w, w), strides=(x.shape[1], st, st),
            baselines=0.0, target=t, perturbations_per_eval=per_eval,
        )
        return a.sum(dim=1)
    if method == "grad_cam":
        if not tower.has_grad_cam:
            raise ValueError("no Grad-CAM layer for this image tower")
        with tower.grad_cam_tap():
            cam = LayerGradCam(classifier, tower.cam_layer).attribute(x, target=t, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.float(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return cam[:, 0]
    raise ValueError(f"unknown attribution method {method!r}")
