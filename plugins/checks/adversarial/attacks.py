"""Attack machinery: the attacks offered, the grey-input wrapper, building torchattacks objects,
running one attack (with restarts, seeded, batched with out-of-memory halving) and predicting."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchattacks
from torch import nn

from mcaudit import InputError
from mcaudit.batching import in_batches

# name -> (threat model, white-box?, short description for the report)
ATTACKS: dict[str, tuple[str, bool, str]] = {
    "fgsm": ("linf", True, "FGSM, one signed-gradient step"),
    "pgd_linf": ("linf", True, "PGD, projected gradient descent (L-inf)"),
    "apgd_ce": ("linf", True, "APGD with cross-entropy loss (AutoAttack)"),
    "apgd_dlr": ("linf", True, "APGD with the DLR loss (AutoAttack; needs 3 or more classes)"),
    "square": ("linf", False, "Square attack, black-box: queries only the scores"),
    "pgd_l2": ("l2", True, "PGD, projected gradient descent (L2)"),
}


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


@dataclass
class AttackSettings:
    steps: int
    restarts: int
    square_queries: int


def attack_seed(ctx, attack: str, norm: str, eps: float) -> int:
    """The seed of one attack at one budget, derived from the run seed."""
    return int(ctx.rng(f"adversarial:{attack}:{norm}:{eps!r}").integers(0, 2**31 - 1))


def applicable_attacks(names: list[str], n_classes: int) -> tuple[list[str], list[str]]:
    """The requested attacks, each once, less those the task cannot run; and notes saying why."""
    attacks = list(dict.fromkeys(names))
    notes: list[str] = []
    if "apgd_dlr" in attacks and n_classes < 3:
        attacks.remove("apgd_dlr")
        notes.append(f"APGD-DLR skipped: its loss needs at least 3 classes and this task has {n_classes}.")
    return attacks, notes


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

