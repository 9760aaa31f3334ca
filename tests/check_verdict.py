"""The status the host derives for one check's result, without a full ``mcaudit run``.

Known-answer tests call a check's ``run`` directly (fast, on a prepared context); this turns its
CheckResult into the results.json entry and applies the check's default thresholds exactly as
the runner does, so a test can assert the verdict a user would see.
"""

from __future__ import annotations

from typing import Any


def derive_verdict(check_cls, result) -> tuple[str, str, list[dict[str, Any]], dict[str, Any]]:
    """(status, status reason, threshold outcomes, results.json entry) under the default thresholds."""
    from mcaudit.gating import apply_gate, collect_thresholds
    from mcaudit.runner import result_entry

    name = check_cls.name
    entry = result_entry(result) | {"declared_metrics": list(check_cls.metrics)}
    results = {"checks": {name: entry}}
    defaults = {f"{name}.{m}": v for m, v in check_cls.default_thresholds.items()}
    apply_gate(results, collect_thresholds(None, {}, defaults), gated=False)
    entry = results["checks"][name]
    return entry["status"], entry["status_reason"], results["gate"]["results"], entry
