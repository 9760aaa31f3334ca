"""The status the host would give one check's result, without running the command line."""

from __future__ import annotations

from typing import Any


def host_status(check_cls, result) -> tuple[str, dict[str, dict[str, Any]]]:
    """(the check's status, its default thresholds' outcomes by name), as ``mcaudit run`` derives them."""
    from mcaudit.gating import apply_gate, parse_threshold
    from mcaudit.runner import result_entry

    entry = result_entry(result) | {"declared_metrics": list(check_cls.metrics)}
    results = {"checks": {check_cls.name: entry}}
    thresholds = [parse_threshold(f"{check_cls.name}.{m}", spec, "default")
                  for m, spec in check_cls.default_thresholds.items()]
    gate = apply_gate(results, thresholds, gated=False)
    return entry["status"], {o["name"]: o for o in gate["results"]}
