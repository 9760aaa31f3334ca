"""Decode one image file into float pixels in [0, 1], whatever the format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class UnreadableImage(Exception):
    """An image that cannot be decoded; the run counts it and goes on unless --strict."""


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: Path, options: dict[str, Any] | None = None) -> tuple[np.ndarray, bool]:
    """(H x W x 3 float32 array in [0, 1], was the source grey)."""
    options = options or {}
    if not path.is_file():
        raise UnreadableImage(f"{path}: no such file")
    if is_dicom(path):
        from mcaudit.data.dicom import read_dicom

        arr = read_dicom(path, frame=options.get("dicom_frame"))
    else:
        arr = _read_pil(path)
    return to_rgb(arr)


def to_rgb(arr: np.ndarray) -> tuple[np.ndarray, bool]:
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2), True
    if arr.ndim == 3 and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2), True
    if arr.ndim == 3 and arr.shape[2] >= 3:
        rgb = arr[:, :, :3]
        grey = bool(np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2]))
        return rgb, grey
    raise UnreadableImage(f"unsupported image shape {arr.shape}")


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return np.asarray(img, dtype=np.float32) / 65535.0
            if mode in ("I", "F"):
                arr = np.asarray(img, dtype=np.float32)
                return _minmax(arr)
            if mode in ("L", "1"):
                return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            if mode == "LA":
                return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(f"{path}: cannot decode image ({exc})") from exc


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)
