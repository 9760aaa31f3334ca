"""Drill-down galleries: the images behind a check's numbers, chosen from the run's outputs.

Chosen here, once, while the run's pixels are at hand: per true class the images the model got
wrong with the most confidence, the worst subgroup's errors per group column, and the user's
--ood images the model was surest about; and the galleries checks return themselves
(``CheckResult.galleries``: an attack's original and perturbed images, saliency overlays),
whose pictures are filed as the check made them. results.json lists them under ``drilldown`` with their
label, prediction, confidence and group values; each thumbnail is a small JPEG under
``figures/thumbs/`` that the page embeds. Confidences are compared as samples.csv writes them
(eight significant digits), so the choice can be checked against that file.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

THUMB_PX = 112
PER_CLASS = 6
PER_GROUP = 8
MIN_GROUP = 5


def as_written(value: float) -> float:
    """``value`` as samples.csv writes it, so ties break the same way in both."""
    return float(f"{float(value):.9g}")


def most_confident_wrong(labels: np.ndarray, probs: np.ndarray, rows: np.ndarray | None = None, k: int = PER_CLASS) -> list[int]:
    """Rows (of ``rows``, default all) the model got wrong, surest first, ``k`` at most; ties by row."""
    preds = probs.argmax(axis=1)
    candidates = np.arange(len(labels)) if rows is None else np.asarray(rows)
    wrong = [int(r) for r in candidates if preds[r] != labels[r]]
    wrong.sort(key=lambda r: (-as_written(probs[r, preds[r]]), r))
    return wrong[:k]


def choose(run) -> list[dict[str, Any]]:
    """Every gallery of a run, as results.json's ``drilldown`` holds them (without pixels)."""
    ctx = run.context
    if ctx is None or len(ctx.forward) == 0:
        return []
    fwd, classes = ctx.forward, ctx.classes
    probs, labels = fwd.probs, fwd.labels
    galleries = []
    for k, name in enumerate(classes):
        rows = most_confident_wrong(labels, probs, np.flatnonzero(labels == k))
        wrong = int(((probs.argmax(axis=1) != labels) & (labels == k)).sum())
        galleries.append(_gallery(ctx, "performance", f"True class {name}: the most confident mistakes", rows,
                                  f"{wrong} of {int((labels == k).sum())} {name} images misclassified; "
                                  f"shown: up to {PER_CLASS}, surest first", probs))
    check = "fairness" if "fairness" in run.results.get("checks", {}) else "performance"
    for column in ctx.group_columns:
        worst = _worst_group(ctx.group_values(column), labels, probs.argmax(axis=1))
        if worst is not None:
            value, rows_in, accuracy = worst
            rows = most_confident_wrong(labels, probs, rows_in, PER_GROUP)
            galleries.append(_gallery(ctx, check, f"{column} = {value}: the group with the lowest accuracy", rows,
                                      f"accuracy {accuracy:.0%} on {len(rows_in)} images; its mistakes, surest first",
                                      probs))
    galleries.extend(_ood_gallery(run))
    galleries.extend(_check_galleries(run))
    return [g for g in galleries if g["items"]]


def _check_galleries(run) -> list[dict[str, Any]]:
    """The galleries checks return themselves (adversarial pairs, saliency overlays), with
    their pictures' bytes held until ``thumbnails`` files them."""
    out = []
    for check, result in run.check_results.items():
        for gallery in getattr(result, "galleries", None) or []:
            items = [{"row": None, "source": str(it.source), "label": str(it.label), "prediction": str(it.prediction),
                      "confidence": None if it.confidence is None else as_written(it.confidence), "groups": {},
                      "notes": [str(n) for n in it.notes],
                      "pixels": ("check", [(str(caption), data) for caption, data in it.pictures])}
                     for it in gallery.items]
            out.append({"check": check, "title": str(gallery.title), "note": str(gallery.note), "items": items})
    return out


def _worst_group(values: np.ndarray, labels: np.ndarray, preds: np.ndarray):
    best = None
    for value in sorted({str(v) for v in values if str(v) != ""}):
        rows = np.flatnonzero(values.astype(str) == value)
        if len(rows) < MIN_GROUP:
            continue
        accuracy = float((preds[rows] == labels[rows]).mean())
        if best is None or accuracy < best[2]:
            best = (value, rows, accuracy)
    return best


def _gallery(ctx, check: str, title: str, rows: list[int], note: str, probs: np.ndarray) -> dict[str, Any]:
    classes, fwd = ctx.classes, ctx.forward
    items = []
    for r in rows:
        record = ctx.dataset.records[int(fwd.indices[r])]
        pred = int(probs[r].argmax())
        items.append({"row": int(r), "source": record.source, "label": classes[int(fwd.labels[r])],
                      "prediction": classes[pred], "confidence": as_written(probs[r, pred]),
                      "groups": {g: str(record.groups.get(g, "")) for g in ctx.group_columns},
                      "pixels": ("audit", int(fwd.indices[r]))})
    return {"check": check, "title": title, "note": note, "items": items}


def _ood_gallery(run) -> list[dict[str, Any]]:
    ctx = run.context
    result = run.check_results.get("anomaly")
    examples = (result.details.get("ood.most_confident") if result is not None else None) or []
    if not examples or not ctx.ood:
        return []
    items = [{"row": None, "source": e["source"], "label": "(out of distribution)", "prediction": e["prediction"],
              "confidence": as_written(e["confidence"]), "groups": {}, "pixels": ("ood", int(e["index"]))}
             for e in examples]
    return [{"check": "anomaly", "title": "Your OOD images the model was surest about", "items": items,
             "note": "images from --ood, which the model should not be trusted on, ranked by its confidence (MSP)"}]


def thumbnails(run, galleries: list[dict[str, Any]]) -> dict[str, bytes]:
    """JPEG thumbnails of every gallery item, keyed by their file name; each item gets ``file``."""
    ctx = run.context
    ood = ctx.open_dataset(ctx.ood) if ctx.ood and ctx.open_dataset is not None and any(
        i["pixels"][0] == "ood" for g in galleries for i in g["items"]) else None
    files: dict[str, bytes] = {}
    for g, gallery in enumerate(galleries):
        for i, item in enumerate(gallery["items"]):
            kind, index = item.pop("pixels")
            if kind == "check":
                _file_pictures(files, item, f"figures/thumbs/{_slug(gallery['check'])}-{g}-{i}", index)
                continue
            name = f"figures/thumbs/{kind}-{index}.jpg"
            if name not in files:
                data = _thumbnail(ctx.dataset if kind == "audit" else ood, index)
                if data is None:
                    continue
                files[name] = data
            item["file"] = name
    return files


def _thumbnail(dataset, index: int) -> bytes | None:
    try:
        arr, _grey = dataset.decoded(index)
    except Exception:  # noqa: BLE001 - an image that cannot be shown leaves its item without a picture
        return None
    image = Image.fromarray((np.clip(np.asarray(arr), 0, 1) * 255).astype(np.uint8))
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=82, optimize=True)
    return buf.getvalue()


# a check's pictures are kept in the format it chose; anything else is left out
_KINDS = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"RIFF", ".webp"))


def _file_pictures(files: dict[str, bytes], item: dict[str, Any], stem: str, pictures) -> None:
    item["pictures"] = []
    for j, (caption, data) in enumerate(pictures):
        ext = next((e for magic, e in _KINDS if bytes(data[:4]).startswith(magic)), None)
        if ext is None or (ext == ".webp" and bytes(data[8:12]) != b"WEBP"):
            continue
        name = f"{stem}-{j}{ext}"
        files[name] = bytes(data)
        item["pictures"].append({"caption": caption, "file": name})
    if item["pictures"]:
        item["file"] = item["pictures"][0]["file"]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(text).lower())[:40] or "x"
