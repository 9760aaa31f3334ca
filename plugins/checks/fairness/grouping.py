"""From a column of group values to groups: missing values, numeric binning, intersections."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcaudit import InputError

MISSING = "(missing)"
MISSING_TOKENS = {"", "nan", "none", "na", "n/a", "null", "unknown", "?"}


@dataclass
class Grouping:
    """Each row's group as an index into ``names``, -1 for a missing value."""

    codes: np.ndarray
    names: list[str]
    binned: str = ""  # how a numeric column was cut, for the table note


def group_column(values: np.ndarray, column: str, quantile_bins: int, edges: list[float] | None) -> Grouping:
    """Groups of one column. A numeric column with more distinct values than ``quantile_bins``
    (or with explicit ``edges``) is cut into ranges; anything else keeps its values."""
    text = np.array([str(v).strip() for v in values], dtype=object)
    missing = np.array([t.lower() in MISSING_TOKENS for t in text])
    numbers = _as_numbers(text[~missing])
    if edges is not None and numbers is None:
        raise InputError(f"fairness.bin_edges: column {column!r} is not numeric")
    distinct = np.unique(text[~missing])
    if numbers is not None and (edges is not None or len(distinct) > quantile_bins):
        return bin_numeric(text, missing, numbers, edges, quantile_bins)
    if numbers is not None:  # a few numeric codes: order them as numbers, not as text
        distinct = sorted(distinct, key=float)
    names = list(distinct)
    lookup = {name: i for i, name in enumerate(names)}
    codes = np.array([-1 if m else lookup[t] for t, m in zip(text, missing)], dtype=np.int64)
    return Grouping(codes, names)


def _as_numbers(text: np.ndarray) -> np.ndarray | None:
    try:
        out = np.array([float(t) for t in text], dtype=np.float64)
    except ValueError:
        return None
    return out if len(out) and np.isfinite(out).all() else None


def bin_numeric(text: np.ndarray, missing: np.ndarray, numbers: np.ndarray, edges: list[float] | None,
                n_quantiles: int) -> Grouping:
    """Ranges cut at ``edges``, or at the quantiles when none are given; ranges nobody falls
    in are dropped."""
    if edges is not None:
        cuts, how = np.asarray(edges, dtype=np.float64), "cut at the given edges"
    else:
        cuts = np.unique(np.quantile(numbers, np.linspace(0, 1, n_quantiles + 1)[1:-1]))
        how = f"cut at its {n_quantiles}-quantiles"
    names = ([f"<{_number_text(cuts[0])}"] + [f"{_number_text(a)}-{_number_text(b)}" for a, b in zip(cuts, cuts[1:])]
             + [f">={_number_text(cuts[-1])}"])
    codes = np.full(len(text), -1, dtype=np.int64)
    codes[~missing] = np.searchsorted(cuts, numbers, side="right")
    used = sorted(set(codes[codes >= 0].tolist()))
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    codes = np.where(codes >= 0, remap[np.maximum(codes, 0)], -1)
    cut_list = ", ".join(_number_text(c) for c in cuts)
    return Grouping(codes, [names[i] for i in used], f"{how} ({cut_list}); a-b means from a up to, not including, b")


def _number_text(x: float) -> str:
    return f"{x:.4g}"


def intersect(first: Grouping, second: Grouping) -> Grouping:
    """Groups ``x&y`` of the rows with a value in both columns (only combinations that occur)."""
    both = (first.codes >= 0) & (second.codes >= 0)
    width = len(second.names)
    combined = np.where(both, first.codes * width + second.codes, -1)
    present = sorted(set(combined[both].tolist()))
    lookup = {c: i for i, c in enumerate(present)}
    codes = np.array([lookup.get(c, -1) for c in combined], dtype=np.int64)
    names = [f"{first.names[c // width]}&{second.names[c % width]}" for c in present]
    return Grouping(codes, names)
