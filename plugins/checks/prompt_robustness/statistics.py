"""The metrics, counts and paired bootstrap intervals of the template sweep and the prompt attacks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcaudit.metrics import bootstrap_interval

from .scoring import TemplateSweep
from .search import ClassAttack


class PairedDrops:
    """95% intervals of accuracy differences between two prompt sets on the same images.

    A paired bootstrap: each resample draws images (whole patients when the data name them)
    and both prompt sets are scored on that same draw, so the interval reflects how often the
    two disagree, not the spread of each accuracy on its own.
    """

    def __init__(self, clusters: np.ndarray | None, rng: np.random.Generator, n_boot: int, reference: np.ndarray):
        self.clusters, self.rng, self.n_boot, self.reference = clusters, rng, n_boot, reference

    def interval(self, difference: np.ndarray) -> tuple[float, float]:
        return bootstrap_interval(lambda i: float(difference[i].mean()), len(difference), self.rng, self.n_boot,
                                  clusters=self.clusters)

    def drop(self, correct_after: np.ndarray) -> tuple[float, float]:
        """Interval of the reference accuracy minus the accuracy with ``correct_after``."""
        return self.interval(self.reference - correct_after)


@dataclass
class Findings:
    """The metrics of the template sweep and of the prompt attacks, and the attacks that set them."""

    metrics: dict[str, float]
    worst_attack: ClassAttack | None  # lowest accuracy after the whole edit budget
    one_edit: ClassAttack | None  # lowest accuracy after one edit (None when no edit was scored)

    @classmethod
    def collect(cls, sweep: TemplateSweep, attacks: list[ClassAttack], levels: list[str]) -> "Findings":
        accs = sweep.accuracies
        metrics = {
            "ensemble_accuracy": sweep.ensemble_acc,
            "template_accuracy.worst": float(accs[sweep.worst]),
            "template_accuracy.best": float(max(accs)),
            "template_accuracy_spread": float(max(accs) - min(accs)),
            "n_images": float(len(sweep.labels)),
        }
        for level in levels:
            mine = [a for a in attacks if a.level == level]
            for a in mine:
                metrics[f"prompt_attack.{level}.accuracy.{a.class_name}"] = a.accuracy_after
            metrics[f"prompt_attack.{level}.worst_accuracy"] = min(a.accuracy_after for a in mine)
        worst_attack = min(attacks, key=lambda a: a.accuracy_after) if attacks else None
        if worst_attack is not None:
            metrics["prompt_attack.worst_accuracy"] = worst_attack.accuracy_after
            metrics["prompt_attack.accuracy_drop"] = sweep.ensemble_acc - worst_attack.accuracy_after
        one_edit = _one_edit(attacks, levels, metrics, sweep.ensemble_acc)
        return cls(metrics, worst_attack, one_edit)

    def intervals(self, sweep: TemplateSweep, paired: PairedDrops) -> dict[str, tuple[float, float]]:
        """Paired intervals of the spread and the drops (drawn in this order from one stream)."""
        c = sweep.correct
        out = {"template_accuracy_spread": paired.interval(c(sweep.preds[sweep.best]) - c(sweep.preds[sweep.worst]))}
        if self.worst_attack is not None:
            out["prompt_attack.accuracy_drop"] = paired.drop(c(self.worst_attack.preds_after))
        if self.one_edit is not None:
            out["one_edit_accuracy_drop"] = paired.drop(c(self.one_edit.one_edit_preds))
        return out

    def counts(self, sweep: TemplateSweep) -> dict[str, tuple[int, int]]:
        out = {
            "ensemble_accuracy": sweep.count(sweep.ensemble_preds),
            "template_accuracy.worst": sweep.count(sweep.preds[sweep.worst]),
            "template_accuracy.best": sweep.count(sweep.preds[sweep.best]),
        }
        if self.worst_attack is not None:
            out["prompt_attack.worst_accuracy"] = sweep.count(self.worst_attack.preds_after)
        return out

    def not_evaluated(self) -> dict[str, str]:
        if self.one_edit is not None:
            return {}
        return {"one_edit_accuracy_drop":
                "no single edit was scored (no edit level searched, budgets of 0, or no phrasing offers an edit)"}


def _one_edit(attacks, levels, metrics, ensemble_acc):
    """The single edit that lowers accuracy most over classes and levels (None if none was scored);
    records each level's largest one-edit drop in ``metrics``."""
    scored = [a for a in attacks if a.candidates_scored]
    for level in levels:
        mine = [a for a in scored if a.level == level]
        if mine:
            metrics[f"prompt_attack.{level}.one_edit_drop"] = ensemble_acc - min(a.one_edit_accuracy for a in mine)
    if not scored:
        return None
    worst = min(scored, key=lambda a: a.one_edit_accuracy)
    metrics["one_edit_accuracy_drop"] = ensemble_acc - worst.one_edit_accuracy
    return worst
