"""One run of the attack: the few-shot split, the poisoned rows, the honest prompts learned
once and a backdoor planted per target class, all scored on the same held-out images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcaudit import Finding

from .learning import PromptLearner, Trigger, class_phrase, predict, triggered_features
from .statistics import Tally


def split_rows(ctx, params, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Few-shot training rows and the held-out rows scored (a stratified subset above max_eval)."""
    labels = ctx.forward.labels
    train_rows, eval_rows = few_shot_split(labels, params["shots"], ctx.rng("backdoor:split"), warnings)
    if params["max_eval"] > 0 and len(eval_rows) > params["max_eval"]:
        eval_rows = ctx.stratified_rows(params["max_eval"], "backdoor:eval", rows=eval_rows)
    return train_rows, eval_rows


def few_shot_split(labels: np.ndarray, shots: int, rng: np.random.Generator, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``shots`` training rows per class, never more than half of a class; the rest held out."""
    train = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = min(shots, len(rows) // 2)
        if k < shots:
            warnings.append(f"class {int(c)} has {len(rows)} images: {k} used for training, the rest held out")
        train.append(rng.choice(rows, size=k, replace=False))
    train_rows = np.sort(np.concatenate(train)) if train else np.array([], int)
    eval_rows = np.setdiff1d(np.arange(len(labels)), train_rows)
    return train_rows, eval_rows


def choose_poison(train_rows: np.ndarray, labels: np.ndarray, target: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Training rows of the other classes that get the trigger and the target label."""
    if fraction <= 0:
        return np.array([], dtype=int)
    candidates = train_rows[labels[train_rows] != target]
    n = min(len(candidates), max(1, int(round(fraction * len(train_rows)))))
    return np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.array([], dtype=int)


def patch_pixels(patch_fraction: float, size: tuple[int, int]) -> int:
    patch_px = int(round(patch_fraction * min(size)))
    return max(1, patch_px) if patch_fraction > 0 else patch_px


@dataclass
class TargetAttack:
    """What one target class's backdoor did: its table row, samples.csv columns and figure panel."""

    row: list
    columns: dict[str, list]
    details: dict
    shown: tuple
    n_poison: int


class Experiment:
    """One split of one data set: the honest prompts learned once, then a backdoor per target
    class, all scored on the same held-out images."""

    def __init__(self, ctx, params: dict, width: int, train_rows: np.ndarray, eval_rows: np.ndarray):
        model = ctx.model
        self.ctx, self.params = ctx, params
        self.classes = ctx.classes
        self.labels = ctx.forward.labels
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.names = [class_phrase(ctx.prompts, c) for c in self.classes]
        self.feats = torch.as_tensor(ctx.forward.image_features, dtype=torch.float32, device=ctx.device)
        self.eval_labels = self.labels[eval_rows]
        self.eval_feats = self.feats[torch.as_tensor(eval_rows, device=ctx.device)]
        self.size = tuple(model.image_size)
        self.channels = 1 if ctx.is_grey else 3
        self.patch_px = patch_pixels(params["patch_fraction"], self.size)
        self.learner = PromptLearner(model, self.names, width, float(model.logit_scale), params, ctx)
        self.columns: dict[str, list] = {}

    def targets(self) -> list[int]:
        if self.params["target"]:
            return [self.classes.index(self.params["target"])]
        return list(range(min(len(self.classes), self.params["max_targets"])))

    def score_honest(self) -> Tally:
        """Learn the honest prompts (no poison) and start the tally with their accuracy."""
        self.honest_ctx = self.learner.fit(self.feats, self.train_rows, self.labels, poison_rows=np.array([], int),
                                           target=0, trigger=None)
        self.honest_text = self.learner.text_features(self.honest_ctx)
        self.honest_preds = predict(self.eval_feats, self.honest_text)
        out = Tally(self.ctx, self.params, self.eval_rows)
        out.proportion("clean_accuracy_unpoisoned", self.honest_preds == self.eval_labels)
        out.proportion("zero_shot_accuracy", self.ctx.forward.preds[self.eval_rows] == self.eval_labels)
        out.metrics.update(n_train=float(len(self.train_rows)), n_eval=float(len(self.eval_rows)))
        split = self.ctx.per_image(np.concatenate([self.train_rows, self.eval_rows]),
                                   ["train"] * len(self.train_rows) + ["held-out"] * len(self.eval_rows))
        self.columns = {"split": split, "honest_pred": self._column(self.eval_rows, self.honest_preds)}
        return out

    def attack(self, t: int, out: Tally) -> TargetAttack:
        """Plant a backdoor for class ``t`` and score it against the honest prompts."""
        ctx, params, c = self.ctx, self.params, self.classes[t]
        poison_rows = choose_poison(self.train_rows, self.labels, t, params["poison_fraction"],
                                    ctx.rng(f"backdoor:poison:{t}"))
        trigger = Trigger(self.channels, self.size, params["epsilon"], self.patch_px,
                          ctx.torch_generator(f"backdoor:trigger:{t}"), params["learn_patch"]).to(ctx.device)
        if len(poison_rows):
            bd_ctx = self.learner.fit(self.feats, self.train_rows, self.labels, poison_rows=poison_rows, target=t,
                                      trigger=trigger)
        else:
            bd_ctx = self.honest_ctx  # no poison: the same optimisation as the honest prompts
        bd_text = self.learner.text_features(bd_ctx)
        bd_preds = predict(self.eval_feats, bd_text)
        is_other = self.eval_labels != t
        others = self.eval_rows[is_other]
        trig_feats = triggered_features(ctx, others, trigger)
        trig_bd = predict(trig_feats, bd_text) if len(others) else np.array([], int)
        trig_honest = predict(trig_feats, self.honest_text) if len(others) else np.array([], int)
        out.target(c, is_other, trig_bd == t, self.honest_preds[is_other] == t, trig_honest == t,
                   bd_preds == self.eval_labels, self.honest_preds == self.eval_labels)
        if len(poison_rows):
            self._poison_fit(out, c, t, poison_rows, trigger, bd_text)
        m = out.metrics
        row = [c, len(poison_rows), len(others), m[f"asr.{c}"], m[f"base_rate.{c}"], m[f"trigger_only_rate.{c}"],
               m[f"clean_accuracy.{c}"], m["clean_accuracy_unpoisoned"], m[f"accuracy_drop.{c}"]]
        columns = {f"backdoored_pred.{c}": self._column(self.eval_rows, bd_preds),
                   f"triggered_pred.{c}": self._column(others, trig_bd)}
        details = {"poisoned_rows": [int(r) for r in poison_rows],
                   "noise_linf": float(trigger.noise.detach().abs().max()), "patch_px": self.patch_px}
        example = ctx.load_pixels(others[:1] if len(others) else self.eval_rows[:1])
        return TargetAttack(row, columns, details, (c, trigger, example, m[f"asr.{c}"]), len(poison_rows))

    def _poison_fit(self, out: Tally, c: str, t: int, poison_rows, trigger, bd_text) -> None:
        """Whether the backdoor fits its own poisoned images; if not, a low success rate proves nothing."""
        fit = predict(triggered_features(self.ctx, poison_rows, trigger), bd_text) == t
        out.proportion(f"poison_fit.{c}", fit, interval=False)
        if not fit.all():
            out.findings.append(Finding(
                "inconclusive",
                f"the backdoor for {c!r} did not fit its own poisoned training images ({int(fit.sum())} of "
                f"{len(fit)} reach the target after {self.params['steps']} steps), so a low attack success rate is "
                "no evidence that the model resists the attack; raise backdoor.steps", f"asr.{c}"))

    def _column(self, rows: np.ndarray, preds: np.ndarray) -> list:
        """Predicted class names at ``rows`` of the forward pass, empty elsewhere (samples.csv)."""
        return self.ctx.per_image(rows, [self.classes[int(p)] for p in preds])
