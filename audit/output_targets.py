"""The files a run writes besides its report folder: ``--output FORMAT=PATH`` (with
``--junit-xml`` and ``--markdown`` as its short forms) and the Markdown job summary appended to
``$GITHUB_STEP_SUMMARY``; each is checked writable before the audit starts."""

from __future__ import annotations

import os
from pathlib import Path

from mcaudit.errors import InputError


def requested_outputs(manager, output_args, junit_file: str | None, markdown_file: str | None) -> list[tuple[str, Path | None, object]]:
    """(option, path, OutputFormat) for each ``--output NAME=PATH`` (``--junit-xml`` and
    ``--markdown`` are ``--output junit=`` and ``--output markdown=``), plus the Markdown
    summary appended to ``$GITHUB_STEP_SUMMARY`` when that is set (path None)."""
    from mcaudit.catalog import build_catalog

    formats = {name: fmt for name, (_, fmt) in build_catalog(manager).outputs.items()}
    wanted: list[tuple[str, str, str]] = []
    for item in output_args:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"--output {item}: expected FORMAT=PATH (formats: {', '.join(sorted(formats)) or 'none'})")
        wanted.append((f"--output {name.strip()}", name.strip(), path.strip()))
    if junit_file:
        wanted.append(("--junit-xml", "junit", junit_file))
    if markdown_file:
        wanted.append(("--markdown", "markdown", markdown_file))
    out = []
    for option, name, path in wanted:
        if name not in formats:
            raise InputError(f"{option}: no output format {name!r} (formats: {', '.join(sorted(formats)) or 'none'})")
        out.append((option, Path(path), formats[name]))
    if os.environ.get("GITHUB_STEP_SUMMARY") and "markdown" in formats:
        out.append(("$GITHUB_STEP_SUMMARY", None, formats["markdown"]))
    return out


def check_outputs_writable(outputs) -> None:
    from mcaudit.reports.atomic import check_file_writable

    for option, path, _ in outputs:
        if path is not None:
            check_file_writable(path, option)
            continue
        summary = Path(os.environ["GITHUB_STEP_SUMMARY"])
        try:
            with open(summary, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise InputError(f"$GITHUB_STEP_SUMMARY {summary}: cannot append to it ({exc.strerror or exc})") from None


def write_extra_outputs(results, outputs) -> None:
    from mcaudit.reports.atomic import write_files_atomically

    for option, path, fmt in outputs:
        content = fmt.render(results)
        if path is None:  # GitHub's job summary collects every step's text: append
            with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as fh:
                fh.write(content if isinstance(content, str) else content.decode("utf-8"))
        else:
            write_files_atomically(path.parent, {path.name: content})
