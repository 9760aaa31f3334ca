"""Artefacts of dermoscopy and pathology acquisition: bubbles under the slide or contact
plate, the black corners of a dermatoscope's round field, ink characters on the slide or
skin, and a shift of the haematoxylin-eosin stain (another lab's protocol or scanner).

Bubble, black corner and characters follow MedMNIST-C's definitions (random draws per image
from its own generator); the stain shift is the HED colour augmentation of Tellez et al.
(2018) on Ruifrok and Johnston's (2001) stain vectors.
"""

from __future__ import annotations

import string

import numpy as np
import torch

from .spatial import REFERENCE_SIZE

# Ruifrok and Johnston's optical densities of haematoxylin, eosin and DAB (rows: stains).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_FLOOR = float(np.log(1e-6))


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W RGB in [0, 1] to stain concentrations (B x 3 x H x W, >= 0)."""
    od = torch.log(x.clamp_min(1e-6)) / _LOG_FLOOR
    m = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
    return torch.einsum("bchw,cd->bdhw", od, m).clamp_min(0)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(RGB_FROM_HED, dtype=hed.dtype, device=hed.device)
    log_rgb = torch.einsum("bchw,cd->bdhw", hed * _LOG_FLOOR, m)
    return torch.exp(log_rgb).clamp(0, 1)


def stain_shift(x, sigma, rngs, grey=None):
    """Each stain's concentration scaled by U(1 - sigma, 1 + sigma) and shifted by
    U(-sigma, sigma), per image (Tellez et al. 2018: sigma 0.05 "light", 0.2 "strong")."""
    draws = np.stack([np.stack([rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-sigma, sigma, 3)]) for rng in rngs])
    d = torch.as_tensor(draws, dtype=x.dtype, device=x.device)
    hed = rgb_to_hed(x)
    return hed_to_rgb(hed * d[:, 0, :, None, None] + d[:, 1, :, None, None])


def black_corner(x, multiplier, rngs=None, grey=None):
    """Everything outside a centred disc of ``multiplier`` times the inscribed radius set
    to black (a dermatoscope's round field of view)."""
    h, w = x.shape[-2:]
    radius = int(min(w // 2, h // 2, w - w // 2, h - h // 2) * multiplier)
    yy = torch.arange(h, device=x.device).view(-1, 1) - h // 2
    xx = torch.arange(w, device=x.device).view(1, -1) - w // 2
    inside = (yy**2 + xx**2) <= radius**2
    return x * inside.to(x.dtype)


def _bubble_alpha(rng: np.random.Generator, h: int, w: int, max_radius: int, max_bubbles: int, scale: float) -> np.ndarray:
    alpha = np.zeros((h, w), dtype=np.float32)
    yy, xx = np.ogrid[:h, :w]
    border = 2 * scale
    for _ in range(int(rng.integers(7, max(7, max_bubbles) + 1))):
        radius = float(rng.integers(3, max(3, max_radius) + 1)) * scale
        cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
        dist2 = (xx - cx) ** 2 + (yy - cy) ** 2
        alpha[dist2 <= (radius + border) ** 2] = 130 / 255
        alpha[dist2 <= radius**2] = 100 / 255
    return alpha


def bubble(x, level, rngs, grey=None):
    """Translucent white discs (7 to ``max_bubbles`` of radius 3 to ``max_radius`` at 224
    pixels), each with a brighter rim, blended over the image."""
    max_radius, max_bubbles = level
    h, w = x.shape[-2:]
    scale = h / REFERENCE_SIZE
    alphas = np.stack([_bubble_alpha(rng, h, w, max_radius, max_bubbles, scale) for rng in rngs])
    a = torch.from_numpy(alphas).to(x.device, x.dtype).unsqueeze(1)
    return x * (1 - a) + a


def _draw_words(pil, rng: np.random.Generator, level, scale: float):
    from PIL import ImageDraw, ImageFont

    max_words, max_letters, max_font_scale = level
    draw = ImageDraw.Draw(pil)
    w, h = pil.size
    for _ in range(int(rng.integers(1, max_words + 1))):
        n = int(rng.integers(3, max_letters + 1))
        font_scale = rng.integers(14, int(max_font_scale * 100) + 1) / 100
        text = "".join(rng.choice(list(string.ascii_lowercase), n))
        # OpenCV's Hershey duplex font is about 30 pixels tall at scale 1
        size = max(4, int(round(30 * font_scale * scale)))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow without FreeType: the fixed bitmap font
            font = ImageFont.load_default()
        left = int(rng.integers(0, max(1, w - int(8 * n * scale))))
        top = int(rng.integers(0, max(1, h - size)))
        draw.text((left, top), text, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), font=font)
    return pil


def characters(x, level, rngs, grey=None):
    """Random lower-case words in random colours (pen marks, labels, rulers on the skin)."""
    from PIL import Image

    host = (x.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    scale = x.shape[-2] / REFERENCE_SIZE
    out = [np.asarray(_draw_words(Image.fromarray(img.transpose(1, 2, 0)), rng, level, scale)) for img, rng in zip(host, rngs)]
    return torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / 255).to(x.device, x.dtype)
