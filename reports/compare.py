"""Compare two runs: metric deltas, regressions beyond an allowed drop, as text and HTML."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jinja2

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


TEMPLATE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>mcaudit compare</title><style>body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px}td.n{text-align:right}tr.bad td{background:#fde8e8}</style></head><body>
<h1>mcaudit compare</h1>
<p>Base: {{ base.model.spec }} ({{ base.finished_at }}), new: {{ new.model.spec }} ({{ new.finished_at }}).
{% if max_drop is not none %}Allowed drop {{ max_drop }}: {{ bad | length }} regression(s).{% endif %}</p>
<table><tr><th>metric</th><th>base</th><th>new</th><th>change</th></tr>
{% for d in deltas %}<tr class="{{ 'bad' if d.name in bad else '' }}"><td>{{ d.name }}</td>
<td class="n">{{ '-' if d.base is none else '%.4g' % d.base }}</td><td class="n">{{ '-' if d.new is none else '%.4g' % d.new }}</td>
<td class="n">{{ '-' if d.change is none else '%+.4g' % d.change }}</td></tr>{% endfor %}
</table></body></html>
"""


def compare_html(base: dict[str, Any], new: dict[str, Any], deltas: list[Delta], max_drop: float | None) -> str:
    env = jinja2.Environment(autoescape=True)
    bad = {d.name for d in regressions(deltas, max_drop)} if max_drop is not None else set()
    return env.from_string(TEMPLATE).render(base=base, new=new, deltas=deltas, max_drop=max_drop, bad=bad)
