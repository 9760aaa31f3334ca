"""One compared column: its groups measured, groups too small to compare marked, the gaps
among the rest, and (filled in by the inference step) their intervals and p-values."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engine import GROUP_METRICS, Outcomes, gap_statistics, group_counts, measure_groups, pooled_auroc
from .grouping import MISSING, Grouping
from .settings import Settings


@dataclass
class ColumnResult:
    name: str
    grouping: Grouping
    sizes: np.ndarray
    in_gaps: np.ndarray  # per group: large enough to be compared
    values: np.ndarray  # (G, metrics), all groups incl. small ones
    rates: np.ndarray  # (G, positives, 3)
    counts: dict[str, tuple[np.ndarray, np.ndarray]]  # proportion -> (successes, trials) per group
    gaps: dict[str, float]
    warnings: list[str]
    missing: int
    value_ci: np.ndarray | None = None  # (G, metrics, 2)
    gap_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    gap_p: dict[str, float] = field(default_factory=dict)  # per-metric permutation p-values (not adjusted)
    p_value: float = float("nan")
    p_value_holm: float = float("nan")
    largest_metric: str = ""
    group_reasons: list[dict[str, str]] = field(default_factory=list)  # per group: metric -> why undefined

    @property
    def n_compared(self) -> int:
        return int(self.sizes[self.in_gaps].sum())

    @property
    def compared(self) -> np.ndarray:
        """Indices of the groups large enough to enter the gaps."""
        return np.flatnonzero(self.in_gaps)

    def small_groups(self) -> list[int]:
        return [g for g in range(len(self.sizes)) if not self.in_gaps[g] and self.sizes[g] > 0]


def measure_column(outcomes: Outcomes, name: str, grouping: Grouping, settings: Settings) -> ColumnResult:
    """Every group's metrics and the gaps among the groups of at least ``min_group_size``."""
    codes, names = grouping.codes, grouping.names
    n_groups = len(names)
    members = [np.flatnonzero(codes == g) for g in range(n_groups)]
    sizes = np.array([len(m) for m in members])
    in_gaps = sizes >= settings.min_group_size
    rows = np.concatenate(members) if members else np.array([], dtype=np.int64)
    values, rates = measure_groups(outcomes, rows, np.repeat(np.arange(n_groups), sizes), n_groups, settings.macro)
    rows_compared = np.concatenate([members[g] for g in np.flatnonzero(in_gaps)] or [np.array([], dtype=np.int64)])
    gaps = gap_statistics(values[in_gaps], rates[in_gaps], pooled_auroc(outcomes, rows_compared))
    missing = int((codes < 0).sum())
    column = ColumnResult(name, grouping, sizes, in_gaps, values, rates,
                          group_counts(outcomes, codes, n_groups, settings.macro), gaps,
                          column_warnings(name, names, sizes, in_gaps, missing, settings.min_group_size), missing)
    column.group_reasons = [undefined_reasons(values[g], settings) for g in range(n_groups)]
    gap_values = {m: gaps[f"{m}_gap"] for m in GROUP_METRICS if np.isfinite(gaps[f"{m}_gap"])}
    column.largest_metric = max(gap_values, key=gap_values.get) if gap_values else ""
    return column


def column_warnings(name: str, group_names: list[str], sizes: np.ndarray, in_gaps: np.ndarray, missing: int,
                    min_group_size: int) -> list[str]:
    warnings = []
    small = [f"{g} (n={k})" for g, k, ok in zip(group_names, sizes, in_gaps) if not ok]
    if small:
        warnings.append(f"{name}: group(s) {', '.join(small)} have fewer than {min_group_size} images: shown with "
                        "their intervals, marked too small to decide, and not compared in the gaps")
    if missing:
        warnings.append(f"{name}: {missing} image(s) without a value; shown as {MISSING}, left out of the gaps")
    if in_gaps.sum() < 2:
        warnings.append(f"{name}: fewer than two groups with at least {min_group_size} images, so no gaps")
    return warnings


def undefined_reasons(values: np.ndarray, settings: Settings) -> dict[str, str]:
    """Why each undefined metric of one group (values (metrics,)) is undefined."""
    why = {
        "auroc": "only one class among the group's images",
        "tpr": f"no images of {settings.positive_label!r} in the group",
        "fpr": f"no images other than {settings.positive_label!r} in the group",
        "selection_rate": "averaged over all classes it is always 1/K" if settings.macro else "the group is empty",
        "balanced_accuracy": "the group is empty", "accuracy": "the group is empty", "ece": "the group is empty",
    }
    return {m: why[m] for m, v in zip(GROUP_METRICS, values) if not np.isfinite(v)}
