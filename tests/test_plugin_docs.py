"""Meta-tests that keep the plugin API honest: every hook documented and tested."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from mcaudit import hookspecs

REPO = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("mcaudit_"))


def _signature(name: str) -> str:
    sig = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


def test_every_hook_is_in_the_reference_with_its_signature():
    doc = (REPO / "docs" / "writing-plugins.md").read_text()
    documented = set(re.findall(r"^### `(mcaudit_\w+)\(", doc, flags=re.M))
    assert documented == set(HOOKS)
    for name in HOOKS:
        assert f"### `{_signature(name)}`" in doc, _signature(name)


def test_every_hook_has_a_test():
    sources = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    untested = [h for h in HOOKS if h not in sources]
    assert not untested, f"hooks without a test: {untested}"


def test_every_public_audit_context_member_is_documented():
    import dataclasses

    from mcaudit.context import AuditContext

    doc = (REPO / "docs" / "writing-plugins.md").read_text()
    members = {n for n in dir(AuditContext) if not n.startswith("_")}
    members |= {f.name for f in dataclasses.fields(AuditContext) if not f.name.startswith("_")}
    undocumented = sorted(m for m in members if f"ctx.{m}" not in doc)
    assert not undocumented, f"AuditContext members missing from docs/writing-plugins.md: {undocumented}"
