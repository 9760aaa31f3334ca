"""A Markdown summary for pull-request comments and GitHub's job summary."""

from __future__ import annotations

from typing import Any

from mcaudit.reports.html import format_number
from mcaudit.reports.verdicts import caveats, check_order, policy_words, status_word

ICONS = {"pass": "✅", "warn": "⚠️", "fail": "❌", "inconclusive": "❔", "not_evaluated": "⏭️", "error": "💥"}


def _cell(text: Any) -> str:
    # Pipes and newlines would break the table; angle brackets would become HTML on GitHub.
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _status(status: str) -> str:
    word = status_word(status)
    return f"{ICONS.get(status, '')} **{word}**" if status in ("fail", "error") else f"{ICONS.get(status, '')} {word}"


def markdown_summary(results: dict[str, Any]) -> str:
    gate = results.get("gate") or {}
    verdict = results.get("verdict") or {}
    d = results.get("dataset", {})
    lines = [f"## mcaudit: {_status(verdict.get('status', 'not_evaluated'))}", ""]
    lines.append(_cell(verdict.get("headline", "")))
    lines.append("")
    if gate.get("applied"):
        lines.append(f"Gate: **{'passed' if gate.get('passed') else 'failed'}** ({policy_words(gate.get('policy', {}))}).")
    else:
        lines.append("Not gated: the exit code ignores the verdict (run with `--gate`).")
    lines.append("")
    lines.append(f"Model `{_cell(results.get('model', {}).get('spec'))}` on `{_cell(d.get('spec'))}`: "
                 f"{d.get('images', 0)} images, {d.get('skipped', 0)} skipped.")
    lines.append("")
    findings = verdict.get("findings", [])
    if findings:
        lines += ["### Findings, worst first", "", "| status | finding |", "|---|---|"]
        lines += [f"| {_status(f['status'])} | {_cell(f['text'])} |" for f in findings]
        lines.append("")
    lines += ["### Checks", "", "| check | status | why | summary |", "|---|---|---|---|"]
    for name in check_order(results):
        c = results["checks"][name]
        lines.append(f"| {_cell(name)} | {_status(c['status'])} | {_cell(c.get('status_reason', ''))} | {_cell(c.get('summary', ''))} |")
    lines.append("")
    notes = caveats(results)
    if notes:
        lines += [f"### Caveats ({len(notes)})", ""]
        lines += [f"- **{_cell(where)}**: {_cell(text)}" for where, text in notes]
        lines.append("")
    rows = gate.get("results", [])
    if rows:
        lines += ["### Thresholds", "", "| threshold | rule | value | 95% interval | n | status | from |", "|---|---|---|---|---|---|---|"]
        for g in rows:
            interval = "" if not g.get("interval") else f"{format_number(g['interval'][0])} to {format_number(g['interval'][1])}"
            if g.get("interval_method"):
                interval += f" ({_cell(g['interval_method'])})"
            rule = g["rule"] + ("" if g["decide_on"] == "interval" else f" (on {g['decide_on']})")
            status = _status(g["status"]) + (f": {_cell(g['reason'])}" if g["status"] == "not_evaluated" else "")
            lines.append(f"| {_cell(g['name'])} | {_cell(rule)} | {format_number(g['value'])} | {interval} | "
                         f"{g['n'] if g.get('n') is not None else ''} | {status} | {_cell(g['source'])} |")
    return "\n".join(lines) + "\n"
