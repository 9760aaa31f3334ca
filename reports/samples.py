"""samples.csv: one row per scored image with its label, prediction and class probabilities."""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any

import numpy as np


def samples_csv(run) -> str:
    ctx = run.context
    fwd = ctx.forward
    classes = ctx.classes
    probs = fwd.probs
    preds = fwd.preds
    group_cols = list(ctx.group_columns)
    extra: list[tuple[str, Any]] = []
    for check_name, result in run.check_results.items():
        for col, values in result.per_image.items():
            values = list(values)
            if len(values) != len(fwd):
                continue
            extra.append((f"{check_name}.{col}", values))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "prediction", "correct"] + [f"p_{c}" for c in classes]
                    + [text_cell(g) for g in group_cols] + [text_cell(n) for n, _ in extra])
    records = ctx.dataset.records
    for row, index in enumerate(fwd.indices):
        rec = records[index]
        writer.writerow(
            [text_cell(rec.source), text_cell(classes[fwd.labels[row]]), text_cell(classes[preds[row]]),
             int(preds[row] == fwd.labels[row])]
            + [f"{p:.9g}" for p in probs[row]]  # 9 digits give float32 back exactly
            + [text_cell(rec.groups.get(g, "")) for g in group_cols]
            + [_cell(values[row]) for _, values in extra]
        )
    return buf.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{float(value):.9g}"
    return text_cell(str(value))


# What a spreadsheet reads as the start of a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def text_cell(text: str) -> str:
    """A text cell from the user's data (a path, label or subgroup value), safe to open in a
    spreadsheet: one that would start a formula gets a leading single quote, as OWASP
    recommends for CSV exports. A plain number such as -3 or +1.5e2 stays as it is; it
    computes nothing."""
    text = str(text)
    if text.startswith(FORMULA_STARTS) and not NUMBER.fullmatch(text):
        return "'" + text
    return text


SHOWN_ROWS = 2000


def samples_table(text: str, n_classes: int, group_columns: list[str], limit: int = SHOWN_ROWS) -> dict[str, Any]:
    """The page's images table from samples.csv: image, true class, prediction, confidence,
    correct and the group columns, mistakes first (surest first), then the rest."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    if header[:4] != ["path", "label", "prediction", "correct"] or len(header) < 4 + n_classes + len(group_columns):
        return {"columns": [], "rows": [], "shown": 0, "total": 0}
    probs = range(4, 4 + n_classes)
    groups = range(4 + n_classes, 4 + n_classes + len(group_columns))
    rows = []
    for cells in reader:
        confidence = max((float(cells[i]) for i in probs if cells[i] != ""), default=float("nan"))
        rows.append([cells[0], cells[1], cells[2], round(confidence, 4), "yes" if cells[3] == "1" else "no"]
                    + [cells[i] for i in groups])
    rows.sort(key=lambda r: (r[4] == "yes", -r[3] if r[3] == r[3] else 0.0))
    columns = ["image", "true class", "prediction", "confidence", "correct"] + [header[i] for i in groups]
    return {"columns": columns, "rows": rows[:limit], "shown": min(limit, len(rows)), "total": len(rows)}
