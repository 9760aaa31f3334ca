"""Noise and intensity corruptions: Gaussian, Poisson (quantum) and speckle noise, brightness
(ultrasound gain), contrast, gamma and saturation.

Every corruption takes a batch ``x`` (B x 3 x H x W in [0, 1], on the run's device), its
strength at one severity, one numpy generator per image and whether each image is grey, and
returns the corrupted batch in [0, 1]. A grey image gets one noise field for all three
channels, so it stays grey. Definitions follow MedMNIST-C (Di Salvo et al., 2024), whose
reference implementations work on 8-bit PIL images; these work on floats, batched.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def per_image_field(x: torch.Tensor, rngs: Sequence[np.random.Generator], grey: Sequence[bool],
                    draw: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]) -> torch.Tensor:
    """A B x 3 x H x W field drawn image by image, so an image's draws do not depend on the
    batch it came in; a grey image's single field is repeated over the channels."""
    _, c, h, w = x.shape
    fields = []
    for rng, is_grey in zip(rngs, grey):
        field = np.asarray(draw(rng, (1 if is_grey else c, h, w)), dtype=np.float32)
        fields.append(np.broadcast_to(field, (c, h, w)))
    return torch.from_numpy(np.stack(fields)).to(device=x.device, dtype=x.dtype)


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape)


def gaussian_noise(x, sigma, rngs, grey):
    """Additive white noise of standard deviation ``sigma`` (electronic noise)."""
    return (x + sigma * per_image_field(x, rngs, grey, _normal)).clamp(0, 1)


def speckle_noise(x, sigma, rngs, grey):
    """Multiplicative noise ``x + x * n`` (ultrasound speckle, OCT)."""
    return (x + x * sigma * per_image_field(x, rngs, grey, _normal)).clamp(0, 1)


def shot_noise(x, photons, rngs, grey):
    """Poisson (quantum) noise: ``photons`` quanta at full intensity, as a lower dose gives."""
    out = torch.empty_like(x)
    host = x.detach().float().cpu().numpy()
    for i, (rng, is_grey) in enumerate(zip(rngs, grey)):
        lam = host[i, :1] if is_grey else host[i]
        noisy = rng.poisson(np.clip(lam, 0, None) * photons) / photons
        out[i] = torch.from_numpy(np.broadcast_to(noisy, host[i].shape).astype(np.float32)).to(x.device, x.dtype)
    return out.clamp(0, 1)


def brightness(x, factor, rngs=None, grey=None):
    """Every intensity times ``factor`` (PIL's ImageEnhance.Brightness; ultrasound gain)."""
    return (x * factor).clamp(0, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2, what PIL's convert("L") uses
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def contrast(x, factor, rngs=None, grey=None):
    """Intensities pulled towards (factor < 1) or pushed from (> 1) the image's mean grey
    level, rounded to 8 bits as PIL's ImageEnhance.Contrast rounds it."""
    mean = torch.floor(_luma(x).mean(dim=(1, 2)) * 255 + 0.5) / 255
    mean = mean.view(-1, 1, 1, 1)
    return (mean + factor * (x - mean)).clamp(0, 1)


def gamma(x, g, rngs=None, grey=None):
    """Intensities raised to the power ``g`` (a different display or detector curve)."""
    return x.clamp(0, 1) ** g


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    top, _ = x.max(dim=1)
    bottom, _ = x.min(dim=1)
    span = top - bottom
    safe = torch.where(span > 0, span, torch.ones_like(span))
    hue = torch.where(top == r, ((g - b) / safe) % 6,
                      torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(span > 0, hue, torch.zeros_like(hue))
    sat = torch.where(top > 0, span / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
    return torch.stack([hue, sat, top], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    weight = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * weight


def saturate(x, amount, rngs=None, grey=None):
    """Saturation raised by ``amount`` in HSV space (a different camera or stain intensity)."""
    hsv = rgb_to_hsv(x.clamp(0, 1))
    hsv = torch.stack([hsv[:, 0], (hsv[:, 1] + amount).clamp(0, 1), hsv[:, 2]], dim=1)
    return hsv_to_rgb(hsv).clamp(0, 1)
