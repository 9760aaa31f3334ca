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
    if results.get("kind") == "models":
        return models_summary(results)
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


def models_summary(results: dict[str, Any]) -> str:
    """A multi-model audit: the ranking, the differences that decided it, then one block per
    model (its own summary, headings one level down)."""
    comparison = results.get("comparison") or {}
    labels = list(results.get("models") or {})
    lines = [f"## mcaudit: {len(labels)} models compared", ""]
    for problem in comparison.get("problems") or []:
        lines.append(f"- ⚠️ not paired: {_cell(problem)}")
    lines += ["", "| dimension | " + " | ".join(_cell(label) for label in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for row in comparison.get("ranking") or []:
        by = {m["label"]: m for m in row.get("models", [])}
        cells = [(f"#{by[label]['rank']} ({by[label]['wins']} better, {by[label]['losses']} worse)" if row.get("decided")
                  else "not compared" if row.get("not_compared") else "undecided") if label in by else "-" for label in labels]
        lines.append(f"| {_cell(row['dimension'])} | " + " | ".join(cells) + " |")
    decided = [c for c in comparison.get("comparisons") or [] if c.get("better")]
    if decided:
        lines += ["", "| metric | models | difference (interval) | p (Holm) | better |", "|---|---|---|---|---|"]
        for c in decided:
            lo, hi = c["interval"]
            lines.append(f"| {_cell(c['metric'])} | {_cell(c['a'])} vs {_cell(c['b'])} | {c['difference']:+.4g} "
                         f"({lo:+.4g} to {hi:+.4g}) | {format_number(c['p_adjusted'])} | {_cell(c['better'])} |")
    lines.append("")
    for label, one in (results.get("models") or {}).items():
        block = markdown_summary(one).replace("## mcaudit:", f"## {_cell(label)}:", 1)
        lines.append("\n".join(("#" + line) if line.startswith("#") else line for line in block.splitlines()))
        lines.append("")
    return "\n".join(lines)
