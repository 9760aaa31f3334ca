"""The abnormality check (zero-shot normal/abnormal detection): metrics against scikit-learn,
a known answer and its clean negative, the cases it cannot evaluate, and bad parameters."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mcaudit import InputError
from mcaudit.plugins.checks.abnormality import AbnormalityCheck
from mcaudit.testing import derive_status, load_adapter, make_context, phantom_dataset


def params(**given):
    return AbnormalityCheck.resolve_params(AbnormalityCheck.profile_params("quick") | given)


@pytest.fixture(scope="module")
def ctx():
    return make_context(load_adapter("demo"), phantom_dataset(300, seed=1))


@pytest.fixture(scope="module")
def clean(ctx):
    return AbnormalityCheck().run(ctx, params())


def with_labels(ctx, labels):
    return dataclasses.replace(ctx, forward=dataclasses.replace(ctx.forward, labels=labels))


def test_known_answer_on_the_demo_and_metrics_against_sklearn(ctx, clean):
    # the demo's "abnormal" class has a lesion its normal/abnormal prompts can see; the class
    # "normal" is found without being named
    m = clean.metrics
    abnormal = ctx.forward.labels == 1
    p = np.array(clean.per_image["p_abnormal"])
    assert m["auroc"] == pytest.approx(roc_auc_score(abnormal, p), abs=1e-12)
    assert m["aupr"] == pytest.approx(average_precision_score(abnormal, p), abs=1e-12)
    assert m["sensitivity"] == np.mean(p[abnormal] >= 0.5) and m["specificity"] == np.mean(p[~abnormal] < 0.5)
    assert clean.counts["sensitivity"] == (int((p[abnormal] >= 0.5).sum()), int(abnormal.sum()))
    class_prompt = ctx.forward.probs[:, 1]  # the one abnormal class's probability
    assert m["class_prompt_auroc"] == pytest.approx(roc_auc_score(abnormal, class_prompt), abs=1e-12)
    assert m["auroc"] >= 0.9
    assert clean.details["normal_classes"] == ["normal"]
    assert "a chest radiograph showing a lesion." in clean.details["abnormal_prompts"]  # state x the prompt file's templates
    lo, hi = clean.intervals["auroc"]
    assert lo <= m["auroc"] <= hi and clean.sample_size == 300
    status, _, outcomes, _ = derive_status(AbnormalityCheck, clean)
    assert outcomes["abnormality.auroc"]["status"] == "pass" and status == "pass"
    assert [f.title for f in clean.figures] == ["ROC curve: zero-shot normal/abnormal detection"]


def test_shuffled_labels_fall_to_chance_and_fail(ctx):
    # Clean negative: labels shuffled, so "abnormal" means nothing; the AUROC falls to chance
    # and the threshold fails on its interval.
    shuffled = np.random.default_rng(3).permutation(ctx.forward.labels)
    r = AbnormalityCheck().run(with_labels(ctx, shuffled), params(normal_classes=["normal"]))
    assert abs(r.metrics["auroc"] - 0.5) <= 0.12
    status, _, outcomes, _ = derive_status(AbnormalityCheck, r)
    assert outcomes["abnormality.auroc"]["status"] == "fail" and status == "fail"


def test_no_normal_class_is_not_evaluated_with_the_reason(ctx):
    dataset = copy.copy(ctx.dataset)
    dataset.classes = ["clear", "opacity"]  # no class name says "normal"
    r = AbnormalityCheck().run(dataclasses.replace(ctx, dataset=dataset), params())
    assert not r.metrics and not r.figures
    assert "abnormality.normal_classes" in r.not_evaluated["auroc"]
    assert any("abnormality.normal_classes" in w for w in r.warnings)
    status, reason, outcomes, _ = derive_status(AbnormalityCheck, r)
    assert status == "not_evaluated" and outcomes["abnormality.auroc"]["status"] == "not_evaluated"
    assert "abnormality.normal_classes" in outcomes["abnormality.auroc"]["sentence"]


def test_only_normal_images_is_not_evaluated(ctx):
    r = AbnormalityCheck().run(with_labels(ctx, np.zeros_like(ctx.forward.labels)), params())
    assert not r.metrics
    assert r.not_evaluated["auroc"] == "the audited images are all normal or all abnormal"
    assert derive_status(AbnormalityCheck, r)[0] == "not_evaluated"


@pytest.mark.parametrize(
    "given, fragment",
    [
        ({"state_templates": ["no placeholder"]}, "state_templates"),
        ({"normal_states": []}, "normal_states"),
        ({"abnormal_states": ["  "]}, "abnormal_states"),
        ({"n_bootstrap": -1}, "n_bootstrap"),
    ],
)
def test_bad_parameters_are_refused_before_the_run(given, fragment):
    with pytest.raises(InputError, match=f"^abnormality\\.{fragment}: "):
        params(**given)


@pytest.mark.parametrize("normal", [["healthy"], ["normal", "abnormal"]])
def test_normal_classes_must_name_some_but_not_all_classes(ctx, normal):
    with pytest.raises(InputError, match="^abnormality\\.normal_classes: "):
        AbnormalityCheck().run(ctx, params(normal_classes=normal))


def test_cli_registers_the_check_and_gates_it(mcaudit_run):
    out = mcaudit_run("--checks", "abnormality", "--data", "phantom:n=80", "--model", "demo",
                      "--set", 'abnormality.normal_classes=["normal"]', "--gate")
    check = out.results["checks"]["abnormality"]
    assert check["execution"] == "completed" and check["metrics"]["auroc"] >= 0.9
    outcomes = {g["name"]: g for g in out.results["gate"]["results"]}
    assert list(outcomes) == ["abnormality.auroc"] and outcomes["abnormality.auroc"]["status"] == "pass"
    assert out.exit_code == 0, out.output


def test_profiles_and_threshold_reasons():
    standard = AbnormalityCheck.resolve_params(AbnormalityCheck.profile_params("standard"))
    assert standard == AbnormalityCheck.resolve_params({})
    assert set(AbnormalityCheck.profiles) == {"quick", "standard", "thorough"}
    assert set(AbnormalityCheck.threshold_reasons) == set(AbnormalityCheck.default_thresholds) == {"auroc"}
