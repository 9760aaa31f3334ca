"""Which modality the audited images are: the ``modality`` parameter, else a manifest column,
else the DICOM Modality tag, else the MedMNIST file's name, else a guess from colour."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .severities import MODALITIES

# DICOM Modality (0008,0060) codes, PS3.3 C.7.3.1.1.1
DICOM_CODES = {
    "CR": "radiography", "DX": "radiography", "MG": "radiography", "RF": "radiography", "XA": "radiography",
    "IO": "radiography", "PX": "radiography", "CT": "ct", "PT": "ct", "MR": "mri", "US": "ultrasound",
    "IVUS": "ultrasound", "SM": "pathology", "XC": "dermoscopy", "DMS": "dermoscopy",
}
MEDMNIST = {
    "pneumoniamnist": "radiography", "chestmnist": "radiography", "organamnist": "ct", "organcmnist": "ct",
    "organsmnist": "ct", "nodulemnist3d": "ct", "dermamnist": "dermoscopy", "pathmnist": "pathology",
    "bloodmnist": "pathology", "tissuemnist": "pathology", "breastmnist": "ultrasound",
}
SYNONYMS = {
    "x-ray": "radiography", "xray": "radiography", "cxr": "radiography", "radiograph": "radiography",
    "mr": "mri", "mammography": "radiography", "histology": "pathology", "histopathology": "pathology",
    "dermatology": "dermoscopy", "skin": "dermoscopy", "us": "ultrasound",
} | {code.lower(): m for code, m in DICOM_CODES.items()}


def normalise(value: str) -> str | None:
    v = str(value).strip().lower()
    if v in MODALITIES:
        return v
    return SYNONYMS.get(v)


def _majority(values) -> str | None:
    counted = Counter(m for m in (normalise(v) for v in values if v) if m)
    return counted.most_common(1)[0][0] if counted else None


def _dicom_modality(records, limit: int = 16) -> str | None:
    paths = [r.path for r in records if r.path is not None and Path(r.path).suffix.lower() in (".dcm", ".dicom", "")]
    codes = []
    for path in paths[:limit]:
        try:
            import pydicom

            codes.append(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", "")))
        except Exception:  # not DICOM after all, or unreadable: the next clue decides
            continue
    return _majority(codes)


def detect(ctx, requested: str) -> tuple[str, str]:
    """(modality, where it came from)."""
    if requested != "auto":
        return requested, "the modality parameter"
    records = [ctx.dataset.records[int(i)] for i in ctx.forward.indices]
    column = next((c for c in ("modality", "Modality") if any(c in r.groups for r in records)), None)
    if column:
        found = _majority(r.groups.get(column, "") for r in records)
        if found:
            return found, f"the manifest's {column} column"
    found = _dicom_modality(records)
    if found:
        return found, "the DICOM Modality tag"
    stem = Path(str(getattr(ctx.dataset, "spec", ""))).stem.split("_")[0].lower()
    if stem in MEDMNIST:
        return MEDMNIST[stem], f"the MedMNIST file name ({stem})"
    if ctx.is_grey:
        return "radiography", "a guess: the images are grey and name no modality (set shift.modality)"
    return "dermoscopy", "a guess: the images are in colour and name no modality (set shift.modality)"
