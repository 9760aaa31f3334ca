"""Thresholds on metrics, and the status each one earns on a run.

A threshold names ``check.metric`` and a rule, as a string or a table::

    "performance.accuracy" = ">= 0.80"
    "performance.recall.*" = { rule = ">= 0.90", on = "lower" }
    "performance.balanced_accuracy" = { rule = "> chance_level", on = "lower" }
    "adversarial.masking_suspected" = { rule = "<= 0", severity = "warn" }

- ``*`` in the metric matches every metric of the check it fits (one outcome each).
- The bound is a number, or the name of another metric of the same check (``chance_level``).
- ``on`` says what is compared with the bound: ``interval`` (the default) decides on the
  value's 95% interval, pass when all of it meets the bound, fail when none of it does,
  inconclusive when it straddles the bound; ``value`` compares the point value alone;
  ``lower`` / ``upper`` compare that end of the interval (inconclusive when there is none).
- ``severity = "warn"`` makes an unmet threshold a warning rather than a failure.

A threshold on a metric that this run does not have (no groups, no OOD set, too few classes,
a skipped check) is *not evaluated*, with the reason; one on a metric its check never reports
(a typo) is an input error.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcaudit.config import default_config_file, mcaudit_table, parse_threshold_table, read_toml
from mcaudit.errors import InputError
from mcaudit.verdict import GatePolicy, rank_key

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
RULE_RE = re.compile(rf"^\s*(>=|<=|==|>|<)\s*({NUMBER}|[A-Za-z_][\w.\-]*)\s*$")
DECIDE_ON = ("interval", "value", "lower", "upper")
SEVERITIES = ("fail", "warn")


@dataclass
class Threshold:
    name: str
    op: str
    bound: float | None  # None when the bound is another metric (``bound_ref``)
    source: str
    decide_on: str = "interval"
    severity: str = "fail"
    bound_ref: str | None = None

    @property
    def check(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def metric(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def rule(self) -> str:
        return f"{self.op} {self.bound_ref if self.bound_ref else format(self.bound, 'g')}"

    def record(self) -> dict[str, Any]:
        """How results.json records the threshold, so a later ``mcaudit gate`` re-applies this
        very rule rather than whatever defaults the plugins installed then declare."""
        return {"name": self.name, "rule": self.rule, "on": self.decide_on, "severity": self.severity, "source": self.source}


def recorded_defaults(results: dict[str, Any]) -> dict[str, Any] | None:
    """The default thresholds a run was judged by, as results.json recorded them (None if it
    predates the record)."""
    recorded = results.get("thresholds_in_force")
    if not isinstance(recorded, list):
        return None
    return {t["name"]: {"rule": t["rule"], "on": t.get("on", "interval"), "severity": t.get("severity", "fail")}
            for t in recorded if isinstance(t, dict) and t.get("source") == "default" and "name" in t and "rule" in t}


def parse_threshold(name: str, spec: Any, source: str) -> Threshold:
    """A threshold from its TOML value: a rule string or a table ``{rule, on, severity}``."""
    if "." not in name:
        raise InputError(f"{source}: threshold {name!r} must name CHECK.METRIC")
    decide_on, severity = "interval", "fail"
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"rule", "on", "severity"})
        if unknown:
            raise InputError(f"{source}: threshold {name!r} has unknown key {unknown[0]!r} (keys: rule, on, severity)")
        if "rule" not in spec:
            raise InputError(f"{source}: threshold {name!r} needs a rule, e.g. {{ rule = \">= 0.8\" }}")
        decide_on = spec.get("on", decide_on)
        severity = spec.get("severity", severity)
        spec = spec["rule"]
    if decide_on not in DECIDE_ON:
        raise InputError(f"{source}: threshold {name!r}: on = {decide_on!r} must be one of {', '.join(DECIDE_ON)}")
    if severity not in SEVERITIES:
        raise InputError(f"{source}: threshold {name!r}: severity = {severity!r} must be one of {', '.join(SEVERITIES)}")
    match = RULE_RE.match(spec) if isinstance(spec, str) else None
    if not match:
        raise InputError(f"{source}: threshold {name!r} = {spec!r} must look like \">= 0.8\" (ops: >=, <=, >, <, ==)")
    op, raw = match.group(1), match.group(2)
    try:
        bound, ref = float(raw), None
    except ValueError:
        bound, ref = None, raw
    return Threshold(name, op, bound, source, decide_on, severity, ref)


def load_gate_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The thresholds and the ``[gate]`` policy table of a gate file."""
    data = read_toml(path, "gate file")
    table = mcaudit_table(path, data)
    policy = table.get("gate", {})
    if not isinstance(policy, dict):
        raise InputError(f"{path}: [gate] must be a table (not_evaluated, inconclusive, warn)")
    if "thresholds" in table:
        return parse_threshold_table(table["thresholds"], str(path)), policy
    plain = {k: v for k, v in table.items() if k not in ("run", "checks", "tool", "gate")}
    return parse_threshold_table(plain, str(path)), policy


def gate_policy(table: dict[str, Any] | None, strict: bool = False, source: str = "gate file") -> GatePolicy:
    policy = GatePolicy()
    for key, value in (table or {}).items():
        choices = GatePolicy.CHOICES.get(key)
        if choices is None:
            raise InputError(f"{source}: [gate] has unknown key {key!r} (keys: {', '.join(GatePolicy.CHOICES)})")
        if value not in choices:
            raise InputError(f"{source}: [gate] {key} = {value!r} must be one of {', '.join(choices)}")
        setattr(policy, key, value)
    if strict:
        policy.not_evaluated = "fail"
    return policy


def collect_thresholds(
    gate: str | None,
    config_thresholds: dict[str, Any],
    defaults: dict[str, Any],
    config_source: str = "config",
    policy_out: dict[str, Any] | None = None,
) -> list[Threshold]:
    """Check defaults, overridden by the config file's, overridden by the gate file's.

    ``policy_out``, when given, receives the gate file's ``[gate]`` table.
    """
    merged: dict[str, Threshold] = {}
    for name, spec in defaults.items():
        merged[name] = parse_threshold(name, spec, "default")
    for name, spec in config_thresholds.items():
        merged[name] = parse_threshold(name, spec, config_source)
    if gate is None:
        return list(merged.values())
    path: Path | None = None
    if gate:
        path = Path(gate)
    elif not config_thresholds:
        path = default_config_file()
    if path is not None:
        thresholds, policy = load_gate_file(path)
        if policy_out is not None:
            policy_out.update(policy)
        for name, spec in thresholds.items():
            merged[name] = parse_threshold(name, spec, str(path))
    return list(merged.values())


# --- deciding ------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _declared(check: dict[str, Any], metric: str) -> bool:
    """Whether the check says it reports ``metric`` (``recall.<class>`` matches ``recall.x``)."""
    for pattern in check.get("declared_metrics") or []:
        if re.fullmatch(re.sub(r"<[^>]+>", ".+", re.escape(pattern).replace(r"\<", "<").replace(r"\>", ">")), metric):
            return True
    return False


def decide(op: str, bound: float, value: float, interval: tuple[float, float] | None, decide_on: str) -> tuple[str, str]:
    """pass, fail or inconclusive, and a note on what was compared."""
    compare = OPS[op]
    if decide_on == "value" or op == "==":
        return ("pass" if compare(value, bound) else "fail"), "point value"
    if interval is None:
        if decide_on in ("lower", "upper"):
            return "inconclusive", f"no 95% interval, so its {decide_on} bound cannot be compared"
        return ("pass" if compare(value, bound) else "fail"), "point value (no interval)"
    lo, hi = interval
    if decide_on in ("lower", "upper"):
        end = lo if decide_on == "lower" else hi
        if not compare(end, bound):
            return "fail", f"{decide_on} 95% bound"
        conservative = (op in (">", ">=")) == (decide_on == "lower")
        if conservative and not compare(value, bound):
            # The cautious end of an interval clears the bound but its own estimate does not
            # (a posterior pulled by its prior on tiny classes, say): no evidence of a pass.
            return "inconclusive", f"the {decide_on} 95% bound meets it but the value itself does not"
        return "pass", f"{decide_on} 95% bound"
    meets = [compare(lo, bound), compare(hi, bound), compare(value, bound)]
    if all(meets):
        return "pass", "95% interval"
    if not any(meets):
        return "fail", "95% interval"
    return "inconclusive", "95% interval straddles the bound"


def metric_label(check: str, metric: str, declared: list[str] | tuple[str, ...] = ()) -> str:
    """A metric's name in words. A metric of a declared family ``recall.<class>`` reads
    "recall of pneumonia"; any other reads as its check and name with spaces."""
    for pattern in declared:
        head, dot, rest = pattern.partition(".")
        if dot and rest.startswith("<") and rest.endswith(">") and metric.startswith(head + ".") and metric != pattern:
            return f"{head.replace('_', ' ')} of {metric[len(head) + 1:]}"
    words = metric.replace('_', ' ').replace('.', ' ')
    # "certified accuracy at radius" already names its check; "ece" needs "calibration" before it.
    return words if words.startswith(check.replace('_', ' ')) else f"{check} {words}"


def _percent(check: dict[str, Any], metric: str) -> bool:
    # A metric given as "k of n" is a proportion, so it reads best as a percentage.
    return metric in (check.get("counts") or {})


def format_value(value: float | None, as_percent: bool) -> str:
    if value is None:
        return "n/a"
    if as_percent:
        return f"{value:.1%}"
    return f"{value:.4g}"


def sentence(o: dict[str, Any], check: dict[str, Any]) -> str:
    """One outcome in words: "recall of pneumonia 1.3% (5 of 390), needs >= 50%"."""
    pct = _percent(check, o["metric"])
    what = metric_label(o["check"], o["metric"], check.get("declared_metrics") or ())
    bound = format_value(o["bound"], pct and o["bound"] is not None and 0 <= o["bound"] <= 1)
    if o.get("bound_ref"):
        bound = f"{o['bound_ref'].replace('_', ' ')} ({bound})"
    needs = f"needs {o['op']} {bound}"
    if o["decide_on"] in ("lower", "upper"):
        needs += f" on its {o['decide_on']} 95% bound"
    if o["status"] == "not_evaluated":
        return f"{what} not evaluated: {o['reason']}"
    evidence = []
    if o.get("count"):
        evidence.append(f"{o['count'][0]} of {o['count'][1]}")
    if o.get("interval"):
        lo, hi = o["interval"]
        evidence.append(f"95% CI {format_value(lo, pct)} to {format_value(hi, pct)}")
    if o.get("n") and not o.get("count"):
        evidence.append(f"n = {o['n']}")
    shown = format_value(o["value"], pct)
    return f"{what} {shown}" + (f" ({', '.join(evidence)})" if evidence else "") + f", {needs}"


def _severity(op: str, bound: float, value: float, interval) -> float:
    """How far past its bound a value lies, relative to the bound (and to its interval's
    half-width when that is larger, so an uncertain miss ranks below a sure one)."""
    if op in ("==",):
        excess = abs(value - bound)
    elif op in (">=", ">"):
        excess = bound - value
    else:
        excess = value - bound
    scale = max(abs(bound), 0.05)
    if interval is not None:
        scale = max(scale, (interval[1] - interval[0]) / 2)
    return excess / scale


def _outcome(t: Threshold, metric: str, check: dict[str, Any] | None, status: str = "", reason: str = "") -> dict[str, Any]:
    check = check or {}
    metrics = check.get("metrics") or {}
    out = {
        "name": f"{t.check}.{metric}", "check": t.check, "metric": metric, "rule": t.rule, "op": t.op,
        "bound": t.bound, "bound_ref": t.bound_ref, "decide_on": t.decide_on, "severity_level": t.severity,
        "source": t.source, "value": _finite(metrics.get(metric)), "interval": None, "n": None, "count": None,
        "status": status, "reason": reason, "decided_on": "", "severity": 0.0,
    }
    interval = (check.get("intervals") or {}).get(metric)
    if interval is not None and all(_finite(x) is not None for x in interval):
        out["interval"] = [float(interval[0]), float(interval[1])]
        out["interval_method"] = (check.get("interval_methods") or {}).get(metric, "")
    count = (check.get("counts") or {}).get(metric)
    if count is not None:
        out["count"] = [int(count[0]), int(count[1])]
        out["n"] = int(count[1])
    else:
        n = (check.get("n") or {}).get(metric, check.get("sample_size"))
        out["n"] = int(n) if n is not None else None
    return out


def evaluate(t: Threshold, metric: str, check: dict[str, Any]) -> dict[str, Any]:
    o = _outcome(t, metric, check)
    not_evaluated = check.get("not_evaluated") or {}
    if metric in not_evaluated:
        o.update(status="not_evaluated", reason=not_evaluated[metric])
        return o
    bound = t.bound
    if t.bound_ref is not None:
        bound = _finite((check.get("metrics") or {}).get(t.bound_ref))
        if bound is None:
            o.update(status="not_evaluated", reason=f"its bound {t.bound_ref!r} is not defined on this run")
            return o
        o["bound"] = bound
    if o["value"] is None:
        o.update(status="not_evaluated", reason="the metric is undefined on this data")
        return o
    status, decided_on = decide(t.op, bound, o["value"], tuple(o["interval"]) if o["interval"] else None, t.decide_on)
    if status == "fail" and t.severity == "warn":
        status = "warn"
    o.update(status=status, decided_on=decided_on,
             reason="" if status in ("pass", "fail", "warn") else decided_on)
    if status != "pass":
        o["severity"] = _severity(t.op, bound, o["value"], o["interval"])
    return o


def apply_thresholds(results: dict[str, Any], thresholds: list[Threshold]) -> list[dict[str, Any]]:
    """Every threshold's outcome on a run, worst first; each carries its sentence in words."""
    checks = results.get("checks", {})
    outcomes: list[dict[str, Any]] = []
    for t in thresholds:
        check = checks.get(t.check)
        if check is None:
            if t.source == "default":
                continue
            ran = ", ".join(sorted(checks)) or "none"
            raise InputError(f"threshold {t.name!r} ({t.source}): no check {t.check!r} in this run (checks: {ran})")
        execution = check.get("execution", "completed")
        if execution == "skipped":
            outcomes.append(_outcome(t, t.metric, check, "not_evaluated", "the check was not evaluated: " + check.get("summary", "")))
            continue
        if execution == "error":
            outcomes.append(_outcome(t, t.metric, check, "error", "the check errored"))
            continue
        metrics = check.get("metrics") or {}
        known = set(metrics) | set(check.get("not_evaluated") or {})
        if "*" in t.metric:
            matched = sorted(m for m in known if fnmatch.fnmatchcase(m, t.metric))
            if not matched:
                outcomes.append(_outcome(t, t.metric, check, "not_evaluated", "no metric of this run matches"))
            outcomes.extend(evaluate(t, m, check) for m in matched)
            continue
        if t.metric not in known:
            if t.source == "default" or _declared(check, t.metric):
                outcomes.append(_outcome(t, t.metric, check, "not_evaluated", "the check did not report this metric on this run"))
                continue
            names = ", ".join(sorted(metrics)[:30]) or "none"
            raise InputError(f"threshold {t.name!r} ({t.source}): check {t.check!r} reports no metric {t.metric!r} (its metrics: {names})")
        outcomes.append(evaluate(t, t.metric, check))
    for o in outcomes:
        o["passed"] = o["status"] == "pass"
        o["sentence"] = sentence(o, checks.get(o["check"], {}))
    outcomes.sort(key=rank_key)
    return outcomes


def apply_gate(results: dict[str, Any], thresholds: list[Threshold], gated: bool = True,
               policy: GatePolicy | None = None) -> dict[str, Any]:
    """Decide every threshold, derive each check's status and the run's verdict, in place.

    Returns the ``gate`` block of results.json; ``results["verdict"]`` and each check's
    ``status`` are filled in too.
    """
    from mcaudit.verdict import build_verdict, check_status

    policy = policy or GatePolicy()
    outcomes = apply_thresholds(results, thresholds)
    results["thresholds_in_force"] = [t.record() for t in thresholds]
    for name, entry in results.get("checks", {}).items():
        entry.setdefault("execution", _execution_of(entry))
        own = [o for o in outcomes if o["check"] == name]
        entry["status"], entry["status_reason"] = check_status(entry, own)
        entry["thresholds"] = [o["name"] for o in own]
    verdict = build_verdict(results.get("checks", {}), outcomes, gated, policy)
    results["verdict"] = verdict.as_dict()
    gate = {"applied": gated, "passed": verdict.passed, "policy": policy.as_dict(), "results": outcomes}
    results["gate"] = gate
    return gate


def _execution_of(entry: dict[str, Any]) -> str:
    # results.json files from before the status model stored how the check ran as "status".
    old = entry.get("status")
    return {"ok": "completed", "skipped": "skipped", "error": "error"}.get(old, "completed")
