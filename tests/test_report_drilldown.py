"""The drill-down galleries checks return themselves: the adversarial check's attacked images
(original, attacked, change amplified) and the saliency check's heat maps on its most and least
faithful images, checked against samples.csv and against a model evaluated here."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mcaudit import Gallery, GalleryItem
from mcaudit.plugins.checks.adversarial import report as adv_report
from mcaudit.plugins.checks.adversarial.campaign import GallerySource
from mcaudit.plugins.checks.saliency.attributions import METHOD_LABELS
from mcaudit.testing import run_cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=80", "--checks",
                   "performance,adversarial,saliency", "--set", "adversarial.n_images=24"],
                  tmp_path_factory.mktemp("drill") / "o")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO((out.out_dir / "samples.csv").read_text())))
    return out, {row["path"]: row for row in rows}


def _decoded(path) -> Image.Image:
    picture = Image.open(path)
    picture.load()
    return picture


def test_attacked_images_are_attacks_that_succeeded(demo_run):
    out, samples = demo_run
    [gallery] = [g for g in out.results["drilldown"] if g["check"] == "adversarial"]
    items = gallery["items"]
    assert 1 <= len(items) <= 4
    largest = max(out.results["checks"]["adversarial"]["details"]["eps_linf"])
    column = f"adversarial.robust.linf.{round(largest * 255)}/255"
    for item in items:
        row = samples[item["source"]]
        # attacked only when right before the attack; shown only when the attack flipped it,
        # so the worst case over attacks at that budget must have lost it
        assert row["correct"] == "1" and row[column] == "0", (item["source"], row[column])
        assert item["label"] == row["label"] and item["prediction"] != item["label"]
        assert item["confidence"] >= 0.5  # the attacked answer wins over the other of two classes
        assert f"before the attack: {row['label']}, " in item["notes"][0]
        captions = [p["caption"] for p in item["pictures"]]
        assert captions[:2] == ["original", "attacked"] and captions[2].startswith("change x")
        for picture in item["pictures"]:
            stored = _decoded(out.out_dir / picture["file"])
            assert stored.format == "JPEG" and max(stored.size) <= 112
            assert (out.out_dir / picture["file"]).stat().st_size < 8_000
    confidences = [item["confidence"] for item in items]
    assert confidences == sorted(confidences, reverse=True)
    section = out.html[out.html.index('id="check-adversarial"'):]
    section = section[:section.index("</section>")]
    assert section.count('<figure class="picture"><img') == 3 * len(items)
    assert section.count("data:image/jpeg;base64,") >= 3 * len(items)


def test_saliency_gallery_shows_the_most_and_least_faithful_maps(demo_run):
    out, samples = demo_run
    shown = {g["title"]: g for g in out.results["drilldown"] if g["check"] == "saliency"}
    details = out.results["checks"]["saliency"]["details"]
    # independently of the check: each explained image's gain over a random order, from samples.csv
    def gains_of(m):
        return {path: float(row[f"saliency.{m}.deletion_gain"]) + float(row[f"saliency.{m}.insertion_gain"])
                for path, row in samples.items() if row.get(f"saliency.{m}.deletion_gain")}

    # the recommended method, else (none passes the sanity test) the most faithful on average
    method = details["recommended"] or max(details["methods"], key=lambda m: np.mean(list(gains_of(m).values())))
    most = next(g for t, g in shown.items() if t.endswith("most faithful first"))
    least = next(g for t, g in shown.items() if t.endswith("least faithful first"))
    assert most["title"].startswith(METHOD_LABELS[method]) and least["title"].startswith(METHOD_LABELS[method])
    assert ("recommended method" in most["note"]) == bool(details["recommended"])
    gains = gains_of(method)
    k = out.results["checks"]["saliency"]["params"]["gallery"]
    ranked = sorted(gains, key=lambda p: -gains[p])
    assert [i["source"] for i in most["items"]] == ranked[:k]
    assert [i["source"] for i in least["items"]] == ranked[::-1][:k]
    for item in most["items"] + least["items"]:
        row = samples[item["source"]]
        assert item["label"] == row["label"] and item["prediction"] == row["prediction"]
        assert item["confidence"] == pytest.approx(float(row[f"p_{row['prediction']}"]), abs=1e-7)
        gain = float(re.search(r"[-+][\d.]+", item["notes"][0]).group())
        assert gain == pytest.approx(float(row[f"saliency.{method}.deletion_gain"]), abs=1e-3)
        image, heat = (_decoded(out.out_dir / p["file"]) for p in item["pictures"])
        # the original is grey; the overlay adds colour where the map is hot
        assert np.ptp(np.asarray(image.convert("RGB"), float), axis=2).max() < 20
        assert np.ptp(np.asarray(heat.convert("RGB"), float), axis=2).max() > 60


def test_rerendered_report_keeps_the_checks_pictures(demo_run, tmp_path):
    out, _ = demo_run
    again = tmp_path / "again.html"
    done = run_cli(["report", str(out.out_dir / "results.json"), "--out", str(again)])
    assert done.exit_code == 0, done.output
    pictures = sum(len(i.get("pictures", [])) for g in out.results["drilldown"] for i in g["items"])
    assert pictures and again.read_text().count('<figure class="picture"><img') == pictures


class _Linear(torch.nn.Module):
    """Two classes from the mean brightness: bright is class 1."""

    def forward(self, x):
        m = x.flatten(1).mean(dim=1)
        return torch.stack([-(m - 0.5) * 20, (m - 0.5) * 20], dim=1)


class _Ctx:
    classes = ["dark", "bright"]

    def source(self, row):
        return f"img-{row}"

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def test_attack_gallery_orders_by_confidence_after_the_attack_and_shows_the_change():
    model = _Linear()
    clean = torch.full((4, 1, 16, 16), 0.47)  # all dark, class 0
    adv = clean.clone()
    shift = torch.tensor([0.01, 0.0, 0.10, 0.08])  # images 0 and 1 are not fooled
    adv += shift.view(4, 1, 1, 1)
    adv[:, :, :8] = clean[:, :, :8]  # only the lower half changes
    clean_pred = torch.zeros(4, dtype=torch.long)
    adv_pred = model(adv).argmax(dim=1)
    assert adv_pred.tolist() == [0, 0, 1, 1]
    source = GallerySource(clean, torch.arange(4), clean_pred, {("pgd_linf", 0.1): (adv, adv_pred)},
                           np.array([10, 11, 12, 13]), model)
    [gallery] = adv_report.galleries(_Ctx(), source, [0.05, 0.1], count=5)
    assert isinstance(gallery, Gallery) and all(isinstance(i, GalleryItem) for i in gallery.items)
    assert [i.source for i in gallery.items] == ["img-12", "img-13"]  # surest wrong answer first
    after = model(adv[[2, 3]]).softmax(dim=1)[:, 1]
    assert [i.confidence for i in gallery.items] == pytest.approx(after.tolist())
    assert all(i.label == "dark" and i.prediction == "bright" for i in gallery.items)
    assert gallery.items[0].notes[1] == "largest pixel change 25.5/255"
    change = np.asarray(Image.open(io.BytesIO(gallery.items[0].pictures[2][1])).convert("L"), float)
    assert abs(change[:6].mean() - 128) < 6 and change[10:].mean() > 240  # mid-grey unchanged, white raised
    assert "2 of 4" in gallery.note
    assert adv_report.galleries(_Ctx(), source, [0.05, 0.1], count=0) == []
