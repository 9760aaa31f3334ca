"""The drill-down galleries show the right images, and a report re-rendered from results.json
and its folder shows the same figures and galleries."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict

import numpy as np
from PIL import Image

from mcaudit.reports.gallery import PER_CLASS, most_confident_wrong
from mcaudit.testing import run_cli

THUMB = re.compile(r'<figure class="thumb" data-source="([^"]*)"')


def _galleries(html: str) -> dict[str, list[str]]:
    """Gallery title -> the sources of its thumbnails, in page order."""
    out = {}
    for block in html.split("<h3>")[1:]:
        title = block.split("</h3>", 1)[0]
        out.setdefault(title, THUMB.findall(block.split('<div class="gallery">', 1)[1].split("</div>", 1)[0])
                       if '<div class="gallery">' in block.split("<h3>", 1)[0] else [])
    return {t: s for t, s in out.items() if s}


def test_most_confident_wrong_matches_samples_csv(tmp_path):
    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO((out.out_dir / "samples.csv").read_text())))
    classes = out.results["dataset"]["classes"]
    expected = defaultdict(list)
    for i, row in enumerate(rows):  # independently of the report's code: wrong rows, surest first
        if row["correct"] == "0":
            expected[row["label"]].append((-float(row[f"p_{row['prediction']}"]), i, row["path"]))
    shown = _galleries(out.html)
    assert any(expected.values()), "the demo model makes no mistakes: nothing to test"
    for name in classes:
        want = [path for *_, path in sorted(expected[name])[:PER_CLASS]]
        title = f"True class {name}: the most confident mistakes"
        assert shown.get(title, []) == want, (name, shown.get(title), want)
    stored = {g["title"]: g for g in out.results["drilldown"]}
    for g in stored.values():
        for item in g["items"]:
            assert (out.out_dir / item["file"]).is_file()
            assert Image.open(out.out_dir / item["file"]).format == "JPEG"


def test_most_confident_wrong_breaks_ties_by_row():
    labels = np.array([0, 0, 0, 1])
    probs = np.array([[0.2, 0.8], [0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    assert most_confident_wrong(labels, probs) == [0, 1]
    assert most_confident_wrong(labels, probs, np.array([1, 2])) == [1]


def test_rerendered_report_keeps_figures_and_galleries(tmp_path):
    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=120", "--checks", "performance,calibration",
                   "--group", "site"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    results = json.loads((out.out_dir / "results.json").read_text())
    figures = [f for c in results["checks"].values() for f in c.get("figures", [])]
    assert figures and all("data_uri" not in f and (out.out_dir / f["file"]).is_file() for f in figures)
    assert "data:image/png;base64," not in (out.out_dir / "results.json").read_text()  # stored once, as files
    again = tmp_path / "again.html"
    done = run_cli(["report", str(out.out_dir / "results.json"), "--out", str(again)])
    assert done.exit_code == 0, done.output
    first, second = out.html, again.read_text()
    assert second.count('<figure class="plot"><img') == first.count('<figure class="plot"><img') == len(figures)
    assert _galleries(second) == _galleries(first) and any("site = " in t for t in _galleries(first))
    assert 'href="samples.csv"' in second and second.count("<tr") == first.count("<tr")


def test_ood_gallery_shows_the_users_images_surest_first(tmp_path):
    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=40", "--ood", "phantom:n=12",
                   "--checks", "anomaly"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    [gallery] = [g for g in out.results["drilldown"] if g["check"] == "anomaly"]
    confidences = [item["confidence"] for item in gallery["items"]]
    assert len(confidences) == 8 and confidences == sorted(confidences, reverse=True)
    assert all(item["file"].startswith("figures/thumbs/ood-") for item in gallery["items"])
    section = out.html[out.html.index('id="check-anomaly"'):]
    assert "Your OOD images the model was surest about" in section
