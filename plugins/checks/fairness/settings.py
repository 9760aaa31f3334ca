"""The fairness check's parameters, their declarative bounds, and the settings a run derives
from them once the classes and group columns are known."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mcaudit import InputError, Param


def _open_unit_interval(value: float) -> None:
    if not 0 < value < 1:
        raise ValueError("must be between 0 and 1")


def parse_edge_item(item: Any) -> tuple[str, list[float]]:
    """``"age=50,65,80"`` -> ("age", [50.0, 65.0, 80.0]); InputError for anything else."""
    column, sep, raw = str(item).partition("=")
    column = column.strip()
    where = f"fairness.bin_edges {item!r}"
    if not sep or not column:
        raise InputError(f"{where}: expected COLUMN=EDGE,EDGE,... such as age=50,65,80")
    try:
        edges = [float(x) for x in raw.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{where}: the edges must be numbers") from None
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise InputError(f"{where}: give one or more increasing numbers")
    return column, edges


def _check_edge_syntax(items: list) -> None:
    # Which columns exist is only known once the data are open (Settings.from_params).
    for item in items:
        parse_edge_item(item)


PARAMS = {
    "positive_class": Param("", "class whose true/false positive and selection rates are compared (default: the second class for two classes; averaged over classes for more)"),
    "min_group_size": Param(20, "groups with fewer images are shown with their interval, marked too small to decide, and not compared in the gaps", min=1),
    "quantile_bins": Param(4, "numeric columns (e.g. age) are cut into this many quantile groups", min=2),
    "bin_edges": Param([], "explicit cut points for numeric columns, e.g. \"age=50,65,80\" (a list for several columns)",
                       validate=_check_edge_syntax),
    "intersections": Param(True, "also compare intersections of two columns (e.g. site&sex)"),
    "n_bootstrap": Param(400, "bootstrap resamples (of images, or of subjects when the data name them) for the 95% intervals (0 turns them off)", min=0),
    "n_permutations": Param(1000, "group-label permutations for the p-value of the largest gap (0 turns it off)", min=0),
    "alpha": Param(0.05, "level for the overview's 'Holm p < alpha' column (the verdict comes from the gap thresholds)",
                   validate=_open_unit_interval),
    "n_bins": Param(15, "confidence bins for the per-group ECE", min=2),
}


@dataclass
class Settings:
    positives: list[int]  # class indices whose TPR, FPR and selection rate are compared
    positive_label: str
    macro: bool  # no positive class: rates averaged over the classes, differences take the worst class
    min_group_size: int
    quantile_bins: int
    edges: dict[str, list[float]]  # column -> explicit cut points
    intersections: bool
    n_bootstrap: int
    n_permutations: int
    alpha: float
    n_bins: int

    @classmethod
    def from_params(cls, params: dict[str, Any], classes: list[str], columns: list[str]) -> "Settings":
        """Settings for a run; the parameters' own bounds were checked before the model loaded,
        what is left depends on the classes and the group columns."""
        positive = params["positive_class"]
        if positive and positive not in classes:
            raise InputError(f"fairness.positive_class={positive!r}: not a class (classes: {', '.join(classes)})")
        if positive:
            positives, label, macro = [classes.index(positive)], positive, False
        elif len(classes) == 2:
            positives, label, macro = [1], classes[1], False
        else:
            positives, label, macro = list(range(len(classes))), "each class (averaged)", True
        return cls(positives, label, macro, params["min_group_size"], params["quantile_bins"],
                   parse_edges(params["bin_edges"], columns), params["intersections"],
                   params["n_bootstrap"], params["n_permutations"], params["alpha"], params["n_bins"])


def parse_edges(items: list, columns: list[str]) -> dict[str, list[float]]:
    out = {}
    for item in items:
        column, edges = parse_edge_item(item)
        if column not in columns:
            raise InputError(f"fairness.bin_edges {item!r}: {column!r} is not a --group column ({', '.join(columns)})")
        out[column] = edges
    return out
