"""The performance check's 95% intervals: the methods it names, subjects, and real data."""

from __future__ import annotations

import numpy as np
import pytest

from mcaudit.metrics import AUROC_CLUSTER_METHOD, AUROC_METHOD, wilson_interval


def run_performance(ctx, **given):
    from mcaudit.plugins.checks.performance import PerformanceCheck

    check = PerformanceCheck()
    return check.run(ctx, check.resolve_params(given))


@pytest.fixture(scope="module")
def demo_ctx(mcaudit_demo_model):
    from mcaudit.testing import make_context, phantom_dataset

    return make_context(mcaudit_demo_model, phantom_dataset(n=160, seed=3, image_size=mcaudit_demo_model.image_size))


def test_every_interval_names_its_method_and_holds_its_value(demo_ctx):
    result = run_performance(demo_ctx)
    methods = result.details["interval_methods"]
    assert set(methods) == set(result.intervals)
    assert {"accuracy", "balanced_accuracy", "auroc_macro"} <= set(methods)
    assert methods["accuracy"] == "Wilson score" and methods["auroc_macro"] == AUROC_METHOD
    assert "Jeffreys" in methods["balanced_accuracy"]
    for metric, (lo, hi) in result.intervals.items():
        assert lo <= result.metrics[metric] <= hi, metric
        assert hi > lo, metric
    k, n = result.counts["accuracy"]
    assert result.intervals["accuracy"] == pytest.approx(wilson_interval(k, n))


def test_subjects_widen_the_intervals_when_their_images_agree(demo_ctx):
    # Known answer: group images into subjects of 10 whose predictions are all right or all
    # wrong. Each subject then carries one image's worth of evidence, so the intervals must
    # widen to roughly sqrt(10) times the image-level ones.
    recs = demo_ctx.dataset.records
    fwd = demo_ctx.forward
    correct = fwd.labels == fwd.preds
    plain = run_performance(demo_ctx)
    try:
        for outcome in (True, False):
            rows = np.flatnonzero(correct == outcome)
            for r, i in enumerate(fwd.indices[rows]):
                recs[i].subject = f"{outcome}-{r // 10}"
        clustered = run_performance(demo_ctx)
    finally:
        for rec in recs:
            rec.subject = None
    methods = clustered.details["interval_methods"]
    assert "design effect" in methods["accuracy"] and "subjects" in methods["balanced_accuracy"]
    assert methods["auroc_macro"] == AUROC_CLUSTER_METHOD
    assert plain.metrics == clustered.metrics
    for metric in ("accuracy", "balanced_accuracy"):
        wide = np.diff(clustered.intervals[metric])[0]
        narrow = np.diff(plain.intervals[metric])[0]
        assert wide > 2 * narrow, metric
        lo, hi = clustered.intervals[metric]
        assert lo <= clustered.metrics[metric] <= hi


def test_too_few_resamples_is_an_input_error_before_the_model_loads():
    from mcaudit import InputError
    from mcaudit.plugins.checks.performance import PerformanceCheck

    with pytest.raises(InputError, match="performance.n_bootstrap"):
        PerformanceCheck.resolve_params({"n_bootstrap": 10})


def test_pneumoniamnist_accuracy_interval_is_as_wide_as_the_sampling_spread(mcaudit_demo_model):
    # Issue 14: the class-stratified bootstrap gave 0.377 to 0.391 (width 0.014) for the
    # demo model on the 624 test images, where the sampling spread alone is about 0.076.
    from conftest import shared

    from mcaudit.plugins.formats.image_sets import load_medmnist
    from mcaudit.hook_types import DataRequest
    from mcaudit.testing import make_context

    npz = shared("pneumoniamnist/pneumoniamnist.npz")
    dataset = load_medmnist(npz, DataRequest(image_size=mcaudit_demo_model.image_size, split="test"))
    result = run_performance(make_context(mcaudit_demo_model, dataset, batch_size=128))
    n = len(dataset)
    assert n == 624
    acc = result.metrics["accuracy"]
    lo, hi = result.intervals["accuracy"]
    w_lo, w_hi = wilson_interval(round(acc * n), n)
    assert hi - lo >= 0.8 * (w_hi - w_lo) and lo <= acc <= hi
    for metric in ("balanced_accuracy", "auroc_macro"):
        m_lo, m_hi = result.intervals[metric]
        assert m_lo <= result.metrics[metric] <= m_hi and m_hi > m_lo, metric


# --- the manifest's subject column -------------------------------------------------------------


def write_manifest(folder, header, rows):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.csv"
    path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")
    return path


@pytest.mark.parametrize("column", ["subject", "subject_id", "patient", "patient_id"])
def test_manifest_subject_column_fills_record_subject_not_groups(tmp_path, column):
    from mcaudit.plugins.formats.image_sets import load_manifest
    from mcaudit.hook_types import DataRequest

    path = write_manifest(tmp_path, ["path", "label", column, "sex"],
                          [["a.png", "x", "p1", "F"], ["b.png", "y", "p1", "F"], ["c.png", "x", "", "M"]])
    ds = load_manifest(path, DataRequest(groups=("sex",)))
    assert [r.subject for r in ds.records] == ["p1", "p1", None]
    assert all(set(r.groups) == {"sex"} for r in ds.records)
    named = load_manifest(path, DataRequest(groups=(column,)))
    assert [r.groups[column] for r in named.records] == ["p1", "p1", ""]
    assert named.records[0].subject == "p1"


def test_manifest_without_subject_column_has_no_subjects(tmp_path):
    from mcaudit.plugins.formats.image_sets import load_manifest
    from mcaudit.hook_types import DataRequest

    ds = load_manifest(write_manifest(tmp_path, ["path", "label", "site"], [["a.png", "x", "s1"]]), DataRequest())
    assert ds.records[0].subject is None and ds.records[0].groups == {"site": "s1"}


def test_csv_format_description_names_the_subject_columns():
    from mcaudit.plugins.formats import image_sets as formats

    infos = []
    formats.mcaudit_register_data_formats(infos.append)
    csv = next(i for i in infos if i.name == "csv")
    assert all(name in csv.description for name in formats.SUBJECT_COLUMNS)


def test_oasis_views_of_one_subject_are_resampled_together(mcaudit_demo_model, tmp_path):
    # Real data: OASIS-1 has three views (axial, coronal, sagittal) of each subject.
    import csv

    from conftest import shared

    from mcaudit.plugins.formats.image_sets import load_manifest
    from mcaudit.hook_types import DataRequest
    from mcaudit.testing import make_context

    manifest = shared("oasis1/manifest.csv")
    full = load_manifest(manifest, DataRequest(image_size=mcaudit_demo_model.image_size))
    subjects = [r.subject for r in full.records]
    assert len(subjects) == 588 and len(set(subjects)) == 196
    assert all("subject" not in r.groups for r in full.records)
    # A small slice of it through the check: twelve subjects, all their views.
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    keep = sorted({r["subject"] for r in rows})[:12]
    subset = [r for r in rows if r["subject"] in keep]
    small = write_manifest(tmp_path, ["path", "label", "subject"],
                           [[str(manifest.parent / r["path"]), r["label"], r["subject"]] for r in subset])
    ds = load_manifest(small, DataRequest(image_size=mcaudit_demo_model.image_size))
    result = run_performance(make_context(mcaudit_demo_model, ds))
    methods = result.details["interval_methods"]
    assert methods["accuracy"] == "Wilson score with the design effect of 12 subjects"
    assert methods["balanced_accuracy"].startswith("percentile bootstrap over 12 subjects")
    for metric, (lo, hi) in result.intervals.items():
        assert lo <= result.metrics[metric] <= hi, metric
