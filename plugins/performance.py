"""Zero-shot performance: how well do the class prompts classify the audited images?"""

from __future__ import annotations

import numpy as np

from mcaudit import Check, CheckResult, Param, Table, hookimpl
from mcaudit.metrics import (
    accuracy,
    auroc_ovr,
    balanced_accuracy,
    bootstrap_interval,
    confusion,
    per_class_precision,
    per_class_recall,
)


class PerformanceCheck(Check):
    name = "performance"
    description = (
        "Zero-shot classification performance from the shared forward pass: accuracy, "
        "balanced accuracy, macro one-vs-rest AUROC, per-class recall and precision, confusion matrix."
    )
    params = {
        "n_bootstrap": Param(200, "bootstrap resamples for the 95% intervals (0 turns them off)"),
    }
    metrics = {
        "accuracy": "share of images whose top class is the label",
        "balanced_accuracy": "mean per-class recall",
        "auroc_macro": "one-vs-rest AUROC averaged over classes (binary: AUROC of the second class)",
        "recall.<class>": "share of the class's images predicted as the class (sensitivity)",
        "precision.<class>": "share of the images predicted as the class that are the class (PPV)",
        "n_images": "images scored",
    }
    default_thresholds = {}

    def run(self, ctx, params):
        fwd = ctx.forward
        labels, preds, probs = fwd.labels, fwd.preds, fwd.probs
        classes = ctx.classes
        k = len(classes)
        cm = confusion(labels, preds, k)
        rec, prec = per_class_recall(cm), per_class_precision(cm)
        auc, auc_per = auroc_ovr(labels, probs)
        metrics = {
            "accuracy": accuracy(labels, preds),
            "balanced_accuracy": balanced_accuracy(labels, preds, k),
            "auroc_macro": auc,
            "n_images": float(len(labels)),
        }
        for c, r, p in zip(classes, rec, prec):
            metrics[f"recall.{c}"] = float(r)
            metrics[f"precision.{c}"] = float(p)
        rng = ctx.rng("performance.bootstrap")
        nb = params["n_bootstrap"]
        intervals = {
            "accuracy": bootstrap_interval(lambda i: accuracy(labels[i], preds[i]), len(labels), rng, nb, strata=labels),
            "balanced_accuracy": bootstrap_interval(lambda i: balanced_accuracy(labels[i], preds[i], k), len(labels), rng, nb, strata=labels),
            "auroc_macro": bootstrap_interval(lambda i: auroc_ovr(labels[i], probs[i])[0], len(labels), rng, nb, strata=labels),
        }
        intervals = {m: v for m, v in intervals.items() if np.isfinite(v[0])}
        support = cm.sum(axis=1)
        per_class = Table(
            "Per class",
            ["class", "images", "recall", "precision", "AUROC (one vs rest)"],
            [[c, int(s), _f(r), _f(p), _f(a)] for c, s, r, p, a in zip(classes, support, rec, prec, auc_per)],
        )
        cm_table = Table("Confusion matrix (rows: true, columns: predicted)", ["true \\ predicted"] + classes,
                         [[c] + [int(v) for v in row] for c, row in zip(classes, cm)])
        from mcaudit.reports.plots import confusion_figure

        figures = [confusion_figure(cm, classes)]
        warnings = []
        absent = [c for c, s in zip(classes, support) if s == 0]
        if absent:
            warnings.append(f"no images of class(es) {', '.join(absent)}: their recall and AUROC are undefined")
        worst = int(np.nanargmin(np.where(support > 0, rec, np.nan))) if (support > 0).any() else 0
        summary = (
            f"Accuracy {metrics['accuracy']:.1%}, balanced accuracy {metrics['balanced_accuracy']:.1%}, "
            f"AUROC {auc:.3f}; weakest class {classes[worst]!r} (recall {rec[worst]:.1%})."
        )
        return CheckResult(
            metrics=metrics, intervals=intervals, summary=summary,
            tables=[per_class, cm_table], figures=figures, warnings=warnings,
            details={"confusion_matrix": cm.tolist(), "classes": classes},
        )


def _f(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


@hookimpl
def mcaudit_register_checks(register):
    register(PerformanceCheck)
