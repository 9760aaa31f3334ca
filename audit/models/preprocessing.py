"""The model's own preprocessing, stopped before its normalisation.

A model is audited on the pixels its users give it: open_clip's eval transform for open_clip
models, the image processor for transformers CLIP models, a loader plugin's own pipeline.
Those pipelines resize a PIL image (PIL's antialiased filters, their own rounding of sizes
and crop offsets), which differs from resizing a float tensor by up to a few normalised
units per pixel on images whose size is not the model's. So the dataset hands each decoded
image to the adapter's :class:`ModelPreprocessing`, which runs the model's pipeline and
returns pixels in [0, 1] at the model's resolution; the normalisation stays inside
:meth:`ModelAdapter.encode_image`, so attacks and attributions still work in pixel space.

The pipelines take 8-bit images, so a decoded image is rounded to 8 bits first. For 8-bit
files (JPEG, 8-bit PNG) this gives back the file's own values exactly. For sources with more
depth (16-bit PNG or TIFF, DICOM after its window, float arrays of a dataset subclass) it is
what a user must do to hand them to the model's preprocessing, which converts to 8-bit RGB.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch


def to_pil(image: np.ndarray):
    """An H x W x 3 float image in [0, 1] as an 8-bit RGB PIL image.

    RGB even for grey images: the pipelines convert to RGB themselves, and PIL resizes
    an "L" image and its RGB copy to the same values (checked on the OASIS-1 slices).
    """
    from PIL import Image

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    u8 = np.clip(np.rint(arr[:, :, :3] * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(u8))


class ModelPreprocessing:
    """A decoded image -> (3, H, W) float pixels in [0, 1] at the model's resolution.

    ``pipeline`` takes a PIL image and returns a (3, H, W) tensor (or array). Its output is
    mapped back to [0, 1]: divided by ``scale`` (255 for a pipeline that keeps 0..255 values),
    or, for a pipeline that normalises and cannot be stopped before it, un-normalised with
    the ``mean`` and ``std`` it applied. Instances hold no model, so data-loader workers can
    take a copy.
    """

    def __init__(
        self,
        pipeline: Callable[[Any], Any],
        size: tuple[int, int],
        *,
        scale: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "",
    ):
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std of the pipeline's normalisation, or neither")
        self.pipeline = pipeline
        self.size = (int(size[0]), int(size[1]))
        self.scale = float(scale)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.name = name or type(pipeline).__name__

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        out = self.pipeline(to_pil(image))
        out = (out if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))).to(torch.float32)
        if out.ndim == 4 and out.shape[0] == 1:
            out = out[0]
        if self.mean is not None:
            out = out * self.std + self.mean
        if self.scale != 1.0:
            out = out / self.scale
        if tuple(out.shape) != (3, *self.size):
            raise ValueError(
                f"the model's preprocessing ({self.name}) gave pixels of shape {tuple(out.shape)}; "
                f"the model takes (3, {self.size[0]}, {self.size[1]})"
            )
        return out.clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"ModelPreprocessing({self.name}, size={self.size})"


def strip_normalize(transform):
    """A torchvision ``Compose`` without its trailing ``Normalize``: open_clip's eval
    transform run up to the pixels in [0, 1] that it normalises last."""
    from torchvision.transforms import Compose, Normalize

    steps = list(getattr(transform, "transforms", []))
    if not steps or not isinstance(steps[-1], Normalize):
        raise ValueError(f"expected a Compose ending in Normalize, got {transform!r}")
    return Compose(steps[:-1])


def open_clip_preprocessing(image_size, preprocess_cfg: dict[str, Any] | None = None) -> ModelPreprocessing:
    """open_clip's own eval transform for a model, as ``create_model_and_transforms`` builds it.

    open_clip merges the model folder's ``preprocess_cfg`` over its defaults and sets the
    size from the vision tower; the resize mode, interpolation and fill colour come from
    there too (``shortest`` edge, ``bicubic`` unless the folder says otherwise).
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    merged = merge_preprocess_dict(PreprocessCfg(), dict(preprocess_cfg or {}))
    merged["size"] = image_size
    cfg = PreprocessCfg(**merged)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    pipeline = strip_normalize(image_transform_v2(cfg, is_train=False))
    return ModelPreprocessing(pipeline, size, name=f"open_clip {cfg.resize_mode} {cfg.interpolation}")


class HFProcessorPipeline:
    """A transformers image processor called on one image with its normalisation off."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, do_normalize=False, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return type(self.processor).__name__


def processor_scale(processor) -> float:
    """What a transformers image processor's 8-bit input becomes at 1.0: 255 * rescale_factor."""
    return 255.0 * float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 255.0


def hf_processor_preprocessing(processor, size: tuple[int, int]) -> ModelPreprocessing:
    """The image processor of a transformers CLIP model, run up to before its normalisation.

    It rescales 8-bit values by ``rescale_factor`` (when ``do_rescale``), so its output is
    divided by ``255 * rescale_factor`` to come back to [0, 1].
    """
    return ModelPreprocessing(HFProcessorPipeline(processor), size, scale=processor_scale(processor), name=type(processor).__name__)
