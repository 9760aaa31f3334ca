"""Figures between results.json, the run folder and the page.

A check's figure arrives as a PNG data URI. The run folder keeps each figure once, as a file
under ``figures/`` that results.json names (``"file"``), and the page embeds it again as a
data URI so index.html stays one self-contained file. A large figure (a grid of photographs or
noise images) is stored as a 256-colour PNG, which keeps its exact drawing colours (outlines,
markers) at a third of the size or less. Figures stay lossless while a run's figures fit in
FIGURE_BUDGET bytes; beyond it the largest become WebP (photographs and noise compress five
times better so), one at a time until they fit, so a big audit's page stays a few megabytes.
"""

from __future__ import annotations

import base64
import copy
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image

FOLDER = "figures"
PNG_URI = "data:image/png;base64,"
# Below this a plot's PNG is already small (flat colours); above it, it holds photographs.
QUANTISE_ABOVE = 60_000
FIGURE_BUDGET = 900_000
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


def compact_png(png: bytes) -> bytes:
    """``png`` as a 256-colour PNG when that is smaller, else unchanged."""
    if len(png) <= QUANTISE_ABOVE:
        return png
    try:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        small.save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return png
    return buf.getvalue() if len(buf.getvalue()) < len(png) else png


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40] or "x"


def split_figures(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """results.json's content with every figure as a file reference, and those files' bytes.

    ``results`` itself is left as it is (the page and the other outputs read it)."""
    stored = copy.deepcopy(results)
    files: dict[str, bytes] = {}
    for check, entry in (stored.get("checks") or {}).items():
        for i, figure in enumerate(entry.get("figures") or []):
            uri = figure.get("data_uri") or ""
            if not uri.startswith(PNG_URI):
                continue
            name = f"{FOLDER}/{slug(check)}-{i + 1}.png"
            files[name] = compact_png(base64.b64decode(uri[len(PNG_URI):]))
            figure.pop("data_uri")
            figure["file"] = name
    renamed = fit_budget(files)
    for entry in (stored.get("checks") or {}).values():
        for figure in entry.get("figures") or []:
            figure["file"] = renamed.get(figure.get("file"), figure.get("file"))
    return stored, files


def fit_budget(files: dict[str, bytes], budget: int = FIGURE_BUDGET) -> dict[str, str]:
    """Turn the largest PNGs of ``files`` into WebP (in place) until all fit in ``budget``
    bytes or no conversion helps; returns the old name -> new name of those converted."""
    renamed: dict[str, str] = {}
    for name in sorted(files, key=lambda n: (-len(files[n]), n)):
        if sum(len(v) for v in files.values()) <= budget:
            break
        webp = _webp(files[name])
        if webp is not None and len(webp) < len(files[name]):
            new = name[: -len(".png")] + ".webp"
            files[new] = webp
            del files[name]
            renamed[name] = new
    return renamed


def _webp(png: bytes) -> bytes | None:
    try:
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="WEBP", quality=80, method=6)
    except (OSError, ValueError, KeyError):
        return None
    return buf.getvalue()


def inline_figures(results: dict[str, Any], folder: Path | None = None, files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """``results`` with every figure as a data URI for the page: from ``files`` (this run's,
    not yet written) or from ``folder`` (a results.json being re-rendered); a PNG that is
    already inline is made compact. A missing file leaves the figure without an image."""
    shown = copy.deepcopy(results)
    for entry in (shown.get("checks") or {}).values():
        for figure in entry.get("figures") or []:
            figure["src"] = _source(figure, folder, files or {})
    return shown


def inline_gallery(galleries: list[dict[str, Any]], folder: Path | None = None,
                   files: dict[str, bytes] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The drill-down galleries grouped by check, each item with its thumbnail as ``src``."""
    by_check: dict[str, list[dict[str, Any]]] = {}
    for gallery in copy.deepcopy(galleries):
        for item in gallery.get("items") or []:
            item["src"] = _source(item, folder, files or {})
            for picture in item.get("pictures") or []:
                picture["src"] = _source(picture, folder, files or {})
        by_check.setdefault(str(gallery.get("check")), []).append(gallery)
    return by_check


def _source(figure: dict[str, Any], folder: Path | None, files: dict[str, bytes]) -> str:
    uri = figure.get("data_uri") or ""
    if uri.startswith(PNG_URI):
        return data_uri(compact_png(base64.b64decode(uri[len(PNG_URI):])), "image/png")
    name = str(figure.get("file") or "")
    if not name.startswith(f"{FOLDER}/") or ".." in name:
        return ""
    data = files.get(name)
    if data is None and folder is not None and (folder / name).is_file():
        data = (folder / name).read_bytes()
    mime = MIME.get(Path(name).suffix.lower())
    if data is None or mime is None:
        return ""
    return data_uri(data, mime)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
