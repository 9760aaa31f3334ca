"""JUnit XML: one test case per threshold and per finding, so CI shows the audit like a test run.

fail and error are JUnit failures and errors; not evaluated is ``<skipped>`` with its reason;
inconclusive and warn fail the case only when the gate policy says they fail the gate. Each
case carries its mcaudit status as a property, and the suite's ``system-out`` holds the
headline and every caveat.
"""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree as ET

from mcaudit.reports.verdicts import caveats
from mcaudit.verdict import GatePolicy


def _case(suite, classname: str, name: str, time: Any, status: str, message: str, policy: GatePolicy, detail: str = ""):
    case = ET.SubElement(suite, "testcase", classname=classname, name=name, time=str(time))
    props = ET.SubElement(case, "properties")
    ET.SubElement(props, "property", name="status", value=status)
    if status == "error":
        ET.SubElement(case, "error", message=message).text = detail or message
    elif status == "not_evaluated":
        ET.SubElement(case, "skipped", message=f"not evaluated: {message}")
    elif status == "fail" or policy.blocks(status):
        ET.SubElement(case, "failure", message=f"{status}: {message}", type=status).text = detail or message
    elif status != "pass":
        ET.SubElement(case, "system-out").text = f"{status}: {message}"
    return case


def junit_xml(results: dict[str, Any]) -> str:
    """One ``<testsuite>``; a multi-model audit gives ``<testsuites>`` with one suite per model."""
    if results.get("kind") == "models":
        suites = ET.Element("testsuites", name=f"mcaudit: {len(results['models'])} models")
        for label, one in results["models"].items():
            suite = _suite(one)
            suite.set("name", f"mcaudit {label}")
            suites.append(suite)
        ET.indent(suites)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
    suite = _suite(results)
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def _suite(results: dict[str, Any]) -> ET.Element:
    gate = results.get("gate") or {}
    policy = GatePolicy(**(gate.get("policy") or {}))
    checks = results.get("checks", {})
    suite = ET.Element("testsuite", name=f"mcaudit {results.get('model', {}).get('spec', '')}",
                       time=str(results.get("duration_s", 0)), timestamp=str(results.get("finished_at", "")))
    for r in gate.get("results", []):
        check = checks.get(r["check"], {})
        _case(suite, f"mcaudit.{r['check']}", f"{r['name']} {r['rule']}", check.get("duration_s", 0), r["status"],
              r["sentence"], policy, f"threshold from {r['source']}")
    for name, c in checks.items():
        for f in c.get("findings", []):
            _case(suite, f"mcaudit.{name}", f"{name} finding: {f['message']}", c.get("duration_s", 0), f["status"],
                  f["message"], policy)
        if c.get("execution") == "error":
            _case(suite, f"mcaudit.{name}", f"{name} ran", c.get("duration_s", 0), "error", c.get("summary", "check errored"),
                  policy, c.get("error", ""))
        elif c.get("execution") == "skipped":
            _case(suite, f"mcaudit.{name}", f"{name} ran", c.get("duration_s", 0), "not_evaluated", c.get("summary", ""), policy)
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("errors", str(sum(c.find("error") is not None for c in cases)))
    suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    verdict = results.get("verdict") or {}
    out = [f"verdict: {verdict.get('status', '')}: {verdict.get('headline', '')}"]
    out += [f"check {n}: {c.get('status')}: {c.get('status_reason', '')}" for n, c in checks.items()]
    out += [f"caveat ({where}): {text}" for where, text in caveats(results)]
    ET.SubElement(suite, "system-out").text = "\n".join(out)
    return suite
