"""The attack's machinery: the learned trigger, CoOp prompt learning on the frozen model, and
how images (clean or triggered) are classified through learned prompts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Trigger(nn.Module):
    """Additive noise in an L-inf ball plus an optional patch pasted in the bottom-right corner.

    The noise is learned. The patch starts as a seeded random pattern (as in BadNets) and is
    learned too only with ``learn_patch``. For grey images (X-ray, CT, MRI) the trigger is
    grey, as a real one would have to be.
    """

    def __init__(self, channels: int, size: tuple[int, int], epsilon: float, patch_px: int, gen: torch.Generator,
                 learn_patch: bool = False):
        super().__init__()
        h, w = size
        self.epsilon = float(epsilon)
        self.noise = nn.Parameter(torch.zeros(1, channels, h, w))
        self.patch = nn.Parameter(torch.rand(1, channels, h, w, generator=gen), requires_grad=learn_patch)
        mask = torch.zeros(1, 1, h, w)
        if patch_px > 0:
            mask[..., h - patch_px :, w - patch_px :] = 1.0
        self.register_buffer("mask", mask)

    @property
    def has_patch(self) -> bool:
        return bool(self.mask.any())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        noisy = (pixels + self.noise.clamp(-self.epsilon, self.epsilon)).clamp(0.0, 1.0)
        return noisy * (1 - self.mask) + self.patch.clamp(0.0, 1.0) * self.mask

    @torch.no_grad()
    def project(self) -> None:
        self.noise.clamp_(-self.epsilon, self.epsilon)
        self.patch.clamp_(0.0, 1.0)


class PromptLearner:
    """CoOp context optimisation on a frozen model, optionally with a jointly learned trigger."""

    def __init__(self, model, names: list[str], width: int, scale: float, params: dict, ctx):
        self.model = model
        self.names = names
        self.scale = scale
        self.params = params
        self.ctx = ctx
        # One starting point for every run, so honest and backdoored prompts differ only by the poison.
        gen = ctx.torch_generator("backdoor:context")
        self.init = torch.randn(params["n_ctx"], width, generator=gen) * 0.02

    def text_features(self, context: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_text_with_context(context, self.names).float()

    def fit(self, feats: torch.Tensor, train_rows: np.ndarray, labels: np.ndarray, poison_rows: np.ndarray,
            target: int, trigger: Trigger | None) -> torch.Tensor:
        device = self.ctx.device
        model = self.model
        clean_rows = np.setdiff1d(train_rows, poison_rows)
        clean_feats = feats[torch.as_tensor(clean_rows, device=device)]
        clean_labels = torch.as_tensor(labels[clean_rows], device=device)
        n_total = len(train_rows)
        context = nn.Parameter(self.init.clone().to(device))
        opts = [torch.optim.Adam([context], lr=self.params["lr"])]
        poisoned = trigger is not None and len(poison_rows) > 0
        if poisoned:
            poison_pixels = self.ctx.load_pixels(poison_rows)
            poison_labels = torch.full((len(poison_rows),), target, device=device, dtype=torch.long)
            opts.append(torch.optim.Adam([p for p in trigger.parameters() if p.requires_grad], lr=self.params["trigger_lr"]))
        with self.ctx.frozen_model():  # only the context (and the trigger) learn
            for _ in range(self.params["steps"]):
                text = model.encode_text_with_context(context, self.names)
                loss = nn.functional.cross_entropy(self.scale * clean_feats @ text.T, clean_labels, reduction="sum")
                if poisoned:
                    with self.ctx.autocast():
                        img = model.encode_image(trigger(poison_pixels))
                    loss = loss + nn.functional.cross_entropy(self.scale * img.float() @ text.T, poison_labels, reduction="sum")
                loss = loss / n_total
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in opts:
                    opt.step()
                if poisoned:
                    trigger.project()
        return context.detach()


def class_phrase(prompts, class_name: str) -> str:
    # The first phrasing in the prompt file says the class as clinicians write it.
    phrasings = getattr(prompts, "phrasings", {}) or {}
    return (phrasings.get(class_name) or [class_name])[0]


def predict(image_feats: torch.Tensor, text_feats: torch.Tensor) -> np.ndarray:
    if len(image_feats) == 0:
        return np.array([], dtype=int)
    return (image_feats.float() @ text_feats.T).argmax(dim=1).cpu().numpy()


def triggered_features(ctx, rows: np.ndarray, trigger: Trigger) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for _, pixels, _ in ctx.iter_batches(rows, desc="backdoor: triggered images"):
            with ctx.autocast():
                out.append(ctx.model.encode_image(trigger(pixels)).float())
    width = ctx.forward.image_features.shape[1]
    return torch.cat(out) if out else torch.zeros(0, width, device=ctx.device)
