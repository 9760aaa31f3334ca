"""The check's result from a finished experiment: the summary metrics over target classes,
the per-target table, the summary sentence, the figures and the samples.csv columns."""

from __future__ import annotations

import numpy as np

from mcaudit import CheckResult, Table

from .experiment import Experiment, TargetAttack
from .figures import summary_figure, trigger_figure
from .statistics import Tally

COLUMNS = ["target class", "poisoned training images", "triggered images of other classes",
           "attack success rate", "base rate (no trigger)", "trigger alone, honest prompts",
           "clean accuracy, backdoored prompts", "clean accuracy, honest prompts", "accuracy cost"]


def build_result(experiment: Experiment, out: Tally, attacks: list[TargetAttack], targets: list[int],
                 warnings: list[str]) -> CheckResult:
    classes = experiment.classes
    train_rows, eval_rows = experiment.train_rows, experiment.eval_rows
    n_poison = attacks[-1].n_poison if attacks else 0
    _summary_metrics(out, classes, targets, n_poison)
    if n_poison == 0:
        warnings.append("no training image was poisoned (poison_fraction 0 or no images of other classes): "
                        "the backdoored prompts are the honest ones and the trigger was not learned")
    warnings += [f"{metric}: {reason}" for metric, reason in out.not_evaluated.items() if metric.startswith("asr.")]
    rows = [a.row for a in attacks]
    figures = [summary_figure(rows),
               trigger_figure([a.shown for a in attacks], experiment.params["epsilon"], experiment.ctx.is_grey)]
    per_image = dict(experiment.columns)
    for a in attacks:
        per_image.update(a.columns)
    return CheckResult(
        metrics=out.metrics, intervals=out.intervals,
        summary=_summary(out, classes, targets, len(train_rows), n_poison),
        tables=[_table(experiment, rows)], figures=figures, warnings=warnings, per_image=per_image,
        findings=out.findings, counts=out.counts, sample_size=len(eval_rows), not_evaluated=out.not_evaluated,
        details={"targets": {classes[t]: a.details for t, a in zip(targets, attacks)},
                 "class_phrases": experiment.names, "train_rows": [int(r) for r in train_rows]},
    )


def _summary_metrics(out: Tally, classes, targets: list[int], n_poison: int) -> None:
    """The numbers over all target classes tried; the largest success only over those judged."""
    m = out.metrics
    m["n_poisoned"] = float(n_poison)
    evaluated = [classes[t] for t in targets if f"asr.{classes[t]}" not in out.not_evaluated]
    if evaluated:
        m["asr_max"] = max(m[f"asr.{c}"] for c in evaluated)
    else:
        out.not_evaluated["asr_max"] = "attack success is not evaluated for any target class tried"
    m["accuracy_drop_max"] = float(np.nanmax([m[f"accuracy_drop.{classes[t]}"] for t in targets]))


def _table(experiment: Experiment, rows: list[list]) -> Table:
    params = experiment.params
    return Table(
        "Backdoor per target class (held-out images)", COLUMNS, rows,
        note=(f"{len(experiment.train_rows)} few-shot training images ({params['shots']} per class at most), "
              f"{len(experiment.eval_rows)} held-out images; {params['n_ctx']} context tokens, {params['steps']} "
              f"steps; trigger noise within ±{params['epsilon']:.4f} plus a {experiment.patch_px}-pixel patch. "
              "Rates are shares of the held-out images of the other classes; attack success is judged only where "
              f"the base rate is below {params['max_base_rate']:.0%}."),
    )


def _summary(out: Tally, classes, targets, n_train: int, n_poison: int) -> str:
    m = out.metrics
    judged = [classes[t] for t in targets if f"asr.{classes[t]}" not in out.not_evaluated]
    c = max(judged, key=lambda name: m[f"asr.{name}"]) if judged else classes[targets[0]]
    k, n = out.counts.get(f"asr.{c}", (0, 0))
    text = (f"Prompts tuned on {n_train} images with {n_poison} poisoned send {k} of {n} triggered images of other "
            f"classes ({m[f'asr.{c}']:.0%}) to {c!r}; without the trigger the honest prompts send "
            f"{m[f'base_rate.{c}']:.0%} there, and with the learned trigger but honest prompts "
            f"{m[f'trigger_only_rate.{c}']:.0%}; clean accuracy {m[f'clean_accuracy.{c}']:.1%} with the backdoored "
            f"prompts vs {m['clean_accuracy_unpoisoned']:.1%} with honest ones")
    if not judged:
        text += "; attack success is not evaluated: the base rate leaves no room for it"
    return text + "."
