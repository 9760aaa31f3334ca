"""Zero-shot normal/abnormal detection: can prompts that describe a normal or an abnormal
image, without naming any class, tell the abnormal audited images from the normal ones?

Which classes count as normal is the user's to say (``abnormality.normal_classes``); without
that, a single class with a name such as "normal" or "healthy" is taken. The images are not
encoded again: their features come from the shared forward pass.
"""

from __future__ import annotations

import numpy as np
import torch

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl
from mcaudit.metrics import auroc_binary, average_precision, bootstrap_interval, delong_interval

DELONG = "DeLong (exact pairs bound where the variance is zero)"
PATIENT_BOOTSTRAP = "percentile bootstrap over patients"

AUTO_NORMAL_NAMES = ("normal", "healthy", "no finding", "no findings", "no dementia", "no disease", "negative")
NORMAL_STATES = ["no abnormality", "no lesion", "normal findings", "healthy tissue", "no disease"]
ABNORMAL_STATES = ["an abnormality", "a lesion", "abnormal findings", "diseased tissue", "disease"]
STATE_TEMPLATES = ["a medical image showing {}.", "a radiology image with {}.", "a clinical image of {}."]
METRICS = ("auroc", "aupr", "sensitivity", "specificity", "class_prompt_auroc")


def _phrases(values: list) -> None:
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError("needs a non-empty list of non-empty strings")


def _templates(values: list) -> None:
    _phrases(values)
    for t in values:
        if t.count("{}") != 1:
            raise ValueError(f"{t!r} must contain exactly one {{}}")


class AbnormalityCheck(Check):
    name = "abnormality"
    description = (
        "Zero-shot normal/abnormal detection: how well prompts describing a normal or an abnormal "
        "image (no class names) separate the abnormal classes from the normal ones. The audited "
        "images are not encoded again."
    )
    params = {
        "normal_classes": Param([], "classes that count as normal; the others are abnormal. Empty: a class named normal, healthy, no finding, no dementia, no disease or negative, if exactly one is"),
        "normal_states": Param(list(NORMAL_STATES), "state phrases for a normal image", validate=_phrases),
        "abnormal_states": Param(list(ABNORMAL_STATES), "state phrases for an abnormal image", validate=_phrases),
        "state_templates": Param(list(STATE_TEMPLATES), "templates with one {} for the state phrases; the prompt file's templates are added", validate=_templates),
        "n_bootstrap": Param(1000, "patient bootstrap resamples for the AUROC interval when the data name patients (at least 200 are drawn); otherwise the interval is DeLong's", min=0),
    }
    metrics = {
        "auroc": "AUROC of the abnormal-prompt probability against the normal/abnormal class mapping",
        "aupr": "average precision of the same, abnormal images positive",
        "sensitivity": "share of abnormal images with abnormal-prompt probability >= 0.5",
        "specificity": "share of normal images with abnormal-prompt probability < 0.5",
        "class_prompt_auroc": "for comparison, AUROC of the summed class-prompt probabilities of the abnormal classes",
    }
    default_thresholds = {"auroc": ">= 0.70"}
    threshold_reasons = {
        "auroc": "an AUROC of 0.7 is the usual floor of acceptable discrimination for a diagnostic test "
                 "(Hosmer and Lemeshow, Applied Logistic Regression; Mandrekar, J Thorac Oncol 2010)",
    }
    # Every audited image is scored from the shared forward pass, so the profiles differ only in
    # the patient bootstrap, which is used when the data name patients.
    profiles = {
        "quick": {"n_bootstrap": 200},
        "standard": {"n_bootstrap": 1000},
        "thorough": {"n_bootstrap": 2000},
    }

    def run(self, ctx, params):
        normal = normal_classes(ctx.classes, params["normal_classes"])
        result = CheckResult(sample_size=len(ctx.forward))
        if normal is None:
            return _not_evaluated(result, "no class is known to be normal: set abnormality.normal_classes to the "
                                          "classes that count as normal")
        abnormal = ~np.isin(ctx.forward.labels, [ctx.classes.index(c) for c in normal])
        if abnormal.all() or not abnormal.any():
            return _not_evaluated(result, "the audited images are all normal or all abnormal")
        normal_prompts, abnormal_prompts = state_prompts(params, ctx.prompts.all_templates())
        p_abnormal = _abnormal_probability(ctx, normal_prompts, abnormal_prompts)
        class_prompt = ctx.forward.probs[:, ~np.isin(ctx.classes, normal)].sum(axis=1)
        result.metrics = _metrics(abnormal, p_abnormal, class_prompt)
        _auroc_interval(ctx, result, abnormal, p_abnormal, params["n_bootstrap"])
        _sizes(result, abnormal, p_abnormal)
        result.per_image["p_abnormal"] = [float(v) for v in p_abnormal]
        result.details = {"normal_classes": normal, "normal_prompts": normal_prompts, "abnormal_prompts": abnormal_prompts}
        result.tables.append(_table(ctx.classes, normal, abnormal, result.metrics, normal_prompts, abnormal_prompts))
        result.figures.append(_roc(abnormal, p_abnormal, class_prompt))
        result.summary = _summary(result, abnormal)
        return result


def normal_classes(classes: list[str], given: list[str]) -> list[str] | None:
    """The classes that count as normal: those given, or the one class whose name says
    normal; None when no single class does."""
    if given:
        unknown = [c for c in given if c not in classes]
        if unknown:
            raise InputError(f"abnormality.normal_classes: {unknown[0]!r} is not a class (classes: {', '.join(classes)})")
        if set(given) == set(classes):
            raise InputError("abnormality.normal_classes: every class is normal, so nothing is abnormal")
        return list(given)
    found = [c for c in classes if c.strip().lower() in AUTO_NORMAL_NAMES]
    return found if len(found) == 1 else None


def state_prompts(params, extra_templates) -> tuple[list[str], list[str]]:
    templates = list(dict.fromkeys(list(params["state_templates"]) + list(extra_templates)))
    normal = [t.format(s) for s in params["normal_states"] for t in templates]
    abnormal = [t.format(s) for s in params["abnormal_states"] for t in templates]
    return normal, abnormal


def _abnormal_probability(ctx, normal_prompts, abnormal_prompts) -> np.ndarray:
    with torch.inference_mode():
        text = ctx.model.class_text_features([normal_prompts, abnormal_prompts]).float().cpu()
    logits = ctx.model.logit_scale * ctx.forward.image_features.double() @ text.double().T
    return torch.softmax(logits, dim=1)[:, 1].numpy()


def _metrics(abnormal, p_abnormal, class_prompt) -> dict[str, float]:
    return {
        "auroc": auroc_binary(abnormal, p_abnormal),
        "aupr": average_precision(abnormal, p_abnormal),
        "sensitivity": float(np.mean(p_abnormal[abnormal] >= 0.5)),
        "specificity": float(np.mean(p_abnormal[~abnormal] < 0.5)),
        "class_prompt_auroc": auroc_binary(abnormal, class_prompt),
    }


def _auroc_interval(ctx, result, abnormal, p_abnormal, n_boot) -> None:
    """DeLong's interval over images, or a bootstrap over patients when the data name them
    (one patient's slices are not independent images)."""
    clusters = ctx.clusters()
    if clusters is None or len(set(clusters)) == len(clusters):
        (lo, hi), method = delong_interval(abnormal, p_abnormal), DELONG
    else:
        lo, hi = bootstrap_interval(lambda i: auroc_binary(abnormal[i], p_abnormal[i]), len(abnormal),
                                    ctx.rng("abnormality:bootstrap"), max(n_boot, 200), clusters=clusters)
        method = PATIENT_BOOTSTRAP
    if np.isfinite(lo):
        result.intervals["auroc"] = (lo, hi)
        result.interval_methods["auroc"] = method


def _sizes(result, abnormal, p_abnormal) -> None:
    n_abnormal, n_normal = int(abnormal.sum()), int((~abnormal).sum())
    result.n |= {"auroc": len(abnormal), "aupr": len(abnormal), "class_prompt_auroc": len(abnormal),
                 "sensitivity": n_abnormal, "specificity": n_normal}
    result.counts["sensitivity"] = (int((p_abnormal[abnormal] >= 0.5).sum()), n_abnormal)
    result.counts["specificity"] = (int((p_abnormal[~abnormal] < 0.5).sum()), n_normal)


def _not_evaluated(result: CheckResult, reason: str) -> CheckResult:
    result.not_evaluated = {k: reason for k in METRICS}
    result.warnings.append(f"zero-shot normal/abnormal detection not run: {reason}")
    result.summary = f"Zero-shot normal/abnormal detection not evaluated: {reason}."
    return result


def _table(classes, normal, abnormal, m, normal_prompts, abnormal_prompts) -> Table:
    return Table(
        "Zero-shot anomaly detection with normal/abnormal prompts",
        ["measure", "value"],
        [["normal classes", ", ".join(normal)],
         ["abnormal classes", ", ".join(c for c in classes if c not in normal)],
         ["images (normal / abnormal)", f"{int((~abnormal).sum())} / {int(abnormal.sum())}"],
         ["AUROC", m["auroc"]], ["AUPR (abnormal positive)", m["aupr"]],
         ["sensitivity at p(abnormal) >= 0.5", m["sensitivity"]],
         ["specificity at p(abnormal) >= 0.5", m["specificity"]],
         ["AUROC of the class prompts (for comparison)", m["class_prompt_auroc"]]],
        note=(f"Each image is scored by the softmax of its similarity to {len(normal_prompts)} normal and "
              f"{len(abnormal_prompts)} abnormal prompts (state phrases x templates), e.g. "
              f"{normal_prompts[0]!r} vs {abnormal_prompts[0]!r}."),
    )


def _roc(abnormal, p_abnormal, class_prompt):
    from mcaudit.reports.plots import roc_figure

    curves = [("normal/abnormal prompts", abnormal, p_abnormal), ("class prompts", abnormal, class_prompt)]
    return roc_figure(curves, "ROC curve: zero-shot normal/abnormal detection", "The dotted diagonal is chance.",
                      xlabel="normal images flagged (1 - specificity)", ylabel="abnormal images flagged (sensitivity)",
                      legend_title="scored by (AUROC)")


def _summary(result, abnormal) -> str:
    m = result.metrics
    ci = result.intervals.get("auroc")
    ci_text = f", 95% CI {ci[0]:.3f} to {ci[1]:.3f}" if ci else ""
    return (f"Zero-shot normal/abnormal AUROC {m['auroc']:.3f} ({int((~abnormal).sum())} normal and "
            f"{int(abnormal.sum())} abnormal images{ci_text}; class prompts {m['class_prompt_auroc']:.3f}).")


@hookimpl
def mcaudit_register_checks(register):
    register(AbnormalityCheck)
