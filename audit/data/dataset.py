"""The dataset every format becomes: records in a fixed order, decoded one at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from mcaudit.data.images import UnreadableImage, read_image


@dataclass
class Record:
    """One image: where it comes from, its class index, its subgroup values and region.

    The annotated region is a mask image, boxes (x, y, width, height in the source image's
    pixels, COCO's convention), or both; localisation checks read it through ``load_mask``.
    """

    source: str
    label: int
    groups: dict[str, str] = field(default_factory=dict)
    mask: str | None = None
    path: Path | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    subject: str | None = None  # the patient/subject id; images of one subject are not independent

    @property
    def has_region(self) -> bool:
        return bool(self.mask or self.boxes)


class AuditDataset(torch.utils.data.Dataset):
    """A labelled image set in a fixed order.

    Subclasses override :meth:`load_pixels` when images do not live in files. Items are
    dicts: ``pixels`` (3 x H x W float in [0, 1], or None when the image could not be read),
    ``index``, ``grey`` and ``error``.

    A decoded image becomes the model's pixels through ``pixel_transform``, the model's own
    preprocessing up to its normalisation (:meth:`use_preprocessing`; the forward pass sets
    it from the adapter). Without one, :func:`to_model_size` resizes it to ``image_size``.
    """

    # The model's resize and crop (decoded H x W x 3 in [0, 1] -> 3 x H x W in [0, 1]).
    pixel_transform = None

    def __init__(
        self,
        *,
        spec: str,
        records: list[Record],
        classes: list[str],
        image_size: tuple[int, int],
        fingerprint: str,
        format_name: str,
        group_columns: tuple[str, ...] = (),
        options: dict[str, Any] | None = None,
        warnings: list[str] | None = None,
    ):
        self.spec = spec
        self.records = records
        self.classes = list(classes)
        self.image_size = tuple(image_size)
        self.fingerprint = fingerprint
        self.format_name = format_name
        self.group_columns = tuple(group_columns)
        self.options = dict(options or {})
        self.warnings = list(warnings or [])

    def __len__(self) -> int:
        return len(self.records)

    def load_pixels(self, index: int) -> tuple[np.ndarray, bool]:
        """H x W x 3 float32 in [0, 1] and whether the source was grey."""
        record = self.records[index]
        if record.path is None:
            raise UnreadableImage(f"{record.source}: no file")
        return read_image(record.path, self.options)

    def keep_decoded(self, budget_bytes: int) -> None:
        """Keep decoded images in memory, up to ``budget_bytes``, so that the next model of a
        multi-model audit (and any check re-reading an image) does not decode them again.
        Unreadable images are remembered too, with their reason. Worker processes
        (``--workers``) each fill their own copy, so there it saves less."""
        self._decoded: dict[int, tuple[np.ndarray, bool] | str] = {}
        self._decoded_budget = int(budget_bytes)
        self._decoded_bytes = 0

    @property
    def kept_bytes(self) -> int:
        """Bytes of decoded images :meth:`keep_decoded` holds."""
        return getattr(self, "_decoded_bytes", 0)

    def decoded(self, index: int) -> tuple[np.ndarray, bool]:
        """:meth:`load_pixels`, from memory when :meth:`keep_decoded` kept it."""
        kept = getattr(self, "_decoded", None)
        if kept is None:
            return self.load_pixels(index)
        if index in kept:
            found = kept[index]
            if isinstance(found, str):
                raise UnreadableImage(found)
            return found
        try:
            arr, grey = self.load_pixels(index)
        except UnreadableImage as exc:
            kept[index] = str(exc)
            raise
        if self._decoded_bytes + arr.nbytes <= self._decoded_budget:
            kept[index] = (arr, grey)
            self._decoded_bytes += arr.nbytes
        return arr, grey

    def use_preprocessing(self, transform) -> None:
        """Give every image to ``transform`` (a model's preprocessing), or None for the default."""
        self.pixel_transform = transform

    def to_pixels(self, arr: np.ndarray) -> torch.Tensor:
        """A decoded image (H x W x 3 in [0, 1]) as the model's pixels, 3 x H x W in [0, 1]."""
        if self.pixel_transform is None:
            return to_model_size(arr, self.image_size)
        return self.pixel_transform(arr)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            arr, grey = self.decoded(index)
            pixels = self.to_pixels(arr)
            return {"pixels": pixels, "index": index, "grey": grey, "error": None}
        except UnreadableImage as exc:
            return {"pixels": None, "index": index, "grey": False, "error": str(exc)}

    def load_mask(self, index: int) -> torch.Tensor | None:
        """The record's binary mask at the model's resolution (H x W bool), or None."""
        record = self.records[index]
        if not record.has_region:
            return None
        region = None
        if record.mask:
            arr, _ = read_image(Path(record.mask), {})
            region = arr[..., 0] > 0.5
        if record.boxes:
            if region is None:
                height, width = self.source_size(index)
                region = np.zeros((height, width), dtype=bool)
            paint_boxes(region, record.boxes)
        # the same resizing as the image, so the region stays where it was drawn
        if self.pixel_transform is not None:
            return transform_region(self.pixel_transform, region)
        return to_model_size(region.astype(np.float32)[..., None], self.image_size, interpolation="nearest")[0] > 0.5

    def source_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the image as stored, before resizing to the model."""
        arr, _ = self.load_pixels(index)
        return int(arr.shape[0]), int(arr.shape[1])


def paint_boxes(region: np.ndarray, boxes) -> None:
    """Set the pixels of each (x, y, width, height) box, clipped to the image, in place."""
    height, width = region.shape
    for x, y, w, h in boxes:
        x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
        x1, y1 = min(width, int(np.ceil(x + w))), min(height, int(np.ceil(y + h)))
        if x1 > x0 and y1 > y0:
            region[y0:y1, x0:x1] = True


def transform_region(transform, region: np.ndarray) -> torch.Tensor:
    """A binary region (H x W) through a model's preprocessing, as its image goes through it.

    A transform may move regions itself (``transform.region``); otherwise the region goes
    through it as a grey image and a pixel of the model's grid belongs to the region when
    the pipeline's filter puts more than half of it inside.
    """
    own = getattr(transform, "region", None)
    if own is not None:
        return own(region)
    grey = np.repeat(np.asarray(region, dtype=np.float32)[:, :, None], 3, axis=2)
    return transform(grey)[0] > 0.5


def to_model_size(arr: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Resize the shorter side and centre-crop, as CLIP preprocessing does, in pixel space."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)
    h, w = t.shape[1:]
    th, tw = size
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        new = (max(th, round(h * scale)), max(tw, round(w * scale)))
        mode = TF.InterpolationMode.NEAREST if interpolation == "nearest" else TF.InterpolationMode.BICUBIC
        t = TF.resize(t, list(new), interpolation=mode, antialias=interpolation != "nearest")
        t = TF.center_crop(t, [th, tw])
    return t.clamp_(0.0, 1.0)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [it for it in items if it["pixels"] is not None]
    return {
        "pixels": torch.stack([it["pixels"] for it in ok]) if ok else None,
        "index": torch.tensor([it["index"] for it in ok], dtype=torch.long),
        "grey": [it["grey"] for it in ok],
        "failed": [(it["index"], it["error"]) for it in items if it["pixels"] is None],
    }

