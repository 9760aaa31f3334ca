"""Decode one image file into float pixels in [0, 1], whatever the format.

Images above :data:`MAX_IMAGE_PIXELS` are refused from their header, before decoding: a
decoded image is held as float32 RGB (12 bytes a pixel), so a 13000 x 13000 PNG took a run's
peak memory from 1 GB to 3.5 GB, and a small PNG can declare a size that no machine can
hold (a decompression bomb). A refused image is skipped and counted like any unreadable one.
``--data-option max_image_pixels=N`` raises or lowers the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class UnreadableImage(Exception):
    """An image that cannot be decoded; the run counts it and goes on unless --strict."""


# 64 megapixels (8000 x 8000): above mammograms (about 30 MP) and 48-MP camera photos. An
# image at the limit adds 1.0 GB (grey) to 1.2 GB (RGB) to peak memory while it is decoded
# and resized (measured), per DataLoader worker. PIL's own bound (Image.MAX_IMAGE_PIXELS,
# 89 MP, refused at twice that) is only a last resort.
MAX_IMAGE_PIXELS = 64_000_000


def pixel_limit(options: dict[str, Any] | None) -> int:
    """The most pixels one image may have: the ``max_image_pixels`` data option, else the default."""
    return int((options or {}).get("max_image_pixels") or MAX_IMAGE_PIXELS)


def check_pixel_count(path: Path, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise UnreadableImage(
            f"{path}: {width} x {height} pixels ({width * height / 1e6:.0f} megapixels) is over the limit of "
            f"{limit / 1e6:g} megapixels per image; raise it with --data-option max_image_pixels=N")


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

        arr = read_dicom(path, frame=options.get("dicom_frame"), max_pixels=pixel_limit(options))
    else:
        arr = _read_pil(path, pixel_limit(options))
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


def _read_pil(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    import warnings

    from PIL import Image, UnidentifiedImageError

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        # PIL refuses at open above twice its own limit; whoever raised ours asked for more.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns between its limit and twice it; the size is checked here instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_pixel_count(path, img.width, img.height, max_pixels)
                img.load()
                return _to_array(img)
    except Image.DecompressionBombError as exc:
        # PIL checks the declared size at open, before the check above can see it.
        raise UnreadableImage(f"{path}: over the limit of {max_pixels / 1e6:g} megapixels per image, refused "
                              f"before decoding ({exc}); raise it with --data-option max_image_pixels=N") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(f"{path}: cannot decode image ({exc})") from exc


def _to_array(img) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _scaled(img, 65535.0)
    if mode in ("I", "F"):
        return _minmax(np.asarray(img, dtype=np.float32))
    if mode in ("L", "1", "LA"):
        return _scaled(img if mode == "L" else img.convert("L"), 255.0)
    return _scaled(img if mode == "RGB" else img.convert("RGB"), 255.0)


def _scaled(img, top: float) -> np.ndarray:
    # Scaling in place keeps one float copy of the image alive instead of two.
    arr = np.array(img, dtype=np.float32)
    arr /= top
    return arr


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)
