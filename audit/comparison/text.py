"""The comparison of several runs as plain text for the terminal."""

from __future__ import annotations


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _interval(interval) -> str:
    return "no interval" if not interval else f"{interval[0]:+.4g} to {interval[1]:+.4g}"


def comparison_text(comparison: dict) -> str:
    """Ranking per dimension, then the differences that were decided, then why the runs could
    not be paired (if they could not)."""
    level = comparison.get("level", 0.95)
    paired = "paired" if comparison.get("paired") else "unpaired"
    lines = [f"{len(comparison['models'])} models compared ({paired}, {level:.0%} intervals, Holm-adjusted p):"]
    for model in comparison["models"]:
        lines.append(f"  {model['label']}: {model['spec']} ({model['verdict']}) from {model['source']}")
    lines += ["", "Ranking per dimension (wins - losses; 1 is best):"]
    for dim in comparison["ranking"]:
        ranked = ", ".join(f"{m['rank']}. {m['label']} (+{m['wins']}/-{m['losses']})" for m in dim["models"])
        tail = ("" if dim["decided"] else f"  [not compared: {dim['not_compared']}]" if dim.get("not_compared")
                else "  [undecided: no difference shown]")
        lines.append(f"  {dim['dimension']}: {ranked}{tail}")
    decided = [c for c in comparison["comparisons"] if c["better"] is not None]
    lines += ["", "Decided differences:" if decided else "Decided differences: none"]
    for c in decided:
        lines.append(f"  {c['metric']}: {c['better']} better ({c['a']} {_number(c['value_a'])} vs {c['b']} "
                     f"{_number(c['value_b'])}; difference {c['difference']:+.4g}, {_interval(c['interval'])}, "
                     f"p adjusted {_number(c['p_adjusted'])}; {c['method']})")
    if comparison.get("skipped_checks"):
        lines += ["", "Checks not compared:"]
        lines += [f"  {check}: {why}" for check, why in comparison["skipped_checks"].items()]
    if comparison.get("problems"):
        lines += ["", "Why the runs cannot be paired (unpaired comparisons only, conservative):"]
        lines += [f"  - {p}" for p in comparison["problems"]]
    return "\n".join(lines) + "\n"
