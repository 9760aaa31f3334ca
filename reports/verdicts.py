"""How the status model reads in every output: words, order, caveats.

The terminal, HTML, Markdown and JUnit all take statuses, findings and the headline from
``results["verdict"]`` and each check's ``status``; nothing here decides a status.
"""

from __future__ import annotations

from typing import Any

from mcaudit.verdict import RANK
from mcaudit.verdict import label as status_word  # noqa: F401 - the outputs' name for it


def check_order(results: dict[str, Any]) -> list[str]:
    """Checks worst first: a check's rank is its status, then where its worst finding ranks."""
    checks = results.get("checks", {})
    first = {}
    for i, f in enumerate((results.get("verdict") or {}).get("findings", [])):
        first.setdefault(f["check"], i)
    return sorted(checks, key=lambda n: (RANK.get(checks[n].get("status"), 9), first.get(n, 10**6), n))


def caveats(results: dict[str, Any]) -> list[tuple[str, str]]:
    """Every caveat the run raised: the data's warnings, then each check's, as (where, text)."""
    out = [("data", w) for w in (results.get("dataset") or {}).get("warnings", [])]
    for name in check_order(results):
        out.extend((name, w) for w in results["checks"][name].get("warnings", []))
    return out


def policy_words(policy: dict[str, str]) -> str:
    return (f"inconclusive {'fails' if policy.get('inconclusive') == 'fail' else 'passes'}, "
            f"not evaluated {'fails' if policy.get('not_evaluated') == 'fail' else 'is shown without failing'}, "
            f"warn {'fails' if policy.get('warn') == 'fail' else 'passes'}")
