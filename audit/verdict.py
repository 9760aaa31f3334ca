"""The one status model every check, threshold and output shares.

A status is a safety claim, so it is earned from evidence, never from "the check ran":

========================  ==================================================================
``pass``                  every threshold on the check is met, with its 95% interval clear of
                          the bound where the metric has one
``warn``                  a finding worth a look that does not fail the audit (a threshold of
                          severity ``warn``, or a check's own warning finding)
``fail``                  a threshold is clearly not met, or the check raised a failing finding
``inconclusive``          the 95% interval straddles a bound: the data cannot decide
``not_evaluated``         the metric or check does not exist for this run (no groups, no OOD
                          set, too few classes, a skipped check); the reason is always given
``error``                 the check raised an exception
========================  ==================================================================

Findings are ordered worst first: error, fail, inconclusive, warn, then by how far past its
bound each value lies. The verdict's headline names the worst finding in words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("error", "fail", "inconclusive", "warn", "not_evaluated", "pass")
# Lower is worse; ``not_evaluated`` ranks after ``warn`` so that evidence of a problem always
# outranks an absence of evidence, and before ``pass`` so that it never hides behind one.
RANK = {status: i for i, status in enumerate(STATUSES)}
LABELS = {
    "error": "error", "fail": "fail", "inconclusive": "inconclusive", "warn": "warn",
    "not_evaluated": "not evaluated", "pass": "pass",
}
FINDING_STATUSES = ("fail", "inconclusive", "warn")


@dataclass
class Finding:
    """Something a check concluded that no threshold captures, for example "gradient masking
    suspected". ``status`` is ``warn``, ``inconclusive`` or ``fail``; ``metric`` optionally ties
    it to one of the check's metrics; ``severity`` orders findings of the same status (larger
    is worse; a threshold's is how far past its bound the value lies, relative to the bound)."""

    status: str
    message: str
    metric: str | None = None
    severity: float = 1.0

    def __post_init__(self):
        if self.status not in FINDING_STATUSES:
            raise ValueError(f"Finding status must be one of {FINDING_STATUSES}, not {self.status!r}")


def worst(statuses) -> str | None:
    statuses = [s for s in statuses if s]
    return min(statuses, key=RANK.__getitem__) if statuses else None


def label(status: str) -> str:
    return LABELS.get(status, status)


@dataclass
class GatePolicy:
    """What each status means for the exit code of a gated run.

    ``not_evaluated``: "show" lists it without failing (the default), "fail" fails the gate
    (``--strict``). ``inconclusive``: "fail" (the default: a bound the data cannot show to be
    met is not met) or "pass". ``warn``: "pass" (the default) or "fail".
    """

    not_evaluated: str = "show"
    inconclusive: str = "fail"
    warn: str = "pass"

    CHOICES = {"not_evaluated": ("show", "fail"), "inconclusive": ("fail", "pass"), "warn": ("pass", "fail")}

    def blocks(self, status: str) -> bool:
        if status in ("fail", "error"):
            return True
        if status == "inconclusive":
            return self.inconclusive == "fail"
        if status == "warn":
            return self.warn == "fail"
        if status == "not_evaluated":
            return self.not_evaluated == "fail"
        return False

    def as_dict(self) -> dict[str, str]:
        return {"not_evaluated": self.not_evaluated, "inconclusive": self.inconclusive, "warn": self.warn}


def check_status(entry: dict[str, Any], outcomes: list[dict[str, Any]]) -> tuple[str, str]:
    """A check's status and the reason in words, from how it ran, its findings and the
    outcomes of the thresholds on its metrics."""
    execution = entry.get("execution", "completed")
    if execution == "error":
        return "error", entry.get("summary", "the check raised an exception")
    if execution == "skipped":
        return "not_evaluated", entry.get("summary", "") or "the check does not apply to this run"
    evidence = [(o["status"], o["sentence"]) for o in outcomes if o["status"] != "not_evaluated"]
    evidence += [(f["status"], f["message"]) for f in entry.get("findings", [])]
    if not evidence:
        if outcomes:
            return "not_evaluated", "; ".join(dict.fromkeys(o["reason"] for o in outcomes))
        return "not_evaluated", "no threshold or finding applies to this check"
    status = worst(s for s, _ in evidence)
    if status == "pass":
        n = sum(1 for s, _ in evidence if s == "pass")
        return "pass", f"{n} threshold(s) met"
    # The first of the worst in the order the host ranks them: thresholds are pre-sorted.
    return status, next(text for s, text in evidence if s == status)


@dataclass
class Verdict:
    status: str
    headline: str
    gated: bool
    passed: bool | None
    policy: dict[str, str]
    counts: dict[str, int]
    findings: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank_key(item: dict[str, Any]) -> tuple:
    return (RANK.get(item["status"], len(RANK)), -float(item.get("severity") or 0.0), item.get("name", ""))


def build_verdict(checks: dict[str, dict[str, Any]], outcomes: list[dict[str, Any]], gated: bool,
                  policy: GatePolicy) -> Verdict:
    """The whole run's verdict: every finding that is not a plain pass, worst first."""
    findings: list[dict[str, Any]] = []
    skipped = {name for name, entry in checks.items() if entry.get("execution") == "skipped"}
    for o in outcomes:
        # A skipped check is one finding with its reason, not one more per threshold on it.
        if o["status"] != "pass" and not (o["status"] == "not_evaluated" and o["check"] in skipped):
            findings.append({"kind": "threshold", "name": o["name"], "check": o["check"], "status": o["status"],
                             "severity": o.get("severity", 0.0), "text": o["sentence"], "source": o.get("source", "")})
    for name, entry in checks.items():
        if entry.get("execution") == "error":
            findings.append({"kind": "error", "name": name, "check": name, "status": "error", "severity": 0.0,
                             "text": f"{name} could not run: {entry.get('summary', '')}"})
        elif entry.get("execution") == "skipped":
            findings.append({"kind": "check", "name": name, "check": name, "status": "not_evaluated", "severity": 0.0,
                             "text": f"{name} not evaluated: {entry.get('summary', '')}"})
        for f in entry.get("findings", []):
            findings.append({"kind": "finding", "name": f"{name}.{f.get('metric') or 'finding'}", "check": name,
                             "status": f["status"], "severity": f.get("severity", 1.0), "text": f"{name}: {f['message']}"})
    findings.sort(key=rank_key)
    statuses = [e.get("status") for e in checks.values()]
    evaluated = [s for s in statuses if s != "not_evaluated"]
    status = worst(evaluated) or "not_evaluated"
    counts = {s: sum(1 for f in findings if f["status"] == s) for s in STATUSES if s != "pass"}
    counts["pass"] = sum(1 for o in outcomes if o["status"] == "pass")
    blocking = [f for f in findings if policy.blocks(f["status"])]
    passed = (not blocking) if gated else None
    if gated and not any(o["status"] != "not_evaluated" for o in outcomes) and not any(
            f["kind"] == "finding" for f in findings):
        passed = False  # nothing was evaluated at all: a gate with no evidence never passes
    headline = _headline(status, findings, counts, outcomes)
    return Verdict(status, headline, gated, passed, policy.as_dict(), counts, findings)


def _headline(status: str, findings: list[dict[str, Any]], counts: dict[str, int], outcomes) -> str:
    serious = [f for f in findings if f["status"] != "not_evaluated"]
    not_evaluated = counts.get("not_evaluated", 0)
    tail = f"; {not_evaluated} not evaluated" if not_evaluated else ""
    if serious:
        first = serious[0]
        more = len(serious) - 1
        extra = f" (and {more} more finding{'s' if more != 1 else ''})" if more else ""
        return f"{label(first['status']).capitalize()}: {first['text']}{extra}{tail}."
    if status == "pass":
        return f"Pass: all {counts['pass']} evaluated threshold(s) met{tail}."
    if findings:
        return f"Not evaluated: {findings[0]['text']}."
    return "Not evaluated: no threshold applies to any check that ran."
