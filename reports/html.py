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


def render_html(results: dict[str, Any], sections: list[Any] | None = None) -> str:
    from mcaudit.reports.verdicts import caveats, check_order, policy_words, status_word

    order = check_order(results)
    gate = results.get("gate") or {"applied": False, "results": []}
    verdict = results.get("verdict") or {"status": "not_evaluated", "headline": "", "findings": []}
    template = _env().get_template("report.html")
    return template.render(
        r=results,
        order=order,
        gate=gate,
        verdict=verdict,
        caveats=caveats(results),
        policy=policy_words(gate.get("policy") or {}),
        word=status_word,
        sections=[{"title": s.title, "html": Markup(s.html), "anchor": s.anchor or f"extra-{i}"} for i, s in enumerate(sections or [])],
    )
