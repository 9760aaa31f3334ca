"""Adversarial robustness of the zero-shot classifier to small pixel perturbations.

Attacks come from torchattacks and run on the differentiable zero-shot classifier in pixel
space [0, 1], with the model's own normalisation inside, so an epsilon is a budget on the
pixels a scanner would produce. Only images the model classifies correctly are attacked
(an image already misclassified is not robust at any epsilon), as AutoAttack does.

For grey images (X-ray, CT, MRI) the perturbation is by default confined to one channel that
is replicated to the three the model reads, so the adversarial image is still a grey image.
An L2 budget is always measured on the three-channel input the model sees: a grey
perturbation of norm ``e / sqrt(3)`` on one channel is one of norm ``e`` on three.

Robust accuracies are only trustworthy if the attacks work. The check raises AutoAttack's
warning signs of gradient masking: a black-box attack succeeding where every white-box attack
failed, robust accuracy rising with epsilon, zero input gradients, and images that survive an
attack at a budget large enough to destroy any image's content.

This module holds the check itself. Its pieces: ``budgets`` (parsing and naming budgets),
``attacks`` (torchattacks wrappers, running one attack), ``masking`` (the gradient-masking
diagnostics), ``campaign`` (every attack on the subsample, gathered over processes),
``results`` (metrics, counts and the summary) and ``report`` (tables, curves, gallery).
"""

from __future__ import annotations

from typing import Callable

from mcaudit import Check, CheckResult, Finding, Param, hookimpl
from mcaudit.metrics import clopper_pearson_interval

from . import report, results
from .attacks import ATTACKS, AttackSettings, GreyInput, applicable_attacks, attack_seed, build_attack, predict, run_attack
from .budgets import at_least_one, budget_label, budgets_only, parse_budgets, smallest_budget
from .campaign import GallerySource, Outcome, Plan, attack_subsample
from .masking import SANITY_STEPS, masking_flags, zero_gradient_images
from .report import GALLERY_PREFERENCE

__all__ = [
    "ATTACKS", "GALLERY_PREFERENCE", "SANITY_STEPS", "AdversarialCheck", "AttackSettings", "GallerySource",
    "GreyInput", "Outcome", "attack_seed", "budget_label", "build_attack", "parse_budgets", "predict",
    "run_attack", "smallest_budget", "zero_gradient_images",
]


class AdversarialCheck(Check):
    name = "adversarial"
    description = (
        "Adversarial robustness: torchattacks (FGSM, PGD L-inf and L2, APGD-CE, APGD-DLR, Square) on the "
        "zero-shot classifier in pixel space; clean and robust accuracy per attack and budget with exact "
        "(Clopper-Pearson) 95% intervals, worst case over attacks, attack success rate, and AutoAttack's "
        "warning signs of gradient masking. The standard profile attacks 400 images (interval half-widths "
        "of about 0.05) with 50 steps and 2 restarts; quick is a smoke test whose numbers are mostly inconclusive."
    )
    params = {
        "attacks": Param(list(ATTACKS), f"attacks to run, from {', '.join(ATTACKS)}", choices=tuple(ATTACKS),
                         validate=lambda names: at_least_one(names, "attack")),
        "eps": Param(["1/255", "2/255", "4/255"], "L-inf budgets in pixel units of [0, 1] (numbers or \"k/255\")",
                     validate=lambda v: budgets_only(v, "adversarial.eps")),
        "eps_l2": Param([0.1, 0.25, 0.5], "L2 budgets for pgd_l2, measured on the three-channel input",
                        validate=lambda v: budgets_only(v, "adversarial.eps_l2")),
        "steps": Param(50, "iterations of PGD and APGD", min=1),
        "restarts": Param(2, "random restarts of PGD, APGD and Square", min=1),
        "square_queries": Param(1000, "queries of the black-box Square attack per restart", min=1),
        "n_images": Param(400, "images attacked: a stratified, seeded subsample (0: all)", min=0),
        "grey": Param(True, "on grey data, confine the perturbation to one channel replicated to three"),
        "sanity_eps": Param(16 / 255, "L-inf budget of the PGD sanity attack that any model should fail (16/255; 0: off)",
                            min=0, max=1e3),
        "gallery": Param(4, "successful attacks shown as thumbnails (original, attacked, change amplified)", min=0, max=50),
    }
    # standard: 400 images give a proportion near 0.5 a Clopper-Pearson half-width of about
    # 0.05; 50 steps and 2 restarts are about half of AutoAttack's APGD budget, enough for a
    # model without a defence. thorough follows AutoAttack (100 steps, 5000 Square queries).
    profiles = {
        "quick": {"n_images": 8, "eps": ["1/255", "4/255"], "eps_l2": [0.5], "steps": 3, "restarts": 1, "square_queries": 10},
        "standard": {"n_images": 400, "steps": 50, "restarts": 2, "square_queries": 1000},
        "thorough": {"n_images": 1000, "steps": 100, "restarts": 5, "square_queries": 5000},
    }
    metrics = {
        "clean_accuracy": "accuracy on the attacked subsample before any attack",
        "n_images": "images in the attacked subsample",
        "chance_level": "accuracy of always answering the subsample's most common class; a constant answer "
                        "is perfectly robust, so robust accuracy must beat it to mean anything",
        "robust_accuracy.<attack>.<eps>": "share of images still classified correctly under the attack",
        "attack_success_rate.<attack>.<eps>": "share of correctly classified images whose class the attack flipped",
        "worst_case_robust_accuracy.<norm>.<eps>": "share correct under every attack of that norm and budget",
        "robust_accuracy_at_smallest_eps": "worst-case robust accuracy at the smallest nonzero budget (L-inf if any, "
                                           "else L2): share of all attacked-subsample images still correct",
        "retained_accuracy_at_smallest_eps": "share of the correctly classified images that every attack at the "
                                             "smallest nonzero budget leaves correct (robust over clean accuracy)",
        "sanity_robust_accuracy": "robust accuracy under a 20-step PGD at sanity_eps (should be 0)",
        "zero_gradient_share": "share of images with an exactly zero input gradient (should be 0)",
        "flag.<name>": "1 when a warning sign of gradient masking is raised, else 0",
        "gradient_masking_suspected": "1 when any gradient-masking flag is raised",
    }
    # Decided on the exact 95% interval: a subsample too small to tell reads inconclusive.
    default_thresholds = {
        "robust_accuracy_at_smallest_eps": "> chance_level",
        "retained_accuracy_at_smallest_eps": ">= 0.5",
    }
    threshold_reasons = {
        "robust_accuracy_at_smallest_eps":
            "a model that never changes its answer is perfectly robust and scores the most common class's share; "
            "under the smallest budget (by default 1/255, one grey level of an 8-bit image) a useful model must "
            "stay above that, or its robustness is no better than a constant answer's",
        "retained_accuracy_at_smallest_eps":
            "medical image classifiers are known to be fooled by imperceptible perturbations (Finlayson et al., "
            "Science 2019; Ma et al., Pattern Recognition 2021); losing more than half of the correct answers to a "
            "change of one grey level means anyone who can touch the pixels can choose the diagnosis",
    }

    def run(self, ctx, params):
        eps_linf = parse_budgets(params["eps"], "adversarial.eps")
        eps_l2 = parse_budgets(params["eps_l2"], "adversarial.eps_l2")
        attacks, notes = applicable_attacks(params["attacks"], len(ctx.classes))
        if not attacks:
            return CheckResult.skipped("no attack left to run: " + " ".join(notes))
        settings = AttackSettings(params["steps"], params["restarts"], params["square_queries"])
        plan = Plan(attacks, eps_linf, eps_l2, float(params["sanity_eps"]), settings,
                    bool(params["grey"]) and ctx.is_grey, notes)
        outcome, gallery = attack_subsample(ctx, plan, ctx.stratified_rows(params["n_images"], "adversarial:rows"))
        return self._result(ctx, outcome, gallery, params)

    # the masking rules, reachable from the check for tests that plant outcomes
    _flags = staticmethod(masking_flags)

    @staticmethod
    def _result(ctx, o: Outcome, gallery: GallerySource, params) -> CheckResult:
        metrics, counts, table_rows, worst = results.robust_metrics(ctx, o)
        not_evaluated = results.headline(worst, o.n_correct, metrics, counts)
        raised, warnings = results.masking_metrics(o, worst, metrics, counts)
        findings = []
        if raised:
            findings.append(Finding("warn", "gradient masking suspected (" + ", ".join(raised) + "): the attacks may "
                                    "have failed rather than the model resisted, so robust accuracies may be too high",
                                    "gradient_masking_suspected", float(len(raised))))
        summary = results.summary(counts, worst, raised)
        counts = {k: kn for k, kn in counts.items() if kn[1] > 0}
        intervals = {k: clopper_pearson_interval(*kn) for k, kn in counts.items()}
        return CheckResult(metrics=metrics, intervals=intervals, counts=counts, sample_size=o.n,
                           interval_methods={k: "exact (Clopper-Pearson)" for k in intervals},
                           not_evaluated=not_evaluated, findings=findings, summary=summary,
                           tables=report.tables(o, table_rows),
                           figures=report.figures(o),
                           galleries=report.galleries(ctx, gallery, o.eps_linf, params["gallery"]),
                           warnings=o.notes + warnings, details=results.details(o, worst, params),
                           per_image={f"robust.{norm}.{budget_label(norm, eps)}": ctx.per_image(o.rows, w.astype(int))
                                      for (norm, eps), w in worst.items()})


@hookimpl
def mcaudit_register_checks(register: Callable) -> None:
    register(AdversarialCheck)
