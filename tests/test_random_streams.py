"""Random streams: one naming convention, and results that do not depend on which other
checks ran or in what order (each check draws only from streams named after itself)."""

from __future__ import annotations

import re
from pathlib import Path

from mcaudit.testing import run_cli

CHECKS = Path(__file__).resolve().parents[1] / "plugins" / "checks"
STREAM_CALL = re.compile(r"""\b(?:rng|torch_generator|image_rng|stratified_rows)\((?:[^()"']*,\s*)?f?["']([^"']+)["']""")


def _streams_by_check() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(CHECKS.rglob("*.py")):
        rel = path.relative_to(CHECKS)
        check = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if check == "__init__":
            continue
        found.setdefault(check, []).extend(STREAM_CALL.findall(path.read_text()))
    return found


def test_every_stream_is_named_check_colon_purpose():
    found = _streams_by_check()
    assert sum(len(v) for v in found.values()) > 20  # the pattern does see the calls
    bad = {check: [n for n in names if not (n == check or n.startswith(f"{check}:"))] for check, names in found.items()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"streams not named '<check>:<purpose>': {bad}"


ARGS = ["--model", "demo", "--data", "phantom:n=60", "--group", "site", "--set", "adversarial.n_images=12",
        "--set", "certified.n_images=8", "--set", "certified.n=32"]
ORDERED = ["performance", "calibration", "fairness", "adversarial", "certified", "prompt_robustness"]


def test_results_do_not_depend_on_check_order_or_company(tmp_path):
    forward = run_cli(["run", "--quiet", *ARGS, "--checks", ",".join(ORDERED)], tmp_path / "a").results["checks"]
    backward = run_cli(["run", "--quiet", *ARGS, "--checks", ",".join(reversed(ORDERED))], tmp_path / "b").results["checks"]
    for name in ORDERED:
        assert forward[name]["metrics"] == backward[name]["metrics"], name
        assert forward[name]["intervals"] == backward[name]["intervals"], name
    for name in ("fairness", "adversarial"):
        alone = run_cli(["run", "--quiet", *ARGS, "--checks", name], tmp_path / f"alone-{name}").results["checks"][name]
        assert alone["metrics"] == forward[name]["metrics"] and alone["intervals"] == forward[name]["intervals"], name
