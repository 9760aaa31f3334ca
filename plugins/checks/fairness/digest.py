"""What a page with many groups shows first: the columns in order of concern, the lowest-accuracy
groups across every column and intersection in one table, each column's groups worst first,
and one caveat per kind instead of one per column.

Four group columns and their six intersections give ten columns and a hundred groups, most of
them too small to compare; listed column by column they drown the few groups a reader should
look at. Nothing is dropped: every group stays in its column's table and in ``details``.
"""

from __future__ import annotations

import numpy as np

from mcaudit import Table

from .columns import ColumnResult
from .settings import Settings

WORST_SHOWN = 10
NAMED_SMALL = 6  # beyond this many small groups a caveat counts them per column instead of naming them


def column_order(columns: list[ColumnResult]) -> list[ColumnResult]:
    """Columns with a measured gap first, largest accuracy gap first; then the others, by
    their lowest group accuracy."""
    def key(column: ColumnResult):
        gap = column.gaps["accuracy_gap"]
        lowest = np.nanmin(column.values[:, 0]) if np.isfinite(column.values[:, 0]).any() else np.inf
        return (0, -gap, column.name) if np.isfinite(gap) else (1, lowest, column.name)
    return sorted(columns, key=key)


def group_order(column: ColumnResult) -> list[int]:
    """A column's groups worst first: compared groups by accuracy, then those too small to
    decide by accuracy, then groups whose accuracy is undefined."""
    acc = column.values[:, 0]
    return sorted(range(len(column.grouping.names)),
                  key=lambda g: (not column.in_gaps[g], not np.isfinite(acc[g]), np.nan_to_num(acc[g], nan=2.0), g))


def has_gaps(column: ColumnResult) -> bool:
    return int(column.in_gaps.sum()) >= 2


def worst_groups_table(columns: list[ColumnResult], settings: Settings) -> Table:
    """The groups of every column and intersection whose accuracy is most clearly low: lowest
    upper 95% bound first, so one wrong image in a group of one does not outrank a large
    group that is reliably worse."""
    found = []
    for column in columns:
        for g in range(len(column.grouping.names)):
            lo, hi = column.value_ci[g, 0] if column.value_ci is not None else (np.nan, np.nan)
            if np.isfinite(column.values[g, 0]):
                found.append((np.nan_to_num(hi, nan=1.0), column.values[g, 0], column, g, lo, hi))
    found.sort(key=lambda t: (t[0], t[1], t[2].name, t[3]))
    rows = []
    for _, accuracy, column, g, lo, hi in found[:WORST_SHOWN]:
        rows.append([column.name, column.grouping.names[g], int(column.sizes[g]), round(float(accuracy), 3),
                     f"{lo:.3f} to {hi:.3f}" if np.isfinite(lo) else "",
                     "compared" if column.in_gaps[g] else f"too small to decide (n < {settings.min_group_size})"])
    more = len(found) - len(rows)
    return Table(
        "Lowest-accuracy groups across all columns", ["column", "group", "images", "accuracy", "95% CI", "decision"], rows,
        note=("Ordered by the upper end of the accuracy's 95% interval, lowest first: the groups most clearly "
              "below the others, however small. "
              + (f"The first {len(rows)} of {len(found)} groups in {len(columns)} columns"
                 + (" (intersections named a&b)" if any("&" in c.name for c in columns) else "")
                 + "; every group is in its column's table." if more else "")),
    )


def caveats(columns: list[ColumnResult], settings: Settings) -> list[str]:
    """One caveat per kind (small groups, no comparison possible, missing values) for all columns."""
    out = []
    small = {c.name: c.small_groups() for c in columns if c.small_groups()}
    if small:
        total = sum(len(g) for g in small.values())
        if total <= NAMED_SMALL:
            listed = "; ".join(f"{name}: " + ", ".join(f"{c.grouping.names[g]} (n={int(c.sizes[g])})" for g in groups)
                               for name, groups, c in ((n, gs, _named(columns, n)) for n, gs in small.items()))
        else:
            listed = ", ".join(f"{name} {len(groups)}" for name, groups in small.items())
        out.append(f"{total} group(s) have fewer than {settings.min_group_size} images ({listed}): shown with their "
                   "intervals, marked too small to decide, and left out of the gaps")
    without = [c.name for c in columns if not has_gaps(c)]
    if without:
        out.append(f"No gaps for {', '.join(without)}: fewer than two groups with at least "
                   f"{settings.min_group_size} images in each")
    missing = [f"{c.name}: {c.missing} image(s) without a value" for c in columns if c.missing]
    if missing:
        out.append("; ".join(missing) + "; shown as their own row and left out of the gaps")
    return out


def _named(columns: list[ColumnResult], name: str) -> ColumnResult:
    return next(c for c in columns if c.name == name)
