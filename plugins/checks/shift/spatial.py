"""Resolution corruptions: Gaussian, defocus and motion blur, pixelation and JPEG compression.

Strengths are MedMNIST-C's, which are given for 224 x 224 images; kernel sizes and radii are
scaled by ``H / 224``, so a corruption removes the same physical detail at any model size
(pixelation's factor and JPEG's quality need no scaling). Blur and pixelation run batched on
the run's device; JPEG goes through Pillow's encoder on the CPU, as PACS exports do.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_SIZE = 224


def _scale(x: torch.Tensor) -> float:
    return x.shape[-2] / REFERENCE_SIZE


def _separable(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    c, half = x.shape[1], len(kernel) // 2
    k = kernel.to(x.device, x.dtype).view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode=mode), k, groups=c)
    return F.conv2d(F.pad(x, (0, 0, half, half), mode=mode), k.transpose(-1, -2), groups=c)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    t = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(x, kernel_size, rngs=None, grey=None):
    """torchvision's ``gaussian_blur`` with MedMNIST-C's kernel size (sigma follows from it,
    as torchvision derives it), both scaled to the image size."""
    sigma = (0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8) * _scale(x)
    size = max(3, int(round(kernel_size * _scale(x))) | 1)
    size = min(size, (min(x.shape[-2:]) - 1) | 1)
    return _separable(x, gaussian_kernel(size, sigma)).clamp(0, 1)


def disk_kernel(radius: float, alias_blur: float, scale: float = 1.0) -> torch.Tensor:
    """An aliased disk (the defocus point-spread function), smoothed by a 3- or 5-tap
    Gaussian as MedMNIST-C smooths it."""
    r = radius * scale
    half = int(math.ceil(max(8 * scale, r)))
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= r**2).astype(np.float64)
    disk /= disk.sum()
    taps = 3 if radius <= 8 else 5
    smooth = gaussian_kernel(taps, alias_blur * max(scale, 1e-3)).double()
    padded = torch.from_numpy(disk)[None, None]
    out = _separable(padded, smooth, mode="reflect") if padded.shape[-1] > taps // 2 else padded
    return out[0, 0].float()


def defocus_blur(x, level, rngs=None, grey=None):
    """Convolution with a disk of MedMNIST-C's radius (an out-of-focus lens or stage)."""
    radius, alias = level
    kernel = disk_kernel(radius, alias, _scale(x)).to(x.device, x.dtype)
    half = kernel.shape[-1] // 2
    pad_mode = "reflect" if half < min(x.shape[-2:]) else "replicate"
    c = x.shape[1]
    out = F.conv2d(F.pad(x, (half,) * 4, mode=pad_mode), kernel[None, None].repeat(c, 1, 1, 1), groups=c)
    return out.clamp(0, 1)


def motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """A one-sided line of Gaussian weights along ``angle`` (degrees), as ImageMagick's
    motion blur samples the image behind each pixel."""
    width = 2 * int(math.ceil(radius)) + 1
    weights = np.exp(-np.arange(width) ** 2 / (2 * max(sigma, 1e-3) ** 2))
    size = 2 * width - 1
    kernel = np.zeros((size, size))
    a = math.radians(angle)
    for i, w in enumerate(weights):
        kernel[width - 1 + int(round(i * math.sin(a))), width - 1 + int(round(i * math.cos(a)))] += w
    return kernel / kernel.sum()


def motion_blur(x, level, rngs, grey=None):
    """Motion blur of MedMNIST-C's radius and sigma at an angle drawn per image in
    [-45, 45] degrees; the whole batch goes through one grouped convolution."""
    radius, sigma = level
    scale = _scale(x)
    b, c, h, w = x.shape
    kernels = [motion_kernel(radius * scale, sigma * scale, float(rng.uniform(-45, 45))) for rng in rngs]
    k = torch.from_numpy(np.stack(kernels)).to(x.device, x.dtype)
    half = k.shape[-1] // 2
    weight = k.repeat_interleave(c, dim=0).unsqueeze(1)
    out = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (half,) * 4, mode="replicate"), weight, groups=b * c)
    return out.reshape(b, c, h, w).clamp(0, 1)


def box_resample_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """Pillow's BOX resampling along one axis as an (out x in) matrix."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        for j in range(lo, hi):
            t = (j - centre + 0.5) / filterscale
            matrix[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        total = matrix[i].sum()
        if total > 0:
            matrix[i] /= total
    return matrix.float()


def pixelate(x, factor, rngs=None, grey=None):
    """Box downsampling to ``factor`` of the size and back (a coarser detector or a
    thumbnail), with Pillow's BOX weights as MedMNIST-C resizes."""
    h, w = x.shape[-2:]
    small_h, small_w = max(1, int(h * factor)), max(1, int(w * factor))
    rows = box_resample_matrix(h, small_h) @ box_resample_matrix(small_h, h)
    cols = box_resample_matrix(w, small_w) @ box_resample_matrix(small_w, w)
    rows, cols = rows.to(x.device, x.dtype), cols.to(x.device, x.dtype)
    return (rows @ x @ cols.T).clamp(0, 1)


def jpeg(x, quality, rngs=None, grey=None):
    """JPEG compression at ``quality`` through Pillow; grey images are encoded as one
    channel, as a grey PACS export is."""
    from PIL import Image

    host = (x.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    out = []
    for i, img in enumerate(host):
        is_grey = bool(grey[i]) if grey is not None else False
        pil = Image.fromarray(img[0]) if is_grey else Image.fromarray(img.transpose(1, 2, 0))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
        out.append(np.broadcast_to(back[None], img.shape) if is_grey else back.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).to(x.device, x.dtype)
