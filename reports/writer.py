"""Write a run's outputs into its folder: results.json, samples.csv, index.html."""

from __future__ import annotations

import html as html_lib
import json
from pathlib import Path

from mcaudit.reports.atomic import replace_folder
from mcaudit.reports.html import render_html
from mcaudit.reports.samples import samples_csv


def plugin_sections(manager, results) -> list:
    """Every plugin's report sections; a plugin whose hook raises or returns the wrong type
    gets an error note in its place instead of costing the run its outputs."""
    from mcaudit.hook_types import ReportSection

    sections = []
    for impl in reversed(manager.pm.hook.mcaudit_report_sections.get_hookimpls()):  # pluggy's call order
        name = impl.plugin_name
        try:
            returned = impl.function(results=results) or []
            if not isinstance(returned, (list, tuple)) or not all(isinstance(s, ReportSection) for s in returned):
                raise TypeError(f"returned {type(returned).__name__}, not a list of ReportSection")
            sections.extend(returned)
        except Exception as exc:  # noqa: BLE001 - one plugin's section must not sink the report
            message = html_lib.escape(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
            sections.append(ReportSection(f"Section of plugin {name} (failed)",
                                          f'<p class="warn">The report section of plugin {html_lib.escape(name)} '
                                          f"could not be rendered: {message}</p>"))
    return sections


def results_json(results) -> str:
    return json.dumps(results, indent=2, allow_nan=False) + "\n"


def write_outputs(run, out_dir: Path, manager) -> list[Path]:
    """results.json (figures as files under figures/), samples.csv, the figure and thumbnail
    files, and index.html, which embeds them all. ``run.results`` keeps its data URIs (the
    other outputs and plugins' report sections read it); only the written copy refers to files."""
    return replace_folder(Path(out_dir), output_files(run, manager))


def output_files(run, manager) -> dict[str, str | bytes]:
    """The run folder's files by their names in it (see :func:`write_outputs`)."""
    from mcaudit.reports.figures import split_figures
    from mcaudit.reports.gallery import choose, thumbnails

    results = dict(run.results)
    galleries = choose(run) if run.context is not None else []
    thumbs = thumbnails(run, galleries) if galleries else {}
    if galleries:
        results["drilldown"] = galleries
    stored, figures = split_figures(results)
    assets = figures | thumbs
    samples = samples_csv(run)
    files: dict[str, str | bytes] = {"results.json": results_json(stored), "samples.csv": samples}
    files["index.html"] = render_html(stored, plugin_sections(manager, run.results), files=assets, samples=samples)
    files.update(assets)
    return files
