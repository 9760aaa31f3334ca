"""Compare two runs: metric deltas, regressions beyond an allowed drop, as text and HTML."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

# Metrics where a larger value is worse; a rise is the regression for these.
LOWER_IS_BETTER_HINTS = ("ece", "mce", "brier", "nll", "gap", "difference", "fpr", "attack_success", "error", "abstain", "p_value", "anomaly_index")


@dataclass
class Delta:
    name: str
    base: float | None
    new: float | None
    lower_is_better: bool

    @property
    def change(self) -> float | None:
        if self.base is None or self.new is None:
            return None
        return self.new - self.base

    @property
    def worsening(self) -> float:
        c = self.change
        if c is None or math.isnan(c):
            return 0.0
        return c if self.lower_is_better else -c


def check_numbers(results: dict[str, Any], source: str) -> None:
    """Refuse a results.json whose metrics, intervals or counts are not numbers.

    mcaudit writes only numbers there (null for an undefined metric); anything else was edited
    by hand or by another tool, and gating it would silently read the metric as undefined.
    """
    from mcaudit.errors import InputError

    if not isinstance(results.get("checks"), dict):
        raise InputError(f"{source}: 'checks' must be an object of checks")
    for check, entry in results["checks"].items():
        if not isinstance(entry, dict):
            raise InputError(f"{source}: check {check!r} is {type(entry).__name__}, not an object")
        for field in ("metrics", "intervals", "counts"):
            if not isinstance(entry.get(field) or {}, dict):
                raise InputError(f"{source}: {check}.{field} must be an object of metrics")
        for metric, value in (entry.get("metrics") or {}).items():
            if value is not None and not _number(value):
                raise InputError(f"{source}: metric {check}.{metric} is {_show(value)}, not a number")
        for field in ("intervals", "counts"):
            for metric, pair in (entry.get(field) or {}).items():
                if not (isinstance(pair, list) and len(pair) == 2 and all(_number(v) for v in pair)):
                    raise InputError(f"{source}: {field} of metric {check}.{metric} is {_show(pair)}, not two numbers")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def lower_is_better(metric: str) -> bool:
    leaf = metric.lower()
    return any(h in leaf for h in LOWER_IS_BETTER_HINTS)


def compare_results(base: dict[str, Any], new: dict[str, Any]) -> list[Delta]:
    out = []
    for check in sorted(set(base.get("checks", {})) | set(new.get("checks", {}))):
        bm = base.get("checks", {}).get(check, {}).get("metrics", {}) or {}
        nm = new.get("checks", {}).get(check, {}).get("metrics", {}) or {}
        for metric in sorted(set(bm) | set(nm)):
            name = f"{check}.{metric}"
            out.append(Delta(name, bm.get(metric), nm.get(metric), lower_is_better(metric)))
    return out


def regressions(deltas: list[Delta], max_drop: float) -> list[Delta]:
    return [d for d in deltas if d.worsening > max_drop + 1e-12]


def compare_text(deltas: list[Delta], max_drop: float | None) -> str:
    width = max((len(d.name) for d in deltas), default=10)
    lines = [f"{'metric':<{width}}  {'base':>10}  {'new':>10}  {'change':>10}"]
    bad = {d.name for d in regressions(deltas, max_drop)} if max_drop is not None else set()
    for d in deltas:
        def f(v):
            return "-" if v is None else f"{v:.4g}"
        flag = "  REGRESSION" if d.name in bad else ""
        lines.append(f"{d.name:<{width}}  {f(d.base):>10}  {f(d.new):>10}  {('-' if d.change is None else f'{d.change:+.4g}'):>10}{flag}")
    return "\n".join(lines) + "\n"


def compare_html(base: dict[str, Any], new: dict[str, Any], deltas: list[Delta], max_drop: float | None,
                 more: list[dict[str, Any]] | None = None, comparison: dict[str, Any] | None = None,
                 links: list[str | None] | None = None) -> str:
    """The comparison as a page: each run's verdict, every check's status side by side, and
    every metric per run with the change from the first to the last and the regressions.
    With ``comparison`` (:func:`mcaudit.comparison.compare_runs`) the page opens with the
    models ranked on every audited dimension and the paired differences behind the ranking,
    and shows each check's sentence and gated numbers per model; ``links`` points each run's
    name at its own report."""
    from mcaudit.reports.html import _env, script
    from mcaudit.reports.plain import title
    from mcaudit.reports.verdicts import status_word

    runs = [base, new, *(more or [])]
    last = runs[-1]
    if more:
        deltas = compare_results(base, last)
    bad = {d.name for d in regressions(deltas, max_drop)} if max_drop is not None else set()
    names = sorted({n for r in runs for n in r.get("checks", {})})
    statuses = []
    for name in names:
        seen = [(r.get("checks", {}).get(name) or {}).get("status") for r in runs]
        entry = next(r["checks"][name] for r in runs if name in r.get("checks", {}))
        statuses.append({"name": name, "title": title(name, entry), "statuses": seen, "changed": len(set(seen)) > 1})
    metrics = [{"name": d.name, "values": [_metric(r, d.name) for r in runs], "change": d.change} for d in deltas]
    text, digest = script()
    labelled = [_describe(i, r) for i, r in enumerate(runs)]
    for i, run in enumerate(labelled):
        if comparison is not None:
            run["label"] = comparison["models"][i]["label"]
        run["link"] = (links or [None] * len(runs))[i]
    return _env().get_template("compare.html").render(
        runs=labelled, statuses=statuses, metrics=metrics, bad=bad, max_drop=max_drop, word=status_word,
        comparison=comparison, ranking=_ranking_cells(comparison, labelled), sections=side_by_side(runs, names) if comparison is not None else [],
        script=Markup(text), script_hash=digest)


def _ranking_cells(comparison: dict[str, Any] | None, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if comparison is None:
        return []
    rows = []
    for row in comparison.get("ranking", []):
        by_label = {m["label"]: m for m in row.get("models", [])}
        rows.append(row | {"cells": [by_label.get(run["label"]) for run in runs]})
    return rows


def side_by_side(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Each check with, per run, its status, plain sentence and gated numbers."""
    from mcaudit.reports.plain import sentence, title

    out = []
    for name in names:
        entry = next(r["checks"][name] for r in runs if name in r.get("checks", {}))
        cells = []
        for r in runs:
            mine = r.get("checks", {}).get(name)
            gated = [g for g in (r.get("gate") or {}).get("results", []) if g.get("check") == name]
            cells.append(None if mine is None else {
                "status": mine.get("status"), "sentence": sentence(name, mine) or mine.get("summary", ""),
                "gated": [{"name": g["metric"], "sentence": g.get("sentence", ""), "status": g["status"]} for g in gated]})
        out.append({"name": name, "title": title(name, entry), "cells": cells})
    return out


def _metric(results: dict[str, Any], name: str) -> float | None:
    check, _, metric = name.partition(".")
    return ((results.get("checks", {}).get(check) or {}).get("metrics") or {}).get(metric)


def _describe(i: int, results: dict[str, Any]) -> dict[str, Any]:
    model, data = results.get("model") or {}, results.get("dataset") or {}
    return {"label": f"run {i + 1}" + (" (base)" if i == 0 else ""), "model": model.get("spec", "?"),
            "checkpoint": model.get("checkpoint"), "data": data.get("spec"), "finished": results.get("finished_at", ""),
            "verdict": (results.get("verdict") or {}).get("status", "not_evaluated")}
