"""A Markdown summary for pull-request comments and GitHub's job summary."""

from __future__ import annotations

from typing import Any

from mcaudit.reports.html import check_verdicts, format_number


def _cell(text: Any) -> str:
    # Pipes and newlines would break the table; angle brackets would become HTML on GitHub.
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def markdown_summary(results: dict[str, Any]) -> str:
    gate = results.get("gate") or {}
    verdicts = check_verdicts(results)
    d = results.get("dataset", {})
    lines = []
    if gate.get("applied"):
        head = "✅ passed" if gate.get("passed") and "error" not in verdicts.values() else "❌ failed"
    else:
        head = "❌ checks errored" if "error" in verdicts.values() else "ℹ️ not gated"
    lines.append(f"## mcaudit: {head}")
    lines.append("")
    lines.append(f"Model `{_cell(results.get('model', {}).get('spec'))}` on `{_cell(d.get('spec'))}`: "
                 f"{d.get('images', 0)} images, {d.get('skipped', 0)} skipped.")
    lines.append("")
    if gate.get("applied") and gate.get("results"):
        lines += ["| threshold | bound | value | result |", "|---|---|---|---|"]
        for g in sorted(gate["results"], key=lambda g: (g["passed"], g["name"])):
            lines.append(f"| {_cell(g['name'])} | {g['op']} {g['bound']:g} | {format_number(g['value'])} | "
                         f"{'pass' if g['passed'] else '**fail**'} |")
        lines.append("")
    lines += ["| check | status | finding |", "|---|---|---|"]
    for name, c in results.get("checks", {}).items():
        lines.append(f"| {_cell(name)} | {verdicts[name]} | {_cell(c.get('summary', ''))} |")
    return "\n".join(lines) + "\n"
