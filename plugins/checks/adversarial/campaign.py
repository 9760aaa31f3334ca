"""The attack campaign: every attack at every budget on this process's share of the attacked
subsample, the masking diagnostics on the same images, and the per-row results gathered over
every process into one Outcome."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .attacks import ATTACKS, AttackSettings, GreyInput, attack_seed, predict, run_attack
from .masking import sanity_survivors, zero_gradient_images

AttackKey = tuple[str, str, float]  # (attack, norm, eps)


@dataclass
class Plan:
    """What to attack with: the attacks, their budgets and settings, chosen before any image is loaded."""

    attacks: list[str]
    eps_linf: list[float]
    eps_l2: list[float]
    sanity: float
    settings: AttackSettings
    grey: bool
    notes: list[str]

    @property
    def keys(self) -> list[AttackKey]:
        budgets = [("linf", e) for e in self.eps_linf] + [("l2", e) for e in self.eps_l2]
        return [(name, norm, eps) for norm, eps in budgets for name in self.attacks if ATTACKS[name][0] == norm]


@dataclass
class Outcome:
    """What the attacks did to the attacked subsample, gathered over every process: per attack
    ``(name, norm, eps)`` which rows are still classified correctly."""

    rows: np.ndarray
    correct: np.ndarray
    robust: dict[AttackKey, np.ndarray]
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
    rows: np.ndarray | None = None  # this process's rows, in the order of ``images``
    model: nn.Module | None = None  # what was attacked, for the shown images' confidences


def attack_subsample(ctx, plan: Plan, rows: np.ndarray) -> tuple[Outcome, GallerySource]:
    """Attacks this process's share of ``rows`` (under torchrun each rank takes its share) and
    gathers the results of every process."""
    local = ctx.shard_rows(rows)
    classifier = ctx.classifier()
    model: nn.Module = GreyInput(classifier) if plan.grey else classifier
    bs = ctx.batch_size
    with torch.no_grad():
        pixels = ctx.load_pixels(local)
    images = pixels.mean(dim=1, keepdim=True) if plan.grey else pixels
    labels = torch.as_tensor(ctx.forward.labels[local], device=ctx.device)

    with ctx.autocast():
        clean_pred = predict(model, images, bs)
        correct = (clean_pred == labels).cpu().numpy()
        keep = torch.as_tensor(np.flatnonzero(correct), device=ctx.device)
        x, y = images[keep], labels[keep]
        robust, gallery = _attack_every_budget(ctx, plan, model, x, y, correct)
        survives = sanity_survivors(model, x, y, correct, robust, plan.eps_linf, plan.sanity, plan.settings,
                                    attack_seed(ctx, "sanity", "linf", plan.sanity), bs)
        zero = np.zeros(len(local), dtype=bool)
        zero[correct] = zero_gradient_images(model, x, y, bs)

    outcome = _gather(ctx, plan, rows, local, {"correct": correct, "survives_sanity": survives, "zero_gradient": zero},
                      robust)
    return outcome, GallerySource(images, keep, clean_pred, gallery, np.asarray(local), model)


def _attack_every_budget(ctx, plan: Plan, model, x, y, correct):
    """Per (attack, norm, eps): a bool array over the local rows, True = still classified
    correctly; and the adversarial images at the largest L-inf budget for the gallery."""
    robust: dict[AttackKey, np.ndarray] = {}
    gallery: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}
    bs = ctx.batch_size
    for name, norm, eps in plan.keys:
        # the grey attack moves one channel; its L2 norm on three channels is sqrt(3) larger
        attack_eps = eps / math.sqrt(3) if (plan.grey and norm == "l2") else eps
        ok = correct.copy()
        if len(y):
            adv = run_attack(name, model, x, y, attack_eps, plan.settings, attack_seed(ctx, name, norm, eps), bs)
            adv_pred = predict(model, adv, bs)
            ok[correct] = (adv_pred == y).cpu().numpy()
            if norm == "linf" and eps == max(plan.eps_linf):
                gallery[(name, eps)] = (adv, adv_pred)
        robust[(name, norm, eps)] = ok
    return robust, gallery


def _gather(ctx, plan: Plan, rows, local, per_row: dict[str, np.ndarray], robust) -> Outcome:
    keys = plan.keys
    per_row = per_row | {f"robust{i}": robust[key] for i, key in enumerate(keys)}
    _, merged = ctx.gather_rows(local, per_row)
    all_robust = {key: merged[f"robust{i}"].astype(bool) for i, key in enumerate(keys)}
    return Outcome(rows, merged["correct"].astype(bool), all_robust, merged["survives_sanity"].astype(bool),
                   merged["zero_gradient"].astype(bool), plan.attacks, plan.eps_linf, plan.eps_l2, plan.sanity,
                   plan.grey, plan.notes)
