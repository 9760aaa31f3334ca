"""Render results.json as one self-contained HTML file.

Templates load through jinja2's PackageLoader with autoescaping on, so every string that
came from user data (paths, labels, prompts, column values) is escaped. Figures and gallery
thumbnails are embedded as data URIs (see :mod:`mcaudit.reports.figures`); nothing is fetched
from the network. The one script (sorting, filtering, zoom, opening folds for print) is
inline and allowed by its SHA-256 in the Content-Security-Policy, so no other script can run;
with scripts off the page reads the same, without those conveniences.
"""

from __future__ import annotations

import base64
import hashlib
import json
from importlib import resources
from pathlib import Path
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


def script() -> tuple[str, str]:
    """The page's script and its CSP source expression."""
    text = resources.files("mcaudit.reports").joinpath("templates/script.js.html").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return text, f"sha256-{digest}"


def render_html(results: dict[str, Any], sections: list[Any] | None = None, folder: Path | None = None,
                files: dict[str, bytes] | None = None, samples: str | None = None) -> str:
    """The page for ``results``; figure and thumbnail files come from ``files`` (a run being
    written) or ``folder`` (results.json's folder), the images table from samples.csv's text."""
    from mcaudit.reports import glossary, plain
    from mcaudit.reports.figures import inline_figures, inline_gallery
    from mcaudit.reports.verdicts import caveats, check_order, policy_words, status_word

    shown = inline_figures(results, folder, files)
    order = check_order(shown)
    gate = shown.get("gate") or {"applied": False, "results": []}
    verdict = shown.get("verdict") or {"status": "not_evaluated", "headline": "", "findings": []}
    text, digest = script()
    checks = shown["checks"]
    return _env().get_template("report.html").render(
        r=shown, order=order, gate=gate, verdict=verdict, caveats=caveats(shown),
        policy=policy_words(gate.get("policy") or {}), word=status_word,
        titles={n: plain.title(n, checks[n]) for n in order}, plain={n: plain.sentence(n, checks[n]) for n in order},
        terms={n: glossary.terms_for(n) for n in order}, glossary=glossary.entries(),
        drilldown=inline_gallery(shown.get("drilldown") or [], folder, files),
        samples=_samples(shown, samples),
        script=Markup(text), script_hash=digest,
        sections=[{"title": s.title, "html": Markup(s.html), "anchor": s.anchor or f"extra-{i}"} for i, s in enumerate(sections or [])],
    )


def _samples(results: dict[str, Any], text: str | None):
    from mcaudit.reports.samples import samples_table

    dataset = results.get("dataset") or {}
    if not text:
        return None
    table = samples_table(text, len(dataset.get("classes") or []), list(dataset.get("group_columns") or []))
    return table if table["rows"] else None
