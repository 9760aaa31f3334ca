"""The outputs of a multi-model audit: each model's own run folder under ``models/<label>/``
and, at the top, results.json (every model's results and the comparison) and index.html
(the comparison page, the same page ``mcaudit compare --html`` makes from the models' folders)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

MODELS_KIND = "models"


def _prefixed(value: Any, prefix: str) -> Any:
    """Figure and thumbnail files named from the top folder rather than the model's."""
    if isinstance(value, dict):
        return {k: (prefix + v if k == "file" and isinstance(v, str) else _prefixed(v, prefix)) for k, v in value.items()}
    if isinstance(value, list):
        return [_prefixed(v, prefix) for v in value]
    return value


def compared_runs(outcomes) -> list:
    """Each model's written results and samples, as the comparison engine reads run folders."""
    from mcaudit.comparison import ComparedRun

    runs = []
    for outcome in outcomes:
        files = outcome.kept
        samples = list(csv.DictReader(io.StringIO(files["samples.csv"])))
        runs.append(ComparedRun(outcome.label, json.loads(files["results.json"]), samples, f"models/{outcome.label}"))
    return runs


def model_set_results(outcomes, comparison: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    """The top results.json: what was run (``head``: versions, times, config), the data, each
    model's results as its own results.json holds them, and the comparison."""
    models = {}
    for outcome in outcomes:
        stored = json.loads(outcome.kept["results.json"])
        models[outcome.label] = _prefixed(stored, f"models/{outcome.label}/")
    first = next(iter(models.values()))
    return {**head, "kind": MODELS_KIND, "dataset": first.get("dataset"), "models": models,
            "exit_codes": {o.label: int(o.exit_code) for o in outcomes}, "comparison": comparison}


def model_set_files(outcomes, results: dict[str, Any]) -> dict[str, str | bytes]:
    """Every file of the output folder by its name in it."""
    from mcaudit.reports.compare import compare_html, compare_results
    from mcaudit.reports.writer import results_json

    files: dict[str, str | bytes] = {}
    for outcome in outcomes:
        files.update({f"models/{outcome.label}/{name}": content for name, content in outcome.kept.items()})
    runs = [json.loads(o.kept["results.json"]) for o in outcomes]
    links = [f"models/{o.label}/index.html" for o in outcomes]
    files["index.html"] = compare_html(runs[0], runs[1], compare_results(runs[0], runs[-1]), None, more=runs[2:],
                                       comparison=results["comparison"], links=links)
    files["results.json"] = results_json(results)
    return files
