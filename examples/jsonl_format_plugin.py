"""An example data-format plugin: a JSON Lines manifest, one image per line.

    {"path": "img/001.png", "label": "melanoma", "subject": "P17", "groups": {"sex": "F", "site": "A"}}

It shows everything a data format meets: claiming only its own specs (return None for the
rest), the classes the prompts fix (``request.options["classes"]``), an out-of-distribution
set that has no labels (``request.role == "ood"``), the subgroup columns the user asked for
(``request.groups``), errors that name the file and line, and the ``AuditDataset``
constructor. Decoding and the model's preprocessing stay with the host.

    mcaudit run -p examples/jsonl_format_plugin.py --model demo --data manifest.jsonl --group sex
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mcaudit import AuditDataset, FormatInfo, InputError, Record, hookimpl


@hookimpl
def mcaudit_register_data_formats(register):
    register(FormatInfo("jsonl", ("FILE.jsonl",), "JSON Lines manifest: path, label, optional subject and groups"))


@hookimpl
def mcaudit_load_dataset(spec, request):
    path = Path(spec)
    if path.suffix.lower() != ".jsonl":
        return None  # not ours: the next format is asked
    if not path.is_file():
        raise InputError(f"{spec}: no such file")
    raw = path.read_bytes()
    rows = []
    for line_no, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {line_no}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not row.get("path"):
            raise InputError(f"{path} line {line_no}: needs an object with a 'path'")
        if request.role == "ood":
            row.setdefault("label", "unlabelled")  # OOD images are never scored against labels
        elif not row.get("label"):
            raise InputError(f"{path} line {line_no}: no label")
        rows.append((line_no, row))
    if not rows:
        raise InputError(f"{path}: lists no images")
    # The prompts fix the classes (and their order) when they name them.
    classes = list(request.options.get("classes") or sorted({r["label"] for _, r in rows}))
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for line_no, row in rows:
        if row["label"] not in index:
            raise InputError(f"{path} line {line_no}: label {row['label']!r} is not a class ({', '.join(classes)})")
        groups = row.get("groups") or {}
        missing = [g for g in request.groups if g not in groups]
        if missing:
            raise InputError(f"--group {missing[0]}: {path} line {line_no} has no such group")
        image = Path(row["path"])
        records.append(Record(
            source=row["path"], label=index[row["label"]], path=image if image.is_absolute() else path.parent / image,
            groups={g: str(groups[g]) for g in request.groups}, subject=row.get("subject") or None,
        ))
    return AuditDataset(
        spec=spec, records=records, classes=classes, image_size=request.image_size,
        fingerprint=hashlib.sha256(raw).hexdigest(), format_name="jsonl",
        group_columns=tuple(request.groups), options=request.options,
    )
