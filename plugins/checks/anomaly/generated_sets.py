"""The OOD sets the check makes itself when the user gives no ``--ood`` data.

*Near-OOD*: audited images wrecked by heavy noise, blur, contrast loss or pixelation: the
anatomy is still there, the acquisition is not one a model should trust. *Far-OOD*: noise
and texture images of another kind altogether.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torchvision.transforms.v2.functional as TF

from mcaudit.devices import full_precision

from .scores import Encoded

CORRUPTIONS = ("heavy noise", "heavy blur", "contrast collapse", "pixelation")
FAR_KINDS = ("uniform noise", "1/f noise", "stripes and checkers")


def corrupt(pixels: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A strong corruption of (N, 3, H, W) pixels in [0, 1]."""
    h, w = pixels.shape[-2:]
    if kind == "heavy noise":
        grey = bool((pixels[:, :1] == pixels).all())
        # Grey images get grey noise: coloured speckle would be an easier cue than the noise.
        shape = (pixels.shape[0], 1, h, w) if grey else pixels.shape
        noise = torch.randn(shape, generator=generator).to(pixels.device)
        return (pixels + 0.5 * noise).clamp(0, 1)
    if kind == "heavy blur":
        sigma = max(h, w) / 12
        size = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(h, w) // 2) - 1)
        return TF.gaussian_blur(pixels, [size, size], [sigma, sigma])
    if kind == "contrast collapse":
        return (0.5 + 0.08 * (pixels - pixels.mean(dim=(1, 2, 3), keepdim=True))).clamp(0, 1)
    if kind == "pixelation":
        small = torch.nn.functional.interpolate(pixels, size=(max(2, h // 10), max(2, w // 10)), mode="area")
        return torch.nn.functional.interpolate(small, size=(h, w), mode="nearest")
    raise ValueError(kind)


def far_image(kind: str, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """One (3, H, W) image of another kind than any medical scan."""
    h, w = size
    if kind == "uniform noise":
        return torch.rand((3, h, w), generator=generator)
    if kind == "1/f noise":
        # Random phases under a 1/f amplitude spectrum: the statistics of natural photographs.
        fy = torch.fft.fftfreq(h).view(-1, 1)
        fx = torch.fft.rfftfreq(w).view(1, -1)
        amp = 1.0 / torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / max(h, w))
        phase = torch.rand((3, h, w // 2 + 1), generator=generator) * 2 * math.pi
        img = torch.fft.irfft2(amp * torch.exp(1j * phase), s=(h, w))
        lo = img.amin(dim=(1, 2), keepdim=True)
        hi = img.amax(dim=(1, 2), keepdim=True)
        return (img - lo) / (hi - lo).clamp_min(1e-8)
    if kind == "stripes and checkers":
        u = torch.rand(6, generator=generator)
        yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
        angle, freq = u[0] * math.pi, 3 + 9 * u[1]
        wave = torch.sin(2 * math.pi * freq * (xx * torch.cos(angle) + yy * torch.sin(angle)))
        if u[2] < 0.5:
            wave = wave * torch.sin(2 * math.pi * freq * (-xx * torch.sin(angle) + yy * torch.cos(angle)))
        colours = torch.rand((2, 3, 1, 1), generator=generator)
        t = (wave > 0).float()
        return colours[0] * t + colours[1] * (1 - t)
    raise ValueError(kind)


class GeneratedSets:
    """Near- and far-OOD sets of ``n`` images each, encoded, with one example of each kind
    (and the audited image the first corrupted copies come from) for the report."""

    def __init__(self, ctx, n: int):
        self.ctx = ctx
        self.rows = ctx.stratified_rows(n, "anomaly:near_ood")
        self.near_kinds = [CORRUPTIONS[i % len(CORRUPTIONS)] for i in range(len(self.rows))]
        self.far_kinds = [FAR_KINDS[i % len(FAR_KINDS)] for i in range(n)]
        self.near_examples: dict[str, torch.Tensor] = {}
        self.far_examples: dict[str, torch.Tensor] = {}

    def encode(self) -> dict[str, Encoded]:
        near = encode_pixels(self.ctx, self._near_batches())
        near.kinds = self.near_kinds
        far = encode_pixels(self.ctx, self._far_batches())
        far.kinds = self.far_kinds
        return {"near_ood": near, "far_ood": far}

    def original_example(self) -> torch.Tensor:
        return self.ctx.load_pixels([self.rows[0]])[0].cpu()

    def _near_batches(self) -> Iterable[torch.Tensor]:
        gen = self.ctx.torch_generator("anomaly:near_ood-noise")
        bs = self.ctx.batch_size
        for start in range(0, len(self.rows), bs):
            pixels = self.ctx.load_pixels(self.rows[start : start + bs])
            kinds = self.near_kinds[start : start + bs]
            out = pixels.clone()
            for kind in CORRUPTIONS:
                sel = [i for i, k in enumerate(kinds) if k == kind]
                if sel:
                    out[sel] = corrupt(pixels[sel], kind, gen)
                    self.near_examples.setdefault(kind, out[sel[0]].cpu())
            yield out

    def _far_batches(self) -> Iterable[torch.Tensor]:
        gen = self.ctx.torch_generator("anomaly:far_ood")
        bs = self.ctx.batch_size
        for start in range(0, len(self.far_kinds), bs):
            kinds = self.far_kinds[start : start + bs]
            imgs = [far_image(k, self.ctx.model.image_size, gen) for k in kinds]
            for k, img in zip(kinds, imgs):
                self.far_examples.setdefault(k, img)
            yield torch.stack(imgs)


def encode_pixels(ctx, batches: Iterable[torch.Tensor]) -> Encoded:
    """Features and class logits of generated pixel batches (which ``ctx.encode`` cannot
    take: it encodes data sets of image files)."""
    feats, logits = [], []
    text = ctx.class_features.to(ctx.device).float()
    scale = ctx.model.logit_scale
    with torch.inference_mode(), ctx.autocast():
        for pixels in batches:
            f = ctx.model.encode_image(pixels.to(ctx.device)).float()
            feats.append(f.cpu())
            with full_precision(ctx.device):
                logits.append((scale * f @ text.T).cpu())
    return Encoded(torch.cat(feats), torch.cat(logits))
