"""One interface over every CLIP-like model that mcaudit audits.

Checks never see the wrapped model. They see pixels in [0, 1] at the model's resolution
and call :meth:`ModelAdapter.encode_image`, which applies the model's own normalisation
inside, so gradients of attacks and attributions are taken in pixel space.

How a decoded image becomes those pixels is the model's own business too: a loader passes
``pixel_transform`` (a :class:`mcaudit.models.preprocessing.ModelPreprocessing`, or any
callable from an H x W x 3 float image in [0, 1] to a (3, H, W) tensor in [0, 1] at
``image_size``) and the dataset uses it for every image the model sees.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

import torch
from torch import nn


class ModelAdapter(nn.Module, abc.ABC):
    """A CLIP-like model seen through pixel-space image encoding and prompt encoding.

    Subclasses implement :meth:`_encode_normalized_image` and :meth:`_encode_prompts`.
    ``spec`` and ``weights_sha256`` identify the model in results.json.
    """

    def __init__(
        self,
        *,
        spec: str,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        weights_sha256: str | None = None,
        loader: str = "",
        pixel_transform: Callable[[Any], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.weights_sha256 = weights_sha256
        self.loader = loader
        self._pixel_transform = pixel_transform
        # A model folder may ship the prompts it was trained with (prompts.toml); they are
        # the default when the user gives none.
        self.default_prompts = None
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    # -- what subclasses provide -------------------------------------------------------
    @abc.abstractmethod
    def _encode_normalized_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features (not yet L2-normalised) from model-normalised images."""

    @abc.abstractmethod
    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text features (not yet L2-normalised) for a list of prompts."""

    @property
    @abc.abstractmethod
    def logit_scale(self) -> float:
        """The learned temperature, already exponentiated (100 for OpenAI CLIP)."""

    # -- what every check uses ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def pixel_transform(self) -> Callable[[Any], torch.Tensor] | None:
        """The model's own resize and crop to [0, 1] pixels, or None for the dataset's default.

        None keeps what loaders written before this hook get: a float bicubic resize of the
        shorter side and a centre crop (:func:`mcaudit.data.dataset.to_model_size`).
        """
        return self._pixel_transform

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features from pixels in [0, 1], shape (N, 3, H, W)."""
        feats = self._encode_normalized_image(self.normalize_pixels(pixels))
        return nn.functional.normalize(feats.float(), dim=-1)

    def encode_text(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text features for the prompts, shape (len(prompts), D)."""
        prompts = list(prompts)
        chunks = [
            self._encode_prompts(prompts[i : i + batch_size]).float()
            for i in range(0, len(prompts), batch_size)
        ]
        return nn.functional.normalize(torch.cat(chunks), dim=-1)

    def class_text_features(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """One embedding per class: the re-normalised mean over its prompts, as CLIP does."""
        flat = [p for prompts in class_prompts for p in prompts]
        feats = self.encode_text(flat)
        out, start = [], 0
        for prompts in class_prompts:
            mean = feats[start : start + len(prompts)].mean(dim=0)
            out.append(nn.functional.normalize(mean, dim=-1))
            start += len(prompts)
        return torch.stack(out)

    def encode_text_with_context(self, context: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """CoOp-style prompt learning: L2-normalised features, one per class name.

        ``context`` holds learned token embeddings, shape (n_ctx, text_width), placed before
        each class name's tokens in place of a hand-written template. The result must be
        differentiable with respect to ``context``; the ``backdoor`` check relies on it.
        Adapters that cannot do this keep this default, and checks that need it are skipped.
        """
        raise TypeError(f"the {type(self).__name__} adapter has no learned-context text path")

    @property
    def text_width(self) -> int:
        """Width of the text tower's token embeddings (the size of one context vector)."""
        raise TypeError(f"the {type(self).__name__} adapter has no learned-context text path")

    def zero_shot_classifier(self, class_features: torch.Tensor) -> "ZeroShotClassifier":
        return ZeroShotClassifier(self, class_features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_image(pixels)


class ZeroShotClassifier(nn.Module):
    """Differentiable pixels -> class logits, ``logit_scale * cos(image, class text)``.

    This is the model that attacks and attribution methods see: a plain ``nn.Module`` taking
    [0, 1] images, which is what torchattacks and captum expect.
    """

    def __init__(self, adapter: ModelAdapter, class_features: torch.Tensor):
        super().__init__()
        self.adapter = adapter
        # clone(): features made under inference_mode cannot be saved for backward otherwise
        self.register_buffer("class_features", class_features.detach().float().clone())
        self.scale = float(adapter.logit_scale)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.adapter.encode_image(pixels)
        return self.scale * feats @ self.class_features.to(feats.device).T
