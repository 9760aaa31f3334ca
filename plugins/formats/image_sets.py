"""Built-in data formats: CSV manifests, ImageFolder trees, MedMNIST .npz, DICOM, phantoms.

Registered through the same hooks a third-party data-format plugin implements.
"""

from __future__ import annotations

import csv
import hashlib
import zipfile
from pathlib import Path

import numpy as np

from mcaudit.data.dataset import AuditDataset, Record
from mcaudit.data.images import MAX_IMAGE_PIXELS, UnreadableImage, is_dicom
from mcaudit.plugins.formats.medmnist_names import MEDMNIST_CLASSES
from mcaudit.errors import InputError
from mcaudit.hookimpl import hookimpl
from mcaudit.hook_types import DataRequest, FormatInfo

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"}
RESERVED_COLUMNS = {"path", "label", "mask", "boxes"}
# The patient/subject id, under the first of these names the manifest has: images of one
# subject are resampled together in the intervals (their errors are correlated).
SUBJECT_COLUMNS = ("subject", "subject_id", "patient", "patient_id")


@hookimpl
def mcaudit_register_data_formats(register):
    register(FormatInfo("csv", ("manifest.csv",), f"CSV manifest: path (relative to the CSV), label, optional mask, boxes (x,y,w,h;... in pixels), subject (or subject_id, patient, patient_id: the patient id, so that one patient's images count as one unit in the 95% intervals; a subgroup only when named with --group) and subgroup columns; images may be PNG, JPEG, TIFF or DICOM; an image over {MAX_IMAGE_PIXELS // 10**6} megapixels is skipped and counted (--data-option max_image_pixels=N)"))
    register(FormatInfo("imagefolder", ("FOLDER/CLASS/IMAGE",), f"a folder with one sub-folder of images per class; an image over {MAX_IMAGE_PIXELS // 10**6} megapixels is skipped and counted (--data-option max_image_pixels=N)"))
    register(FormatInfo("medmnist", ("FILE.npz",), "MedMNIST .npz; pick the split with --split (train, val, test)"))
    register(FormatInfo("dicom", ("FILE.dcm in a manifest or folder",), "DICOM via pydicom: rescale slope/intercept, VOI window, MONOCHROME1 inverted; multi-frame needs --data-option dicom_frame=N|middle"))
    register(FormatInfo("phantom", ("phantom:", "phantom:n=400,seed=0"), "synthetic chest-radiograph phantoms with and without focal opacities, with site and sex attributes (the demo data)"))


@hookimpl
def mcaudit_load_dataset(spec: str, request: DataRequest) -> AuditDataset | None:
    if spec.startswith("phantom:") or spec == "phantom":
        from mcaudit.demo.phantoms import PhantomDataset

        return PhantomDataset.from_spec(spec, request)
    path = Path(spec)
    if ":" in spec.split("/")[0] and not path.exists():
        return None
    if not path.exists():
        raise InputError(f"{_flag(request)} {spec}: no such file or folder")
    if path.is_dir():
        return load_image_folder(path, request)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_manifest(path, request)
    if suffix == ".npz":
        return load_medmnist(path, request)
    if suffix in IMAGE_SUFFIXES or is_dicom(path):
        raise InputError(f"{_flag(request)} {spec}: a single image has no label; list it in a CSV manifest with path,label")
    return None


def _flag(request: DataRequest) -> str:
    """The option that named the data, for messages: --ood for an out-of-distribution set."""
    return "--ood" if request.role == "ood" else "--data"


def _known_classes(request: DataRequest) -> list[str] | None:
    classes = request.options.get("classes")
    return list(classes) if classes else None


def parse_boxes(text: str, where: str) -> tuple[tuple[float, float, float, float], ...]:
    """``x,y,w,h;x,y,w,h`` (pixels of the source image, top-left corner first) as tuples."""
    boxes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            x, y, w, h = (float(v) for v in part.split(","))
        except ValueError:
            raise InputError(f"{where}: boxes {text!r}: expected x,y,width,height in pixels, boxes separated by ';'") from None
        if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
            raise InputError(f"{where}: boxes {text!r}: each box needs a finite position and a positive width and height")
        boxes.append((x, y, w, h))
    return tuple(boxes)


def load_manifest(path: Path, request: DataRequest) -> AuditDataset:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    reader = csv.DictReader(text.splitlines())
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise InputError(f"{path} line {reader.reader.line_num}: {exc}") from None
    subject_column, group_columns = _manifest_columns(path, columns, request)
    rows = _manifest_rows(path, reader, columns, request)
    classes = _known_classes(request) or sorted({r["label"] for _, r in rows}, key=_natural)
    records = [_manifest_record(path, line_no, row, classes, group_columns, subject_column) for line_no, row in rows]
    return AuditDataset(
        spec=str(path),
        records=records,
        classes=classes,
        image_size=request.image_size,
        fingerprint=hashlib.sha256(raw).hexdigest(),
        format_name="csv",
        group_columns=tuple(request.groups),
        options=request.options,
        warnings=_duplicate_warnings(rows, path) + _class_warnings(records, classes, request),
    )


def _manifest_columns(path: Path, columns: list[str], request: DataRequest) -> tuple[str | None, list[str]]:
    """The subject column (if any) and the subgroup columns; the columns a request needs must exist."""
    # An out-of-distribution set is never scored against labels, so it may have none.
    needed_columns = ("path",) if request.role == "ood" else ("path", "label")
    for needed in needed_columns:
        if needed not in columns:
            raise InputError(f"{path}: the manifest needs a '{needed}' column (found: {', '.join(columns) or 'none'})")
    subject_column = next((c for c in SUBJECT_COLUMNS if c in columns), None)
    group_columns = [c for c in columns if c not in RESERVED_COLUMNS and (c != subject_column or c in request.groups)]
    for g in request.groups:
        if g not in columns or g in RESERVED_COLUMNS:
            choices = group_columns + [subject_column] if subject_column and subject_column not in group_columns else group_columns
            raise InputError(f"--group {g}: {path} has no such column (subgroup columns: {', '.join(choices) or 'none'})")
    return subject_column, group_columns


def _manifest_rows(path: Path, reader: csv.DictReader, columns: list[str], request: DataRequest) -> list[tuple[int, dict[str, str]]]:
    rows = []
    for line_no, row in _csv_rows(reader, path):
        if None in row:  # csv's place for fields beyond the header's
            raise InputError(
                f"{path} line {line_no}: {len(columns) + len(row[None])} fields for {len(columns)} columns; "
                'quote values that contain commas, e.g. "10,20,30,40" in the boxes column')
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get("path"):
            raise InputError(f"{path} line {line_no}: empty path")
        if request.role == "ood":
            row["label"] = row.get("label") or "unlabelled"
        if row.get("label", "") == "":
            raise InputError(f"{path} line {line_no}: empty label")
        rows.append((line_no, row))
    if not rows:
        raise InputError(f"{path}: the manifest lists no images")
    return rows


def _manifest_record(path: Path, line_no: int, row: dict[str, str], classes: list[str], group_columns: list[str],
                     subject_column: str | None) -> Record:
    label = row["label"]
    if label not in classes:
        raise InputError(f"{path} line {line_no}: label {label!r} is not a known class (known: {', '.join(classes)})")
    base = path.parent
    image_path = Path(row["path"])
    mask = row.get("mask") or None
    if mask:
        mask = str(Path(mask) if Path(mask).is_absolute() else base / mask)
    return Record(
        source=row["path"],
        label=classes.index(label),
        groups={c: row.get(c, "") for c in group_columns},
        mask=mask,
        path=image_path if image_path.is_absolute() else base / image_path,
        boxes=parse_boxes(row.get("boxes", ""), f"{path} line {line_no}"),
        subject=(row.get(subject_column) or None) if subject_column else None,
    )


def _duplicate_warnings(rows: list[tuple[int, dict[str, str]]], path: Path) -> list[str]:
    """Rows that list the same image again: each copy is scored as another image, which weights
    it twice and narrows every interval as if it were new evidence."""
    first: dict[str, int] = {}
    repeats: list[tuple[str, int, int]] = []
    for line_no, row in rows:
        key = str(Path(row["path"]))
        if key in first:
            repeats.append((row["path"], first[key], line_no))
        else:
            first[key] = line_no
    if not repeats:
        return []
    name, a, b = repeats[0]
    return [f"{path}: {len(repeats)} row(s) repeat an image already listed (first: {name} on lines {a} and {b}); "
            "each copy is scored as another image, so it counts twice and the intervals are too narrow"]


def _class_warnings(records: list[Record], classes: list[str], request: DataRequest) -> list[str]:
    """Data with images of one class only: nothing that compares classes can be measured."""
    if request.role != "audit":
        return []  # an out-of-distribution set's labels are never used
    present = sorted({r.label for r in records})
    if len(present) != 1:
        return []
    others = f" of the {len(classes)} classes" if len(classes) > 1 else ""
    return [f"only class {classes[present[0]]!r}{others} has images: accuracy cannot be told from "
            "always predicting it, and AUROC, balanced accuracy and per-group gaps are undefined"]


def _csv_rows(reader: csv.DictReader, path: Path):
    """(line number, row) pairs; csv's own errors (a field over csv.field_size_limit(), 128 KiB,
    which no path, label or subgroup value needs) become one line naming the line."""
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            # DictReader counts a line only once it parses; its inner reader counts it as read.
            raise InputError(f"{path} line {reader.reader.line_num}: {exc}") from None
        yield reader.line_num, row


def load_image_folder(path: Path, request: DataRequest) -> AuditDataset:
    if request.groups:
        raise InputError(f"--group {request.groups[0]}: an image folder has no subgroup columns; use a CSV manifest")
    class_dirs = sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: _natural(d.name))
    if not class_dirs:
        raise InputError(f"{_flag(request)} {path}: expected one sub-folder per class (FOLDER/CLASS/IMAGE), found none")
    known = _known_classes(request)
    classes = known or [d.name for d in class_dirs]
    index = {c: i for i, c in enumerate(classes)}
    records = []
    listing = hashlib.sha256()
    for d in class_dirs:
        if d.name not in index:
            raise InputError(f"{_flag(request)} {path}: folder {d.name!r} is not a known class (known: {', '.join(classes)})")
        for f in sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if f.suffix.lower() not in IMAGE_SUFFIXES and not is_dicom(f):
                continue
            rel = f.relative_to(path).as_posix()
            listing.update(rel.encode() + b"\0" + str(f.stat().st_size).encode() + b"\n")
            records.append(Record(source=rel, label=index[d.name], path=f))
    if not records:
        raise InputError(f"{_flag(request)} {path}: no images found in the class folders")
    return AuditDataset(
        spec=str(path),
        records=records,
        classes=classes,
        image_size=request.image_size,
        fingerprint=listing.hexdigest(),
        format_name="imagefolder",
        options=request.options,
        warnings=_class_warnings(records, classes, request),
    )


class NpzDataset(AuditDataset):
    def __init__(self, images: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.images = images

    def load_pixels(self, index: int):
        from mcaudit.data.images import to_rgb

        img = self.images[index]
        if img.dtype == np.uint8:
            arr = img.astype(np.float32) / 255.0
        elif img.dtype == np.uint16:
            arr = img.astype(np.float32) / 65535.0
        else:
            arr = img.astype(np.float32)
            if arr.min() < 0 or arr.max() > 1:
                raise UnreadableImage(f"{self.records[index].source}: float pixels outside [0, 1]")
        return to_rgb(arr)


def load_medmnist(path: Path, request: DataRequest) -> AuditDataset:
    if request.groups:
        raise InputError(f"--group {request.groups[0]}: a MedMNIST file has no subgroup columns")
    split = request.split
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    with npz:
        key_img, key_lab = f"{split}_images", f"{split}_labels"
        if key_img not in npz.files or key_lab not in npz.files:
            splits = sorted({k.rsplit("_", 1)[0] for k in npz.files if k.endswith("_images")})
            raise InputError(f"{path}: no split {split!r} (splits: {', '.join(splits) or 'none'}); choose one with --split")
        images = _npz_array(npz, key_img, path)
        labels = _npz_array(npz, key_lab, path)
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise InputError(f"{path}: multi-label MedMNIST sets are not supported (labels have {labels.shape[1]} columns)")
    if labels.size == 0 or len(images) == 0:
        raise InputError(f"{path}: split {split!r} is empty ({key_img} has shape {images.shape}, "
                         f"{key_lab} has shape {labels.shape}); choose another with --split")
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))):
            raise InputError(f"{path}: {key_lab} holds {labels.dtype} values, expected whole class indices")
    if images.dtype.kind not in "uif":
        raise InputError(f"{path}: {key_img} holds {images.dtype} values, expected uint8, uint16 or float pixels")
    labels = labels.reshape(-1).astype(np.int64)
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise InputError(f"{path}: {key_img} has shape {images.shape}, expected N x H x W (x C) with N = {len(labels)}")
    known = _known_classes(request)
    stem = path.stem.split("_")[0].lower()
    classes = known or MEDMNIST_CLASSES.get(stem) or [f"class {i}" for i in range(int(labels.max()) + 1)]
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"{path}: {key_lab}[{i}] = {labels[i]} is not a known class index (known: "
            + ", ".join(f"{k}={c}" for k, c in enumerate(classes)) + ")"
        )
    records = [Record(source=f"{path.name}#{split}/{i}", label=int(lab)) for i, lab in enumerate(labels)]
    warnings = _class_warnings(records, classes, request)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return NpzDataset(
        images,
        spec=str(path),
        records=records,
        classes=classes,
        image_size=request.image_size,
        fingerprint=digest,
        format_name="medmnist",
        options=request.options,
        warnings=warnings,
    )


def _npz_array(npz, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # ValueError includes object arrays, which need pickle: untrusted files never get it.
        raise InputError(f"{path}: {key} cannot be read ({type(exc).__name__}: {exc})") from None


def _natural(text: str):
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]
