"""samples.csv: one row per scored image with its label, prediction and class probabilities."""

from __future__ import annotations

import csv
import io
import math
from typing import Any


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
    writer.writerow(["path", "label", "prediction", "correct"] + [f"p_{c}" for c in classes] + group_cols + [n for n, _ in extra])
    records = ctx.dataset.records
    for row, index in enumerate(fwd.indices):
        rec = records[index]
        writer.writerow(
            [rec.source, classes[fwd.labels[row]], classes[preds[row]], int(preds[row] == fwd.labels[row])]
            + [f"{p:.8g}" for p in probs[row]]
            + [rec.groups.get(g, "") for g in group_cols]
            + [_cell(values[row]) for _, values in extra]
        )
    return buf.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.8g}"
    return str(value)
