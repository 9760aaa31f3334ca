"""MRI k-space artefacts: motion, ghosting, spike (herringbone), bias field and Gibbs ringing.

Motion, ghosting, spike and bias field are TorchIO's transforms (Pérez-García et al. 2021;
motion after Shaw et al. 2019), applied to each slice as a 2D image (1 x H x W x 1, unit
spacing) with parameters drawn from the image's own generator, so they do not depend on
TorchIO's global random state. TorchIO has no Gibbs transform: Gibbs ringing is the k-space
truncation MONAI's ``GibbsNoise`` defines (keep the frequencies within ``(1 - alpha)`` of the
half-diagonal), batched on the run's device; the tests compare it with MONAI's.
"""

from __future__ import annotations

import numpy as np
import torch

from .spatial import REFERENCE_SIZE


def _torchio_per_slice(x: torch.Tensor, grey, make_transform) -> torch.Tensor:
    import torchio as tio

    host = x.detach().float().cpu()
    out = torch.empty_like(host)
    for i, img in enumerate(host):
        channels = img[:1] if (grey is None or grey[i]) else img
        result = []
        for channel in channels:
            image = tio.ScalarImage(tensor=channel[None, :, :, None].clone(), affine=np.eye(4))
            result.append(make_transform(i).apply_transform(tio.Subject(image=image))["image"].data[0, :, :, 0])
        out[i] = torch.stack(result).expand_as(img) if len(result) == 1 else torch.stack(result)
    return out.to(x.device, x.dtype).clamp(0, 1)


def _motion_params(rng: np.random.Generator, degrees: float, translation: float, n: int):
    rotation = np.zeros((n, 3))
    rotation[:, 2] = rng.uniform(-degrees, degrees, n)  # in-plane: around the slice normal
    shift = np.zeros((n, 3))
    shift[:, :2] = rng.uniform(-translation, translation, (n, 2))
    step = 1 / (n + 1)
    times = np.arange(1, n + 1) * step + rng.uniform(-0.3 * step, 0.3 * step, n)
    return rotation, shift, times


def motion(x, level, rngs, grey=None):
    """Rigid in-plane movements during the acquisition (``level``: maximum rotation in
    degrees, maximum translation in pixels at 224, number of movements)."""
    import torchio as tio

    degrees, translation, n = level
    scale = x.shape[-2] / REFERENCE_SIZE

    def make(i):
        rotation, shift, times = _motion_params(rngs[i], degrees, translation * scale, int(n))
        return tio.Motion(degrees=rotation, translation=shift, times=times, image_interpolation="linear")

    return _torchio_per_slice(x, grey, make)


def ghosting(x, level, rngs, grey=None):
    """Ghosts along the phase-encoding axis (``level``: number of ghosts, intensity), as
    periodic motion (breathing, pulsation) leaves them."""
    import torchio as tio

    num_ghosts, intensity = level

    def make(i):
        axis = int(rngs[i].integers(0, 2))
        return tio.Ghosting(num_ghosts=int(num_ghosts), axis=axis, intensity=float(intensity), restore=0.02)

    return _torchio_per_slice(x, grey, make)


def spike(x, level, rngs, grey=None):
    """Bright k-space spikes, seen as stripes over the image (``level``: number of spikes,
    intensity relative to the spectrum's peak)."""
    import torchio as tio

    num_spikes, intensity = level

    def make(i):
        positions = rngs[i].uniform(0, 1, (int(num_spikes), 3))
        positions[:, 2] = 0.5
        return tio.Spike(spikes_positions=positions, intensity=float(intensity))

    return _torchio_per_slice(x, grey, make)


def bias_coefficients(rng: np.random.Generator, magnitude: float, order: int = 3) -> list[float]:
    count = sum(order + 1 - (i + j) for i in range(order + 1) for j in range(order + 1 - i))
    return [float(v) for v in rng.uniform(-magnitude, magnitude, count)]


def bias_field(x, magnitude, rngs, grey=None):
    """A smooth multiplicative intensity field (receive-coil inhomogeneity): the exponential
    of a cubic polynomial with coefficients in [-magnitude, magnitude]."""
    import torchio as tio

    def make(i):
        return tio.BiasField(coefficients=bias_coefficients(rngs[i], magnitude), order=3)

    return _torchio_per_slice(x, grey, make)


def gibbs(x, alpha, rngs=None, grey=None):
    """Gibbs ringing: k-space truncated to a disc of radius ``(1 - alpha)`` times the
    half-diagonal, as a shorter acquisition matrix truncates it."""
    h, w = x.shape[-2:]
    k = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    radius = (1 - alpha) * max(h, w) * np.sqrt(2) / 2
    yy = torch.arange(h, device=x.device, dtype=torch.float32).view(-1, 1) - (h - 1) / 2
    xx = torch.arange(w, device=x.device, dtype=torch.float32).view(1, -1) - (w - 1) / 2
    mask = (yy**2 + xx**2).sqrt() <= radius
    out = torch.fft.ifftn(torch.fft.ifftshift(k * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype).clamp(0, 1)
