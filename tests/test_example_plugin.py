"""The example plugin package (examples/mcaudit-leakage): pip-installed, found through its entry
point, run, reported; and its known answers: duplicates planted across two subjects are found,
a clean set gives none."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mcaudit.testing import run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mcaudit-leakage"
MODULE = EXAMPLE / "mcaudit_leakage.py"
# The demo model maps its synthetic phantoms close together (nearest other phantom at cosine
# 0.993-0.9996), while a copy with +-1 grey level of noise stays above 0.9999.
THRESHOLD = "leakage.threshold=0.9998"


@pytest.fixture(scope="module")
def installed_example():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(EXAMPLE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    yield
    subprocess.run([*pip, "uninstall", "-y", "mcaudit-leakage"], capture_output=True, text=True)


def _manifest(folder: Path, n: int = 36, planted: tuple[tuple[int, bool], ...] = ()) -> Path:
    """Demo phantoms as PNGs, one subject each; for each (i, relabel) in ``planted`` a copy of
    image i with +-1 grey level of noise under a new subject (with the other label when
    ``relabel``)."""
    from PIL import Image

    from mcaudit.testing import phantom_dataset

    data = phantom_dataset(n, seed=5, groups=())
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["path,label,subject"]
    for i in range(n):
        pixels = (data[i]["pixels"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{data.classes[data.records[i].label]},patient-{i}")
    for k, (i, relabel) in enumerate(planted):
        copy = np.asarray(Image.open(folder / f"{i}.png")).astype(int) + rng.integers(-1, 2, size=(64, 64, 1))
        Image.fromarray(np.clip(copy, 0, 255).astype(np.uint8)).save(folder / f"copy{k}.png")
        label = data.records[i].label ^ int(relabel)
        lines.append(f"copy{k}.png,{data.classes[label]},patient-{n + k}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def _run(manifest: Path, out: Path, *extra: str):
    result = run_cli(["run", "--quiet", "--model", "demo", "--data", manifest, "--checks", "leakage", *extra], out)
    assert result.exit_code in (0, 1), result.output
    return result


def _samples(out: Path) -> dict[str, dict[str, str]]:
    return {row["path"]: row for row in csv.DictReader(io.StringIO((out / "samples.csv").read_text()))}


def test_installed_plugin_is_listed_run_and_reported(installed_example, tmp_path, monkeypatch):
    monkeypatch.delenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    info = json.loads(run_cli(["plugins", "--json"]).output)
    plugin = next(p for p in info["plugins"] if p["name"] == "leakage")
    assert plugin["source"].startswith("entry point mcaudit_leakage")
    check = next(c for c in info["checks"] if c["name"] == "leakage")
    assert check["default_thresholds"] == {"leaked_fraction": "<= 0.01",
                                           "label_conflict_pairs": {"rule": "<= 0", "severity": "warn"}}

    manifest = _manifest(tmp_path / "data", planted=((3, False),))
    out = _run(manifest, tmp_path / "o", "--set", THRESHOLD)
    leakage = out.results["checks"]["leakage"]
    assert leakage["metrics"]["cross_subject_pairs"] == 1 and leakage["status"] == "fail"
    assert 'id="check-leakage"' in out.html and "Near-duplicate pairs" in out.html
    # blocked by its entry-point name
    blocked = json.loads(run_cli(["plugins", "--json", "-p", "no:leakage"]).output)
    assert all(c["name"] != "leakage" for c in blocked["checks"])


def test_duplicates_planted_across_subjects_are_found(tmp_path):
    manifest = _manifest(tmp_path / "data", planted=((3, False), (10, False), (20, True)))
    out = _run(manifest, tmp_path / "o", "-p", MODULE, "--set", THRESHOLD)
    leakage = out.results["checks"]["leakage"]
    m = leakage["metrics"]
    assert m["n_images"] == 39 and m["near_duplicate_pairs"] == m["cross_subject_pairs"] == 3
    assert m["leaked_fraction"] == pytest.approx(6 / 39) and m["label_conflict_pairs"] == 1
    assert leakage["status"] == "fail"
    pairs = {tuple(sorted(row[:2])) for row in leakage["tables"][0]["rows"]}
    assert pairs == {("3.png", "copy0.png"), ("10.png", "copy1.png"), ("20.png", "copy2.png")}
    samples = _samples(tmp_path / "o")
    flagged = {path for path, row in samples.items() if row["leakage.leaked"] == "1"}
    assert flagged == {"3.png", "10.png", "20.png", "copy0.png", "copy1.png", "copy2.png"}
    assert {p for p, row in samples.items() if row["leakage.label_conflict"] == "1"} == {"20.png", "copy2.png"}
    assert samples["copy1.png"]["leakage.nearest_image"] == "10.png"
    assert float(samples["copy1.png"]["leakage.nearest_similarity"]) > 0.9998


def test_a_clean_set_has_no_duplicates_and_passes(tmp_path):
    out = _run(_manifest(tmp_path / "data"), tmp_path / "o", "-p", MODULE, "--set", THRESHOLD)
    leakage = out.results["checks"]["leakage"]
    assert leakage["metrics"]["near_duplicate_pairs"] == 0 and leakage["metrics"]["leaked_fraction"] == 0
    assert leakage["status"] == "pass" and leakage["tables"][0]["rows"] == []
    assert all(row["leakage.leaked"] == "0" for row in _samples(tmp_path / "o").values())


def test_a_threshold_the_embedding_cannot_honour_is_not_evaluated(tmp_path):
    """At the default 0.97 every demo phantom is a 'duplicate' of another: the check says it
    cannot decide rather than failing the whole set."""
    out = _run(_manifest(tmp_path / "data", n=24), tmp_path / "o", "-p", MODULE)
    leakage = out.results["checks"]["leakage"]
    assert leakage["status"] == "not_evaluated", leakage["status_reason"]
    assert "do not tell images apart" in " ".join(leakage["warnings"])
