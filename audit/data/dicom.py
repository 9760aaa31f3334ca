"""DICOM to display pixels, the way a radiology viewer shows them by default.

Stored values go through the modality LUT (rescale slope and intercept, to Hounsfield units
for CT), then the VOI LUT or the first window centre/width when the file has one, and are
scaled to [0, 1]; MONOCHROME1 images (where high values are dark) are inverted so that
every grey image reads the same way.

Multi-frame files are refused unless a frame is chosen with the data option
``dicom_frame`` (an index, or ``middle``), because auditing every frame as a separate image
would silently weight one study many times.

A frame over the pixel limit of :mod:`mcaudit.data.images` is refused from the header,
before its pixel data are decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcaudit.data.images import MAX_IMAGE_PIXELS, UnreadableImage, check_pixel_count


def read_dicom(path: Path, frame: int | str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
        check_pixel_count(path, int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0), max_pixels)
        arr = ds.pixel_array
    except (InvalidDicomError, AttributeError, OSError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise UnreadableImage(f"{path}: cannot decode DICOM pixel data ({_short(exc)})") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        if frame is None:
            raise UnreadableImage(
                f"{path}: multi-frame DICOM ({frames} frames); choose one with "
                f"--data-option dicom_frame=N or dicom_frame=middle"
            )
        index = frames // 2 if frame == "middle" else _frame_index(frame)
        if not 0 <= index < frames:
            raise UnreadableImage(f"{path}: dicom_frame={frame} is outside 0..{frames - 1}")
        arr = arr[index]
    if samples == 3:
        # Colour ultrasound or secondary capture: pydicom already converted YBR to RGB.
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        return np.clip(arr.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # DICOM PS3.3 C.11.2.1.2.1 linear window, mapped straight to [0, 1].
        center = float(_first(ds.WindowCenter))
        width = max(float(_first(ds.WindowWidth)), 1.0)
        out = np.clip((values - (center - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5, 0.0, 1.0)
        out = out.astype(np.float32)
    else:
        if "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        out = np.zeros_like(values, dtype=np.float32) if hi <= lo else ((values - lo) / (hi - lo)).astype(np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out


def _frame_index(frame) -> int:
    # The command line validates dicom_frame; a plugin may pass anything.
    try:
        return int(frame)
    except (TypeError, ValueError):
        raise UnreadableImage(f"dicom_frame={frame!r}: expected a frame index or 'middle'") from None


def _first(value):
    # Window centre/width may be multi-valued; the first pair is the default view.
    try:
        return value[0]
    except (TypeError, IndexError):
        return value


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
