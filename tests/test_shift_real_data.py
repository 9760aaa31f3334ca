"""The shift check on the real medical sets in ../shared/data (skipped without them): the
modality each set is detected as, the corruption families run for it, intervals around their
estimates, severity 0 equal to clean, and the mean corruption error against a second local
model recomputed by hand from samples.csv."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import shared
from mcaudit.plugins.checks.shift import CORE, CORRUPTIONS
from mcaudit.testing import run_cli, save_openclip_folder, tiny_openclip

# quick profile's corruptions (core) and severities, plus severity 0, on 24 images
SETTINGS = ["--set", "shift.severities=0,1,3,5", "--set", "shift.n_images=24", "--set", "shift.examples=false"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny open_clip folders with different random weights: the audited model and a reference."""
    root = tmp_path_factory.mktemp("shift-real")
    return save_openclip_folder(tiny_openclip(0), root / "model"), save_openclip_folder(tiny_openclip(1), root / "reference")


def _shift(data, out, model, *extra):
    result = run_cli(["run", "--quiet", "--model", model, "--data", data, "--checks", "shift", "--profile", "quick",
                      *SETTINGS, *extra], out)
    assert result.exit_code in (0, 1), result.output
    check = result.results["checks"]["shift"]
    assert check["execution"] == "completed", check.get("summary")
    return check


def _assert_sound(check, modality: str) -> None:
    """The modality's quick corruptions ran; intervals hold their estimates; severity 0 is clean."""
    m, details = check["metrics"], check["details"]
    assert details["modality"] == modality
    assert details["corruptions"] == list(CORE[modality])
    assert {CORRUPTIONS[c].family for c in details["corruptions"]} == {CORRUPTIONS[c].family for c in CORE[modality]}
    assert details["severities"] == [0, 1, 3, 5] and m["n_images"] == 24
    for c in details["corruptions"]:
        assert m[f"accuracy.{c}.s0"] == m["clean_accuracy"]
        assert m[f"balanced_accuracy.{c}.s0"] == m["clean_balanced_accuracy"]
    assert len(check["intervals"]) >= 3 * len(details["corruptions"])
    for name, (lo, hi) in check["intervals"].items():
        assert lo - 1e-9 <= m[name] <= hi + 1e-9, (name, lo, m[name], hi)
    assert 0 <= m["mean_accuracy_drop"] + 1 <= 2 and np.isfinite(m["ece.s5"])


def _column_mean(rows, column: str) -> float:
    return float(np.mean([int(r[column]) for r in rows if r[column] != ""]))


def test_pneumoniamnist_radiography_and_mce_from_samples(tiny_models, tmp_path):
    npz = shared("pneumoniamnist/pneumoniamnist.npz")
    model, reference = tiny_models
    check = _shift(npz, tmp_path / "o", model, "--split", "test", "--reference-model", reference)
    _assert_sound(check, "radiography")
    assert check["details"]["modality_source"] == "the MedMNIST file name (pneumoniamnist)"
    with open(tmp_path / "o" / "samples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(r["shift.correct.clean"] != "" for r in rows) == 24
    # CE = errors summed over severities / the reference's; mCE = mean over corruptions
    severities, ces = check["details"]["severities"], []
    for c in check["details"]["corruptions"]:
        ours = sum(1 - _column_mean(rows, f"shift.correct.{c}.s{s}") for s in severities)
        theirs = sum(1 - _column_mean(rows, f"shift.reference_correct.{c}.s{s}") for s in severities)
        assert check["metrics"][f"ce.{c}"] == pytest.approx(ours / theirs, rel=1e-9)
        ces.append(ours / theirs)
    assert check["metrics"]["mce"] == pytest.approx(np.mean(ces), rel=1e-9)
    lo, hi = check["intervals"]["mce"]
    assert lo <= check["metrics"]["mce"] <= hi


def test_oasis_mri_from_a_modality_column(tiny_models, tmp_path):
    source = shared("oasis1/manifest.csv")
    with open(source, newline="") as fh:
        rows = list(csv.DictReader(fh))
    manifest = tmp_path / "oasis.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "subject", "modality"])
        writer.writeheader()
        for r in rows:  # absolute paths: the images stay in ../shared/data
            writer.writerow({"path": str(source.parent / r["path"]), "label": r["label"], "subject": r["subject"],
                             "modality": "MR"})
    check = _shift(manifest, tmp_path / "o", tiny_models[0])
    _assert_sound(check, "mri")
    assert check["details"]["modality_source"] == "the manifest's modality column"
    assert {CORRUPTIONS[c].family for c in check["details"]["corruptions"]} == {"k-space"}
    # three views per subject: the intervals resample subjects
    assert "subjects" in check["interval_methods"]["accuracy_drop.ghosting"]


def test_ham10000_dermoscopy_from_colour(tiny_models, tmp_path):
    check = _shift(shared("ham10000/manifest.csv"), tmp_path / "o", tiny_models[0])
    _assert_sound(check, "dermoscopy")
    assert check["details"]["modality_source"].startswith("a guess: the images are in colour")
    assert any("dermoscopy" in w for w in check["warnings"])
