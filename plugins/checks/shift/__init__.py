"""Robustness to acquisition shift: accuracy under modality-specific corruptions at five
severities (MedMNIST-C's definitions where they exist, TorchIO's k-space artefacts for MRI),
with intervals, the mean corruption error against a reference model, and calibration under
shift.

Modules: ``severities`` (which corruptions each modality gets and their strengths),
``modality`` (where the modality comes from), ``photometric``, ``spatial``, ``overlays`` and
``mri`` (the corruptions), ``evaluate`` (the sharded loop), ``statistics`` (metrics and
intervals), ``presentation`` (table, figures, summary).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mcaudit import Check, CheckResult, Param, hookimpl

from . import presentation
from .evaluate import Plan, corrupt, evaluate, example_images, reference_classifier
from .modality import detect
from .severities import CORE, CORRUPTIONS, MODALITIES, SEVERITY_TABLES, level, select
from .statistics import compute, worst_corruption

__all__ = ["ShiftCheck", "Plan", "corrupt", "evaluate", "CORRUPTIONS", "SEVERITY_TABLES", "CORE", "MODALITIES",
           "level", "select", "compute", "mcaudit_register_checks"]


def _known_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in CORRUPTIONS and n not in ("all", "core")]
    if unknown:
        raise ValueError(f"unknown corruption {unknown[0]!r} (known: all, core, {', '.join(CORRUPTIONS)})")
    if not names:
        raise ValueError("give at least one corruption, or all")


def _severities(values: list[int]) -> None:
    if not values:
        raise ValueError("give at least one severity")


class ShiftCheck(Check):
    name = "shift"
    description = (
        "Robustness to acquisition shift: accuracy and balanced accuracy under modality-specific corruptions "
        "(noise, blur, resolution, JPEG, intensity; MRI k-space artefacts; dermoscopy and pathology artefacts) at "
        "severities 1-5 as defined by MedMNIST-C, with 95% intervals; the accuracy drop against clean; the corruption "
        "error and mean corruption error (mCE) against --reference-model; ECE per severity."
    )
    params = {
        "modality": Param("auto", "radiography, ct, mri, dermoscopy, pathology or ultrasound; auto reads a manifest "
                          "modality column, the DICOM Modality tag or the MedMNIST file name",
                          choices=("auto",) + MODALITIES),
        "corruptions": Param(["all"], "corruptions to run: all (the modality's), core (three cheap ones) or names",
                             validate=_known_names),
        "severities": Param([1, 2, 3, 4, 5], "severities to run (0 is the clean image)", min=0, max=5,
                            validate=_severities),
        "n_images": Param(500, "images in the stratified subsample (0: all)", min=0),
        "examples": Param(True, "show one image under every corruption and severity in the report"),
    }
    # quick: three corruptions that cost little on a CPU, three severities, 24 images: a ViT-B-32
    # on two cores spends about 15 s here (216 corrupted forward passes).
    profiles = {
        "quick": {"corruptions": ["core"], "severities": [1, 3, 5], "n_images": 24},
        "standard": {"corruptions": ["all"], "severities": [1, 2, 3, 4, 5], "n_images": 500},
        "thorough": {"corruptions": ["all"], "severities": [1, 2, 3, 4, 5], "n_images": 0},
    }
    metrics = {
        "clean_accuracy": "accuracy on the clean subsample (from the shared forward pass)",
        "clean_balanced_accuracy": "balanced accuracy on the clean subsample",
        "accuracy.<corruption>.s<k>": "accuracy under the corruption at severity k",
        "balanced_accuracy.<corruption>.s<k>": "balanced accuracy under the corruption at severity k",
        "accuracy_drop.<corruption>": "clean accuracy minus the mean accuracy over the severities",
        "relative_error.<corruption>": "mean error over the severities divided by the clean error",
        "mean_accuracy_drop": "the accuracy drop averaged over the corruptions",
        "worst_accuracy_drop": "the largest accuracy drop of any corruption",
        "ce.<corruption>": "corruption error: errors summed over severities, divided by the reference model's",
        "relative_ce.<corruption>": "as ce, for the error added to clean error",
        "mce": "mean corruption error over the corruptions (1 = as robust as the reference model)",
        "relative_mce": "mean relative corruption error",
        "ece.clean": "expected calibration error on clean images",
        "ece.s<k>": "expected calibration error at severity k, corruptions pooled",
        "n_images": "images in the subsample",
    }
    default_thresholds = {
        "mean_accuracy_drop": "<= 0.10",
        "worst_accuracy_drop": {"rule": "<= 0.25", "severity": "warn"},
        "mce": "<= 1.0",
    }
    threshold_reasons = {
        "mean_accuracy_drop": "a model that loses more than 10 points of accuracy on average when the scanner, dose or "
                              "export changes within MedMNIST-C's range will not hold its validated performance at "
                              "another site",
        "worst_accuracy_drop": "one acquisition change costing a quarter of the accuracy is a site-specific failure "
                               "worth a warning even when the average holds",
        "mce": "a fine-tuned model should be at least as robust as the public model it came from: RobustMedCLIP found "
               "BiomedCLIP at an mCE of 126.8 against CLIP's 100, a regression this threshold catches",
    }

    def run(self, ctx, params):
        modality, source = detect(ctx, params["modality"])
        try:
            corruptions = select(modality, params["corruptions"])
        except ValueError as exc:
            return CheckResult.skipped(f"no corruption to run: {exc}")
        plan = Plan(modality, corruptions, sorted(set(int(s) for s in params["severities"])))
        rows = np.sort(ctx.stratified_rows(params["n_images"], "shift:rows"))
        outcome = evaluate(ctx, rows, plan, reference_classifier(ctx))
        numbers = compute(outcome, plan, len(ctx.classes), ctx.rng, ctx.clusters(rows))
        return self._result(ctx, plan, outcome, numbers, source, params)

    def _result(self, ctx, plan, outcome, numbers, source, params) -> CheckResult:
        n = len(outcome.rows)
        worst = worst_corruption(numbers, plan)
        figures = [presentation.heat_map(numbers, plan), presentation.accuracy_curves(numbers, plan)]
        if params["examples"] and ctx.world.is_main:
            row = int(outcome.rows[0])
            figures.append(presentation.examples(example_images(ctx, row, plan), plan, ctx.source(row)))
        result = CheckResult(
            metrics=numbers.metrics, intervals=numbers.intervals, counts=numbers.counts, sample_size=n,
            interval_methods=numbers.methods, not_evaluated=numbers.not_evaluated,
            summary=presentation.summary(numbers, plan, worst, n, plan.modality),
            tables=[presentation.table(numbers, plan, n, plan.modality, source)], figures=figures,
            details={"modality": plan.modality, "modality_source": source, "corruptions": plan.corruptions,
                     "severities": plan.severities, "worst_corruption": worst, "rows": [int(r) for r in outcome.rows],
                     "levels": {c: [level(plan.modality, c, s) for s in plan.severities if s] for c in plan.corruptions}},
            per_image=self._per_image(ctx, outcome, plan),
        )
        if source.startswith("a guess"):
            result.warnings.append(f"The modality ({plan.modality}) is {source}.")
        return result

    @staticmethod
    def _per_image(ctx, outcome, plan) -> dict:
        columns = {"correct.clean": outcome.clean_pred == outcome.labels}
        columns |= {f"correct.{c}.s{s}": outcome.pred[(c, s)] == outcome.labels for c, s in plan.cells}
        if outcome.ref_clean is not None:
            columns["reference_correct.clean"] = outcome.ref_clean == outcome.labels
            columns |= {f"reference_correct.{c}.s{s}": outcome.ref_pred[(c, s)] == outcome.labels for c, s in plan.cells}
        return {k: ctx.per_image(outcome.rows, v.astype(int)) for k, v in columns.items()}


@hookimpl
def mcaudit_register_checks(register: Callable) -> None:
    register(ShiftCheck)
