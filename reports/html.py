"""Render results.json as one self-contained HTML file.

Templates load through jinja2's PackageLoader with autoescaping on, so every string that
came from user data (paths, labels, prompts, column values) is escaped. Plots are PNG data
URIs already stored in results.json; nothing is fetched from the network.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
from markupsafe import Markup

STATUS_ORDER = {"error": 0, "fail": 1, "flagged": 2, "skipped": 3, "ok": 4}


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mcaudit.reports", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    return env


def format_number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, int, str)):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def check_verdicts(results: dict[str, Any]) -> dict[str, str]:
    """Per check: error, fail (a threshold on it failed), skipped or ok.

    Without --gate, the checks' default thresholds mark a check "flagged", so the worst
    findings come first in the report even when nothing gates the run.
    """
    out = {name: c.get("status", "ok") for name, c in results.get("checks", {}).items()}
    gate = results.get("gate") or {}
    outcomes = gate.get("results", []) if gate.get("applied") else results.get("findings", [])
    label = "fail" if gate.get("applied") else "flagged"
    for g in outcomes:
        name = g["name"].split(".", 1)[0]
        if not g["passed"] and out.get(name) == "ok":
            out[name] = label
    return out


def render_html(results: dict[str, Any], sections: list[Any] | None = None) -> str:
    verdicts = check_verdicts(results)
    order = sorted(results.get("checks", {}), key=lambda n: (STATUS_ORDER.get(verdicts[n], 5), n))
    gate = results.get("gate") or {"applied": False, "results": []}
    gate_rows = sorted(gate.get("results", []), key=lambda g: (g["passed"], g["name"]))
    errored = [n for n in order if verdicts[n] == "error"]
    if gate.get("applied"):
        overall = "pass" if gate.get("passed") and not errored else "fail"
    else:
        overall = "error" if errored else "no gate"
    template = _env().get_template("report.html")
    return template.render(
        r=results,
        verdicts=verdicts,
        order=order,
        gate=gate,
        gate_rows=gate_rows,
        overall=overall,
        sections=[{"title": s.title, "html": Markup(s.html), "anchor": s.anchor or f"extra-{i}"} for i, s in enumerate(sections or [])],
    )
