"""Write a run's outputs into its folder: results.json, samples.csv, index.html."""

from __future__ import annotations

import json
from pathlib import Path

from mcaudit.reports.atomic import write_files_atomically
from mcaudit.reports.html import render_html
from mcaudit.reports.samples import samples_csv


def plugin_sections(manager, results) -> list:
    sections = []
    for returned in manager.hook.mcaudit_report_sections(results=results):
        sections.extend(returned or [])
    return sections


def results_json(results) -> str:
    return json.dumps(results, indent=2, allow_nan=False) + "\n"


def write_outputs(run, out_dir: Path, manager) -> list[Path]:
    results = run.results
    html = render_html(results, plugin_sections(manager, results))
    return write_files_atomically(
        Path(out_dir),
        {"results.json": results_json(results), "samples.csv": samples_csv(run), "index.html": html},
    )
