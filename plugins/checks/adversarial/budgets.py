"""Attack budgets: parsing the user's spelling ("2/255", "1/255, 2/255"), their labels in
metric names and the report, and the smallest and largest nonzero budget attacked."""

from __future__ import annotations

import math
import re
from typing import Any

from mcaudit import InputError


def parse_budgets(values: list[Any], option: str) -> list[float]:
    """Budgets given as numbers or as strings like "2/255" (also "1/255, 2/255")."""
    out: list[float] = []
    for value in values:
        if isinstance(value, str):
            parts = [p for p in re.split(r"[,\s\[\]]+", value) if p]
            out.extend(_parse_budget(p, option) for p in parts)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
        else:
            raise InputError(f"{option}: {value!r} is not a budget (use numbers or strings like \"2/255\")")
    for eps in out:
        if not (math.isfinite(eps) and 0 <= eps <= 1e3):
            raise InputError(f"{option}: budget {eps!r} must be a finite number >= 0")
    return sorted(set(out))


def budgets_only(values: list[Any], option: str) -> None:
    """Param validation: the budgets parse (the parameter keeps the user's spelling)."""
    parse_budgets(values, option)


def at_least_one(values: list[Any], what: str) -> None:
    if not values:
        raise ValueError(f"give at least one {what}")


def _parse_budget(text: str, option: str) -> float:
    num, slash, den = text.partition("/")
    try:
        value = float(num) / (float(den) if slash else 1.0)
    except (ValueError, ZeroDivisionError) as exc:
        raise InputError(f"{option}: {text!r} is not a budget (use numbers or strings like \"2/255\")") from exc
    return value


def budget_label(norm: str, eps: float) -> str:
    """"2/255" for L-inf budgets on the 8-bit grid, otherwise the plain number."""
    if norm == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def norm_name(norm: str) -> str:
    return "L-inf" if norm == "linf" else "L2"


def budget_name(budget: tuple[str, float] | None) -> str | None:
    return None if budget is None else f"{norm_name(budget[0])} {budget_label(*budget)}"


def smallest_budget(worst) -> tuple[str, float] | None:
    """The smallest nonzero L-inf budget attacked, else the smallest nonzero L2 one."""
    return _nonzero_budget(worst, 0)


def largest_budget(worst) -> tuple[str, float] | None:
    """The largest nonzero L-inf budget attacked, else the largest nonzero L2 one."""
    return _nonzero_budget(worst, -1)


def _nonzero_budget(worst, position: int) -> tuple[str, float] | None:
    # L-inf first: it is the threat model the gated metrics are about whenever it was attacked
    for norm in ("linf", "l2"):
        budgets = sorted(e for nm, e in worst if nm == norm and e > 0)
        if budgets:
            return norm, budgets[position]
    return None
