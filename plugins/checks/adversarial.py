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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torchattacks
from torch import nn

from mcaudit import Check, CheckResult, Finding, InputError, Param, Table, hookimpl
from mcaudit.batching import in_batches
from mcaudit.metrics import clopper_pearson_interval

# name -> (threat model, white-box?, short description for the report)
ATTACKS: dict[str, tuple[str, bool, str]] = {
    "fgsm": ("linf", True, "FGSM, one signed-gradient step"),
    "pgd_linf": ("linf", True, "PGD, projected gradient descent (L-inf)"),
    "apgd_ce": ("linf", True, "APGD with cross-entropy loss (AutoAttack)"),
    "apgd_dlr": ("linf", True, "APGD with the DLR loss (AutoAttack; needs 3 or more classes)"),
    "square": ("linf", False, "Square attack, black-box: queries only the scores"),
    "pgd_l2": ("l2", True, "PGD, projected gradient descent (L2)"),
}
GALLERY_PREFERENCE = ("pgd_linf", "apgd_ce", "fgsm", "apgd_dlr", "square")
SANITY_STEPS = 20  # PGD iterations of the large-budget sanity attack


class GreyInput(nn.Module):
    """Takes one grey channel and shows the model the three identical channels it expects.

    Attacking this module keeps the perturbation grey: the attack can only move the one channel.
    """

    def __init__(self, classifier: nn.Module, channels: int = 3):
        super().__init__()
        self.classifier = classifier
        self.channels = channels

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.classifier(grey.expand(-1, self.channels, -1, -1))


# -- parameters ------------------------------------------------------------------------
def parse_budgets(values: list[Any], option: str) -> list[float]:
    """Budgets given as numbers or as strings like "2/255" (also "1/255, 2/255")."""
    out: list[float] = []
    for value in values:
        if isinstance(value, str):
            parts = [p for p in re.split(r"[,\s\[\]]+", value) if p]
            out.extend(_parse_budget(p, option) for p in parts)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
        else:
            raise InputError(f"{option}: {value!r} is not a budget (use numbers or strings like \"2/255\")")
    for eps in out:
        if not (math.isfinite(eps) and 0 <= eps <= 1e3):
            raise InputError(f"{option}: budget {eps!r} must be a finite number >= 0")
    return sorted(set(out))


def _budgets_only(values: list[Any], option: str) -> None:
    """Param validation: the budgets parse (the parameter keeps the user's spelling)."""
    parse_budgets(values, option)


def _at_least_one(values: list[Any], what: str) -> None:
    if not values:
        raise ValueError(f"give at least one {what}")


def _parse_budget(text: str, option: str) -> float:
    num, slash, den = text.partition("/")
    try:
        value = float(num) / (float(den) if slash else 1.0)
    except (ValueError, ZeroDivisionError) as exc:
        raise InputError(f"{option}: {text!r} is not a budget (use numbers or strings like \"2/255\")") from exc
    return value


def budget_label(norm: str, eps: float) -> str:
    """"2/255" for L-inf budgets on the 8-bit grid, otherwise the plain number."""
    if norm == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def attack_seed(ctx, attack: str, norm: str, eps: float) -> int:
    """The seed of one attack at one budget, derived from the run seed."""
    return int(ctx.rng(f"adversarial:{attack}:{norm}:{eps!r}").integers(0, 2**31 - 1))


# -- running one attack ----------------------------------------------------------------
@dataclass
class AttackSettings:
    steps: int
    restarts: int
    square_queries: int


@dataclass
class Outcome:
    """What the attacks did to the attacked subsample, gathered over every process: per attack
    ``(name, norm, eps)`` which rows are still classified correctly."""

    rows: np.ndarray
    correct: np.ndarray
    robust: dict[tuple[str, str, float], np.ndarray]
    survives: np.ndarray  # rows still correct under the large-budget sanity attack
    zero: np.ndarray  # rows with an exactly zero input gradient
    attacks: list[str]
    eps_linf: list[float]
    eps_l2: list[float]
    sanity: float
    grey: bool
    notes: list[str]

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def n_correct(self) -> int:
        return int(self.correct.sum())


@dataclass
class GallerySource:
    """This process's attacked images at the largest L-inf budget, for the gallery."""

    images: torch.Tensor
    keep: torch.Tensor  # positions of the correctly classified images (the ones attacked)
    clean_pred: torch.Tensor
    adversarial: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]]


def build_attack(name: str, model: nn.Module, eps: float, settings: AttackSettings, seed: int) -> torchattacks.Attack:
    """The torchattacks object for one attack; PGD step sizes follow Madry et al. (2.5 eps / steps)."""
    steps = settings.steps
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=eps)
    if name == "pgd_linf":
        return torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    if name == "pgd_l2":
        return torchattacks.PGDL2(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    if name in ("apgd_ce", "apgd_dlr"):
        return torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=settings.restarts,
                                 seed=seed, loss="ce" if name == "apgd_ce" else "dlr")
    if name == "square":
        return torchattacks.Square(model, norm="Linf", eps=eps, n_queries=settings.square_queries,
                                   n_restarts=settings.restarts, seed=seed, loss="margin")
    raise InputError(f"adversarial.attacks: unknown attack {name!r} (known: {', '.join(ATTACKS)})")


def run_attack(
    name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
    settings: AttackSettings, seed: int, batch_size: int,
) -> torch.Tensor:
    """Adversarial images for ``images`` (in the attacked model's input space).

    PGD restarts from a new random start on the images that are still classified correctly,
    as AutoAttack does; APGD and Square restart internally. The global torch random state is
    restored afterwards, so attacks do not disturb what runs after them.
    """
    if name == "pgd_l2" and eps == 0:
        # torchattacks' PGDL2 projects by eps / ||delta|| and turns a zero ball into NaNs; the
        # only image within a zero budget is the clean one.
        return images.clone()
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        attack = build_attack(name, model, eps, settings, seed)
        adv = in_batches(lambda rows: attack(images[rows], labels[rows]), len(images), batch_size)
        if name in ("pgd_linf", "pgd_l2"):
            for _ in range(settings.restarts - 1):
                alive = torch.nonzero(predict(model, adv, batch_size) == labels).flatten()
                if len(alive) == 0:
                    break
                adv[alive] = in_batches(lambda rows: attack(images[alive[rows]], labels[alive[rows]]), len(alive), batch_size)
    return adv.detach()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return in_batches(lambda rows: model(images[rows]).argmax(dim=1), len(images), batch_size)


def zero_gradient_images(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> np.ndarray:
    """Which images have an exactly zero cross-entropy gradient in pixel space."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), labels[i : i + batch_size], reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        out.append((grad.flatten(1).abs().amax(dim=1) == 0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


# -- the check -------------------------------------------------------------------------
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
                         validate=lambda names: _at_least_one(names, "attack")),
        "eps": Param(["1/255", "2/255", "4/255"], "L-inf budgets in pixel units of [0, 1] (numbers or \"k/255\")",
                     validate=lambda v: _budgets_only(v, "adversarial.eps")),
        "eps_l2": Param([0.1, 0.25, 0.5], "L2 budgets for pgd_l2, measured on the three-channel input",
                        validate=lambda v: _budgets_only(v, "adversarial.eps_l2")),
        "steps": Param(50, "iterations of PGD and APGD", min=1),
        "restarts": Param(2, "random restarts of PGD, APGD and Square", min=1),
        "square_queries": Param(1000, "queries of the black-box Square attack per restart", min=1),
        "n_images": Param(400, "images attacked: a stratified, seeded subsample (0: all)", min=0),
        "grey": Param(True, "on grey data, confine the perturbation to one channel replicated to three"),
        "sanity_eps": Param(16 / 255, "L-inf budget of the PGD sanity attack that any model should fail (16/255; 0: off)",
                            min=0, max=1e3),
        "gallery": Param(4, "successful attacks shown in the gallery"),
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
        attacks = list(dict.fromkeys(params["attacks"]))
        eps_linf = parse_budgets(params["eps"], "adversarial.eps")
        eps_l2 = parse_budgets(params["eps_l2"], "adversarial.eps_l2")
        sanity = float(params["sanity_eps"])
        settings = AttackSettings(params["steps"], params["restarts"], params["square_queries"])
        notes: list[str] = []
        n_classes = len(ctx.classes)
        if "apgd_dlr" in attacks and n_classes < 3:
            attacks.remove("apgd_dlr")
            notes.append(f"APGD-DLR skipped: its loss needs at least 3 classes and this task has {n_classes}.")
        if not attacks:
            return CheckResult.skipped("no attack left to run: " + " ".join(notes))

        rows = ctx.stratified_rows(params["n_images"], "adversarial:rows")
        local = ctx.shard_rows(rows)  # under torchrun each rank attacks its share of the rows
        classifier = ctx.classifier()
        grey = bool(params["grey"]) and ctx.is_grey
        model: nn.Module = GreyInput(classifier) if grey else classifier
        bs = ctx.batch_size
        with torch.no_grad():
            pixels = ctx.load_pixels(local)
        images = pixels.mean(dim=1, keepdim=True) if grey else pixels
        labels = torch.as_tensor(ctx.forward.labels[local], device=ctx.device)
        budgets = [("linf", e) for e in eps_linf] + [("l2", e) for e in eps_l2]
        keys = [(name, norm, eps) for norm, eps in budgets for name in attacks if ATTACKS[name][0] == norm]

        with ctx.autocast():
            clean_pred = predict(model, images, bs)
            correct = (clean_pred == labels).cpu().numpy()
            keep = torch.as_tensor(np.flatnonzero(correct), device=ctx.device)
            x, y = images[keep], labels[keep]
            # per (attack, norm, eps): bool array over the rows, True = still classified correctly
            robust: dict[tuple[str, str, float], np.ndarray] = {}
            gallery_src: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}
            for name, norm, eps in keys:
                # the grey attack moves one channel; its L2 norm on three channels is sqrt(3) larger
                attack_eps = eps / math.sqrt(3) if (grey and norm == "l2") else eps
                ok = correct.copy()
                if len(keep):
                    adv = run_attack(name, model, x, y, attack_eps, settings, attack_seed(ctx, name, norm, eps), bs)
                    adv_pred = predict(model, adv, bs)
                    ok[correct] = (adv_pred == y).cpu().numpy()
                    if norm == "linf" and eps == max(eps_linf):
                        gallery_src[(name, eps)] = (adv, adv_pred)
                robust[(name, norm, eps)] = ok
            survives = self._sanity(model, x, y, correct, robust, eps_linf, sanity, settings,
                                    attack_seed(ctx, "sanity", "linf", sanity), bs)
            zero = np.zeros(len(local), dtype=bool)
            zero[correct] = zero_gradient_images(model, x, y, bs)

        per_row = {"correct": correct, "survives_sanity": survives, "zero_gradient": zero}
        per_row.update({f"robust{i}": robust[key] for i, key in enumerate(keys)})
        _, merged = ctx.gather_rows(local, per_row)
        all_correct = merged["correct"].astype(bool)
        all_robust = {key: merged[f"robust{i}"].astype(bool) for i, key in enumerate(keys)}
        outcome = Outcome(rows, all_correct, all_robust, merged["survives_sanity"].astype(bool),
                          merged["zero_gradient"].astype(bool), attacks, eps_linf, eps_l2, sanity, grey, notes)
        return self._result(ctx, outcome, GallerySource(images, keep, clean_pred, gallery_src), params)

    @staticmethod
    def _sanity(model, x, y, correct, robust, eps_linf, sanity, settings, seed, bs) -> np.ndarray:
        """Which rows survive a long PGD at a budget that should defeat any model.

        An adversarial image found within a smaller L-inf ball also lies within this larger
        one, so only the images that survived every attack at the largest budget are attacked.
        """
        survives = np.zeros(len(correct), dtype=bool)
        if sanity <= 0 or not len(y):
            return survives
        alive = np.ones(len(y), dtype=bool)
        if eps_linf and max(eps_linf) <= sanity:
            big = max(eps_linf)
            for (name, norm, eps), ok in robust.items():
                if norm == "linf" and eps == big:
                    alive &= ok[correct]
        idx = np.flatnonzero(alive)
        if len(idx):
            long_run = AttackSettings(max(SANITY_STEPS, 2 * settings.steps), settings.restarts, settings.square_queries)
            at = torch.as_tensor(idx, device=y.device)
            adv = run_attack("pgd_linf", model, x[at], y[at], sanity, long_run, seed, bs)
            alive[idx] = (predict(model, adv, bs) == y[at]).cpu().numpy()
            survives[np.flatnonzero(correct)] = alive
        return survives

    def _result(self, ctx, o: Outcome, gallery: GallerySource, params) -> CheckResult:
        metrics, counts, table_rows, worst = self._robust_metrics(ctx, o)
        not_evaluated = self._headline(worst, o.n_correct, metrics, counts)
        sanity_acc = int(o.survives.sum()) / o.n if (o.sanity > 0 and o.n) else float("nan")
        zero_grad = float(o.zero[o.correct].mean()) if o.n_correct else 0.0
        flags, warnings = self._flags(o.robust, worst, o.attacks, o.eps_linf, o.eps_l2, o.sanity, sanity_acc,
                                      zero_grad, o.n)
        metrics["sanity_robust_accuracy"] = sanity_acc
        metrics["zero_gradient_share"] = zero_grad
        if o.sanity > 0 and o.n:
            counts["sanity_robust_accuracy"] = (int(o.survives.sum()), o.n)
        if o.n_correct:
            counts["zero_gradient_share"] = (int(o.zero[o.correct].sum()), o.n_correct)
        for key, raised in flags.items():
            metrics[f"flag.{key}"] = float(raised)
        metrics["gradient_masking_suspected"] = float(any(flags.values()))
        raised = [k.replace("_", " ") for k, v in flags.items() if v]
        findings = []
        if raised:
            findings.append(Finding("warn", "gradient masking suspected (" + ", ".join(raised) + "): the attacks may "
                                    "have failed rather than the model resisted, so robust accuracies may be too high",
                                    "gradient_masking_suspected", float(len(raised))))
        summary = self._summary(counts, worst, raised)
        counts = {k: kn for k, kn in counts.items() if kn[1] > 0}
        intervals = {k: clopper_pearson_interval(*kn) for k, kn in counts.items()}
        return CheckResult(metrics=metrics, intervals=intervals, counts=counts, sample_size=o.n,
                           interval_methods={k: "exact (Clopper-Pearson)" for k in intervals},
                           not_evaluated=not_evaluated, findings=findings, summary=summary,
                           tables=self._tables(o, table_rows), figures=self._figures(ctx, o, gallery, params),
                           warnings=o.notes + warnings, details=self._details(o, worst, params),
                           per_image={f"robust.{norm}.{budget_label(norm, eps)}": ctx.per_image(o.rows, w.astype(int))
                                      for (norm, eps), w in worst.items()})

    @staticmethod
    def _robust_metrics(ctx, o: Outcome):
        """Robust accuracy and attack success per attack and budget, and the worst case over the
        attacks of each budget, with their counts and table rows."""
        n, n_correct = o.n, o.n_correct
        labels = ctx.forward.labels[o.rows]
        metrics: dict[str, float] = {"clean_accuracy": n_correct / n if n else float("nan"), "n_images": float(n),
                                     "chance_level": float(np.bincount(labels).max() / n) if n else float("nan")}
        counts: dict[str, tuple[int, int]] = {"clean_accuracy": (n_correct, n)}
        table_rows = []
        for (name, norm, eps), ok in o.robust.items():
            label = budget_label(norm, eps)
            flipped = n_correct - int(ok.sum())
            metrics[f"robust_accuracy.{name}.{label}"] = float(ok.mean()) if n else float("nan")
            metrics[f"attack_success_rate.{name}.{label}"] = flipped / n_correct if n_correct else float("nan")
            counts[f"robust_accuracy.{name}.{label}"] = (int(ok.sum()), n)
            counts[f"attack_success_rate.{name}.{label}"] = (flipped, n_correct)
            table_rows.append([name, _norm_name(norm), label] + _with_interval(int(ok.sum()), n)
                              + _with_interval(flipped, n_correct) + [flipped])
        worst: dict[tuple[str, float], np.ndarray] = {}
        for norm, eps_list in (("linf", o.eps_linf), ("l2", o.eps_l2)):
            for eps in eps_list:
                oks = [ok for (a, nm, e), ok in o.robust.items() if nm == norm and e == eps]
                if oks:
                    worst[(norm, eps)] = w = np.logical_and.reduce(oks)
                    key = f"worst_case_robust_accuracy.{norm}.{budget_label(norm, eps)}"
                    metrics[key] = float(w.mean()) if n else float("nan")
                    counts[key] = (int(w.sum()), n)
                    flipped = n_correct - int(w.sum())
                    table_rows.append(["worst case (all attacks)", _norm_name(norm), budget_label(norm, eps)]
                                      + _with_interval(int(w.sum()), n) + _with_interval(flipped, n_correct) + [flipped])
        return metrics, counts, table_rows, worst

    @staticmethod
    def _tables(o: Outcome, table_rows) -> list[Table]:
        return [Table(
            "Robust accuracy per attack and budget",
            ["attack", "norm", "budget (eps)", "robust accuracy", "95% CI", "attack success rate", "95% CI",
             "images flipped"],
            table_rows,
            note=(f"{o.n} images, {o.n_correct} classified correctly before the attack; only those were attacked. "
                  f"Success rate is the share of them whose class the attack flipped. Intervals are exact "
                  f"(Clopper-Pearson) 95% intervals for a proportion. "
                  + ("The perturbation was confined to one grey channel replicated to three. " if o.grey else "")
                  + " ".join(o.notes)).strip(),
        ), Table("Attacks", ["attack", "norm", "kind", "what it does"],
                 [[a, _norm_name(ATTACKS[a][0]), "white-box" if ATTACKS[a][1] else "black-box", ATTACKS[a][2]]
                  for a in o.attacks])]

    def _figures(self, ctx, o: Outcome, gallery: GallerySource, params) -> list:
        from mcaudit.reports import plots

        clean_acc = o.n_correct / o.n if o.n else float("nan")
        figures = [fig for fig in (self._curve(plots, o.robust, clean_acc, o.attacks, "linf", o.eps_linf),
                                   self._curve(plots, o.robust, clean_acc, o.attacks, "l2", o.eps_l2)) if fig is not None]
        shown = self._gallery(plots, ctx, gallery, o.eps_linf, params["gallery"])
        return figures + ([shown] if shown is not None else [])

    @staticmethod
    def _details(o: Outcome, worst, params) -> dict[str, Any]:
        return {
            "rows": [int(r) for r in o.rows],
            "attacks": o.attacks,
            "eps_linf": o.eps_linf,
            "eps_l2": o.eps_l2,
            "smallest_eps": _budget_name(smallest_budget(worst)),
            "grey_perturbation": o.grey,
            "steps": params["steps"],
            "restarts": params["restarts"],
            "square_queries": params["square_queries"],
            "sanity_eps": o.sanity,
            "notes": o.notes,
        }

    @staticmethod
    def _headline(worst, n_correct, metrics, counts) -> dict[str, str]:
        """The gated pair at the smallest nonzero budget; returns the reasons for what cannot be computed."""
        found = smallest_budget(worst)
        if found is None:
            reason = "no nonzero attack budget was given"
            return {"robust_accuracy_at_smallest_eps": reason, "retained_accuracy_at_smallest_eps": reason}
        w = worst[found]
        n, kept = len(w), int(w.sum())
        metrics["robust_accuracy_at_smallest_eps"] = kept / n if n else float("nan")
        counts["robust_accuracy_at_smallest_eps"] = (kept, n)
        if not n_correct:
            return {"retained_accuracy_at_smallest_eps": "no image was classified correctly before the attack, "
                                                         "so none could be attacked"}
        # an image wrong before the attack is never counted as robust, so kept <= n_correct
        metrics["retained_accuracy_at_smallest_eps"] = kept / n_correct
        counts["retained_accuracy_at_smallest_eps"] = (kept, n_correct)
        return {}

    @staticmethod
    def _flags(robust, worst, attacks, eps_linf, eps_l2, sanity, sanity_acc, zero_grad, n) -> tuple[dict[str, bool], list[str]]:
        warnings: list[str] = []
        flags = {"black_box_beats_white_box": False, "accuracy_rises_with_eps": False,
                 "zero_gradients": False, "survives_large_eps": False}
        white = [a for a in attacks if ATTACKS[a][1] and ATTACKS[a][0] == "linf"]
        if "square" in attacks and white:
            for eps in eps_linf:
                white_ok = np.logical_and.reduce([robust[(a, "linf", eps)] for a in white])
                only_black = int((white_ok & ~robust[("square", "linf", eps)]).sum())
                if only_black:
                    flags["black_box_beats_white_box"] = True
                    warnings.append(
                        f"Gradient masking suspected: at L-inf {budget_label('linf', eps)} the black-box Square attack "
                        f"fooled {only_black} image(s) that every white-box attack failed on.")
        for name in attacks:
            norm = ATTACKS[name][0]
            eps_list = eps_linf if norm == "linf" else eps_l2
            accs = [robust[(name, norm, e)].mean() for e in eps_list] if n else []
            for (e0, a0), (e1, a1) in zip(zip(eps_list, accs), zip(eps_list[1:], accs[1:])):
                if a1 > a0:
                    flags["accuracy_rises_with_eps"] = True
                    warnings.append(
                        f"Gradient masking suspected: {name} robust accuracy rises from {a0:.1%} at "
                        f"{budget_label(norm, e0)} to {a1:.1%} at {budget_label(norm, e1)}; a stronger attack "
                        f"budget should never help the model.")
        if zero_grad > 0:
            flags["zero_gradients"] = True
            warnings.append(
                f"Gradient masking suspected: {zero_grad:.0%} of the attacked images have an exactly zero input "
                f"gradient, so gradient attacks cannot move them (non-differentiable or saturated layers).")
        if sanity > 0 and sanity_acc > 0:
            flags["survives_large_eps"] = True
            warnings.append(
                f"Gradient masking suspected: {sanity_acc:.1%} of images survive PGD at L-inf "
                f"{budget_label('linf', sanity)}, a budget that can erase any image's content.")
        return flags, warnings

    @staticmethod
    def _curve(plots, robust, clean_acc, attacks, norm, eps_list):
        names = [a for a in attacks if ATTACKS[a][0] == norm]
        if not names or not eps_list:
            return None
        fig, ax = plots.new_figure(5.4, 3.6)
        scale = 255.0 if norm == "linf" else 1.0
        xs = [0.0] + [e * scale for e in eps_list]
        for name in names:
            ys = [clean_acc] + [robust[(name, norm, e)].mean() for e in eps_list]
            ax.plot(xs, ys, marker="o", label=name)
        if len(names) > 1:
            worst = [clean_acc] + [np.logical_and.reduce([robust[(a, norm, e)] for a in names]).mean() for e in eps_list]
            ax.plot(xs, worst, color="black", linestyle="--", marker="s", label="worst case")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("budget eps (x 1/255)" if norm == "linf" else "budget eps (L2 norm)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return plots.to_figure(
            fig, f"Robust accuracy against the {_norm_name(norm)} budget",
            "Accuracy of the attacked subsample under each attack as the perturbation budget grows; "
            "eps 0 is the clean accuracy. Curves must fall with eps; a curve that rises hints at gradient masking.")

    @staticmethod
    def _gallery(plots, ctx, source: GallerySource, eps_linf, count):
        """Successful attacks at the largest L-inf budget, from this process's rows."""
        gallery_src, keep, clean_pred = source.adversarial, source.keep, source.clean_pred
        if count <= 0 or not gallery_src or not eps_linf:
            return None
        eps = max(eps_linf)
        name = next((a for a in GALLERY_PREFERENCE if (a, eps) in gallery_src), None)
        if name is None:
            return None
        adv, adv_pred = gallery_src[(name, eps)]
        clean = source.images[keep]
        fooled = torch.nonzero(adv_pred != clean_pred[keep]).flatten()[:count].tolist()
        if not fooled:
            return None
        classes = ctx.classes
        # one mosaic in one axes: far cheaper to lay out and encode than a grid of subplots
        tiles, row_labels = [], []
        for i in fooled:
            c = clean[i].detach().float().cpu()
            a = adv[i].detach().float().cpu()
            delta = a - c
            amp = 0.5 + delta / (2 * max(float(delta.abs().max()), 1e-12))
            tiles.append([plots.to_hwc(c), plots.to_hwc(amp), plots.to_hwc(a)])
            row_labels.append(f"{plots.short_label(classes[int(clean_pred[keep][i])], 16)}\n"
                              f"-> {plots.short_label(classes[int(adv_pred[i])], 16)}")
        mosaic, centres_x, centres_y = _mosaic(tiles)
        rows_n = len(tiles)
        fig, ax = plots.new_figure(6.0, 0.6 + 1.9 * rows_n)
        ax.imshow(mosaic, cmap="gray" if mosaic.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(centres_x, ["clean", "perturbation (amplified)", "attacked"], fontsize=8)
        ax.xaxis.tick_top()
        ax.set_yticks(centres_y, row_labels, fontsize=8)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        return plots.to_figure(
            fig, f"Attack gallery ({name}, L-inf {budget_label('linf', eps)})",
            "Each row: the clean image, the perturbation stretched to the full grey range so it is visible "
            "(mid-grey is no change), and the attacked image; the row label gives the model's prediction before "
            "and after the attack.")

    @staticmethod
    def _summary(counts, worst, raised) -> str:
        """Plain numbers with their counts; the verdict itself comes from the thresholds and findings."""
        k, n = counts["clean_accuracy"]
        parts = [f"Clean accuracy {_share(k, n)} on the attacked subsample"]
        budgets = [smallest_budget(worst), _largest_budget(worst)]
        for budget in dict.fromkeys(b for b in budgets if b):
            key = f"worst_case_robust_accuracy.{budget[0]}.{budget_label(*budget)}"
            parts.append(f"worst-case robust accuracy {_share(*counts[key])} at {_budget_name(budget)}")
        tail = ("; gradient masking suspected (" + ", ".join(raised) + ")." if raised
                else "; no warning sign of gradient masking was raised.")
        return ", ".join(parts) + tail


def smallest_budget(worst) -> tuple[str, float] | None:
    """The smallest nonzero L-inf budget attacked, else the smallest nonzero L2 one."""
    for norm in ("linf", "l2"):
        budgets = sorted(e for nm, e in worst if nm == norm and e > 0)
        if budgets:
            return norm, budgets[0]
    return None


def _largest_budget(worst) -> tuple[str, float] | None:
    for norm in ("linf", "l2"):
        budgets = sorted(e for nm, e in worst if nm == norm and e > 0)
        if budgets:
            return norm, budgets[-1]
    return None


def _budget_name(budget: tuple[str, float] | None) -> str | None:
    return None if budget is None else f"{_norm_name(budget[0])} {budget_label(*budget)}"


def _share(k: int, n: int) -> str:
    """ "50.0% (8 of 16, 95% CI 24.7% to 75.3%)": a proportion with its count and exact interval."""
    if not n:
        return "undefined (0 images)"
    lo, hi = clopper_pearson_interval(k, n)
    return f"{k / n:.1%} ({k} of {n}, 95% CI {lo:.1%} to {hi:.1%})"


def _with_interval(k: int, n: int) -> list[Any]:
    """Table cells: the proportion and its exact 95% interval."""
    if not n:
        return [None, None]
    lo, hi = clopper_pearson_interval(k, n)
    return [k / n, f"{lo:.3f} to {hi:.3f}"]


def _norm_name(norm: str) -> str:
    return "L-inf" if norm == "linf" else "L2"


def _mosaic(tiles: list[list[np.ndarray]], gap: int = 2) -> tuple[np.ndarray, list[float], list[float]]:
    """Equal-sized images laid out in rows, separated by white gaps; also the tile centres."""
    h, w = tiles[0][0].shape[:2]
    cols = len(tiles[0])
    shape = (len(tiles) * (h + gap) - gap, cols * (w + gap) - gap) + tiles[0][0].shape[2:]
    out = np.ones(shape, dtype=np.float32)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    centres_x = [c * (w + gap) + (w - 1) / 2 for c in range(cols)]
    centres_y = [r * (h + gap) + (h - 1) / 2 for r in range(len(tiles))]
    return out, centres_x, centres_y


@hookimpl
def mcaudit_register_checks(register: Callable) -> None:
    register(AdversarialCheck)
