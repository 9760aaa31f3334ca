"""The example data-format plugin in examples/ works as its docstring says."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mcaudit.testing import run_cli

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "jsonl_format_plugin.py"


def _write(folder: Path, n: int = 24) -> Path:
    from mcaudit.demo.phantoms import render_phantom

    lines = []
    for i in range(n):
        img, attrs = render_phantom(3, i)
        Image.fromarray((img * 255).astype("uint8")).save(folder / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "label": ["normal", "opacity"][attrs["label"]],
                                 "subject": f"P{i // 2}", "groups": {"sex": attrs["sex"]}}))
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "m.jsonl"


def test_jsonl_example_format_audits_with_groups_subjects_and_ood(tmp_path):
    manifest = _write(tmp_path)
    out = run_cli(["run", "--quiet", "-p", PLUGIN, "--model", "demo", "--data", manifest, "--group", "sex",
                   "--ood", manifest, "--checks", "performance,fairness"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    r = out.results
    assert r["dataset"]["format"] == "jsonl" and r["dataset"]["images"] == 24
    assert r["dataset"]["group_columns"] == ["sex"]
    # The subjects reached the intervals: two images per subject, resampled together.
    assert "12 subjects" in r["checks"]["performance"]["interval_methods"]["accuracy"]
    listed = run_cli(["plugins", "-p", PLUGIN])
    assert "jsonl (jsonl_format_plugin)" in listed.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "0.png", "label": "normal"}\n{not json\n')
    err = run_cli(["run", "--quiet", "-p", PLUGIN, "--model", "demo", "--data", bad], tmp_path / "o2")
    assert err.exit_code == 2 and "bad.jsonl line 2: not JSON" in err.output
