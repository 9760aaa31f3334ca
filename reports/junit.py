"""JUnit XML: one test case per threshold, so CI systems show the audit like a test run."""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree as ET


def junit_xml(results: dict[str, Any]) -> str:
    gate = results.get("gate") or {}
    rows = gate.get("results", [])
    checks = results.get("checks", {})
    errored = {n: c for n, c in checks.items() if c.get("status") == "error"}
    suite = ET.Element(
        "testsuite",
        name=f"mcaudit {results.get('model', {}).get('spec', '')}",
        tests=str(len(rows) + len(errored)),
        failures=str(sum(not r["passed"] for r in rows)),
        errors=str(len(errored)),
        time=str(results.get("duration_s", 0)),
        timestamp=str(results.get("finished_at", "")),
    )
    for r in rows:
        check = r["name"].split(".", 1)[0]
        case = ET.SubElement(suite, "testcase", classname=f"mcaudit.{check}", name=f"{r['name']} {r['op']} {r['bound']:g}",
                             time=str(checks.get(check, {}).get("duration_s", 0)))
        if not r["passed"]:
            value = "n/a" if r["value"] is None else f"{r['value']:.6g}"
            failure = ET.SubElement(case, "failure", message=f"{r['name']} = {value}, needs {r['op']} {r['bound']:g}")
            failure.text = r.get("reason") or f"threshold from {r['source']}"
    for name, c in errored.items():
        case = ET.SubElement(suite, "testcase", classname=f"mcaudit.{name}", name=f"{name} ran", time=str(c.get("duration_s", 0)))
        err = ET.SubElement(case, "error", message=c.get("summary", "check errored"))
        err.text = c.get("error", "")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
