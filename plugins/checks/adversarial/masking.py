"""Warning signs of gradient masking (after AutoAttack): the large-budget sanity attack, zero
input gradients, and the flags raised from what the attacks did."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .attacks import ATTACKS, AttackSettings, predict, run_attack
from .budgets import budget_label

SANITY_STEPS = 20  # PGD iterations of the large-budget sanity attack


def sanity_survivors(model, x, y, correct, robust, eps_linf, sanity, settings, seed, bs) -> np.ndarray:
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


def zero_gradient_images(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> np.ndarray:
    """Which images have an exactly zero cross-entropy gradient in pixel space."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), labels[i : i + batch_size], reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        out.append((grad.flatten(1).abs().amax(dim=1) == 0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def masking_flags(robust, worst, attacks, eps_linf, eps_l2, sanity, sanity_acc, zero_grad, n) -> tuple[dict[str, bool], list[str]]:
    """Each warning sign, raised or not, and a warning for each one raised."""
    warnings: list[str] = []
    flags = {"black_box_beats_white_box": _black_box_wins(robust, attacks, eps_linf, warnings),
             "accuracy_rises_with_eps": _accuracy_rises(robust, attacks, eps_linf, eps_l2, n, warnings),
             "zero_gradients": False, "survives_large_eps": False}
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


def _black_box_wins(robust, attacks, eps_linf, warnings: list[str]) -> bool:
    """Whether Square fooled an image that every white-box L-inf attack at its budget failed on."""
    raised = False
    white = [a for a in attacks if ATTACKS[a][1] and ATTACKS[a][0] == "linf"]
    if "square" in attacks and white:
        for eps in eps_linf:
            white_ok = np.logical_and.reduce([robust[(a, "linf", eps)] for a in white])
            only_black = int((white_ok & ~robust[("square", "linf", eps)]).sum())
            if only_black:
                raised = True
                warnings.append(
                    f"Gradient masking suspected: at L-inf {budget_label('linf', eps)} the black-box Square attack "
                    f"fooled {only_black} image(s) that every white-box attack failed on.")
    return raised


def _accuracy_rises(robust, attacks, eps_linf, eps_l2, n, warnings: list[str]) -> bool:
    """Whether any attack's robust accuracy rises from one budget to the next larger one."""
    raised = False
    for name in attacks:
        norm = ATTACKS[name][0]
        eps_list = eps_linf if norm == "linf" else eps_l2
        accs = [robust[(name, norm, e)].mean() for e in eps_list] if n else []
        for (e0, a0), (e1, a1) in zip(zip(eps_list, accs), zip(eps_list[1:], accs[1:])):
            if a1 > a0:
                raised = True
                warnings.append(
                    f"Gradient masking suspected: {name} robust accuracy rises from {a0:.1%} at "
                    f"{budget_label(norm, e0)} to {a1:.1%} at {budget_label(norm, e1)}; a stronger attack "
                    f"budget should never help the model.")
    return raised
