"""Thresholds on metrics, and whether a run passes them.

A threshold names ``check.metric`` and a bound: ``"performance.accuracy" = ">= 0.80"``.
A threshold on a metric the run does not report is an input error, never a silent pass.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mcaudit.config import default_config_file, mcaudit_table, parse_threshold_table, read_toml
from mcaudit.errors import InputError

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
BOUND_RE = re.compile(r"^\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass
class Threshold:
    name: str
    op: str
    bound: float
    source: str

    @property
    def check(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def metric(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def text(self) -> str:
        return f"{self.op} {self.bound:g}"


@dataclass
class GateOutcome:
    name: str
    op: str
    bound: float
    value: float | None
    passed: bool
    source: str
    reason: str = ""


def parse_threshold(name: str, text: str, source: str) -> Threshold:
    if "." not in name:
        raise InputError(f"{source}: threshold {name!r} must name CHECK.METRIC")
    match = BOUND_RE.match(text)
    if not match:
        raise InputError(f"{source}: threshold {name!r} = {text!r} must look like \">= 0.8\" (ops: >=, <=, >, <, ==)")
    return Threshold(name, match.group(1), float(match.group(2)), source)


def load_threshold_file(path: Path) -> dict[str, str]:
    data = read_toml(path, "gate file")
    table = mcaudit_table(path, data)
    if "thresholds" in table:
        return parse_threshold_table(table["thresholds"], str(path))
    plain = {k: v for k, v in table.items() if k not in ("run", "checks", "tool")}
    return parse_threshold_table(plain, str(path))


def collect_thresholds(
    gate: str | None,
    config_thresholds: dict[str, str],
    defaults: dict[str, str],
    config_source: str = "config",
) -> list[Threshold]:
    """Check defaults, overridden by the config file's, overridden by the gate file's."""
    merged: dict[str, Threshold] = {}
    for name, text in defaults.items():
        merged[name] = parse_threshold(name, text, "default")
    for name, text in config_thresholds.items():
        merged[name] = parse_threshold(name, text, config_source)
    path: Path | None = None
    if gate is None:
        return list(merged.values())
    if gate:
        path = Path(gate)
    elif gate == "" and not config_thresholds:
        path = default_config_file()
    if path is not None:
        for name, text in load_threshold_file(path).items():
            merged[name] = parse_threshold(name, text, str(path))
    return list(merged.values())


def apply_gate(results: dict[str, Any], thresholds: list[Threshold]) -> dict[str, Any]:
    checks = results.get("checks", {})
    outcomes: list[GateOutcome] = []
    for t in thresholds:
        check = checks.get(t.check)
        if check is None:
            if t.source == "default":
                continue
            ran = ", ".join(sorted(checks)) or "none"
            raise InputError(f"threshold {t.name!r} ({t.source}): no check {t.check!r} in this run (checks: {ran})")
        status = check.get("status")
        if status == "skipped":
            if t.source == "default":
                continue
            outcomes.append(GateOutcome(t.name, t.op, t.bound, None, False, t.source, "check skipped: " + check.get("summary", "")))
            continue
        if status == "error":
            outcomes.append(GateOutcome(t.name, t.op, t.bound, None, False, t.source, "check errored"))
            continue
        metrics = check.get("metrics", {})
        if t.metric not in metrics:
            if t.source == "default":
                continue
            known = ", ".join(sorted(metrics)[:30]) or "none"
            raise InputError(f"threshold {t.name!r} ({t.source}): check {t.check!r} reports no metric {t.metric!r} (its metrics: {known})")
        value = metrics[t.metric]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            outcomes.append(GateOutcome(t.name, t.op, t.bound, None, False, t.source, "metric undefined on this data"))
            continue
        passed = bool(OPS[t.op](float(value), t.bound))
        outcomes.append(GateOutcome(t.name, t.op, t.bound, float(value), passed, t.source))
    return {
        "applied": True,
        "passed": all(o.passed for o in outcomes),
        "results": [asdict(o) for o in outcomes],
    }
