"""Zero-shot performance: how well do the class prompts classify the audited images?"""

from __future__ import annotations

import numpy as np

from mcaudit import Check, CheckResult, Finding, Param, Table, hookimpl
from mcaudit.metrics import (
    AUROC_CLUSTER_METHOD,
    AUROC_METHOD,
    accuracy,
    auroc_interval,
    auroc_ovr,
    balanced_accuracy,
    balanced_accuracy_interval,
    balanced_accuracy_of,
    cluster_wilson_interval,
    confusion,
    confusion_resamples,
    per_class_precision,
    per_class_recall,
    percentile_interval,
    wilson_interval,
)

MIN_BOOTSTRAP = 200


class PerformanceCheck(Check):
    name = "performance"
    description = (
        "Zero-shot classification performance from the shared forward pass: accuracy, "
        "balanced accuracy, macro one-vs-rest AUROC, per-class recall and precision, confusion matrix."
    )
    params = {
        "n_bootstrap": Param(2000, "resamples of the subject-level bootstrap for balanced accuracy, used when the "
                                   f"data name subjects (at least {MIN_BOOTSTRAP})", min=MIN_BOOTSTRAP),
    }
    metrics = {
        "accuracy": "share of images whose top class is the label",
        "balanced_accuracy": "mean per-class recall",
        "auroc_macro": "one-vs-rest AUROC averaged over classes (binary: AUROC of the second class)",
        "recall.<class>": "share of the class's images predicted as the class (sensitivity)",
        "precision.<class>": "share of the images predicted as the class that are the class (PPV)",
        "n_images": "images scored",
        "chance_level": "balanced accuracy of guessing: 1 / number of classes",
    }
    default_thresholds = {
        "balanced_accuracy": {"rule": "> chance_level", "on": "lower"},
        "auroc_macro": {"rule": "> 0.5", "on": "lower"},
        "recall.*": ">= 0.5",
    }
    threshold_reasons = {
        "balanced_accuracy": "a model whose balanced accuracy cannot be shown above guessing (its lower 95% bound) "
                             "has learned nothing usable about these classes",
        "auroc_macro": "an AUROC whose lower 95% bound is not above 0.5 ranks patients no better than a coin",
        "recall.*": "a class the model misses more often than it finds (sensitivity under 50%) is unfit for any "
                    "clinical use; set your own floor (screening usually needs >= 0.9) in the gate file",
    }

    def run(self, ctx, params):
        fwd = ctx.forward
        labels, preds, probs = fwd.labels, fwd.preds, fwd.probs
        classes = ctx.classes
        cm = confusion(labels, preds, len(classes))
        rec, prec = per_class_recall(cm), per_class_precision(cm)
        auc, auc_per = auroc_ovr(labels, probs)
        metrics = _metrics(labels, preds, classes, rec, prec, auc)
        counts = _counts(classes, cm, len(labels))
        intervals, methods = _intervals(ctx, params, labels, preds, probs, cm, counts)
        support = cm.sum(axis=1)
        present = int((support > 0).sum())
        not_evaluated, findings = {}, []
        if present < 2:
            reason = "the data hold images of only one class, so nothing can be told apart"
            not_evaluated = {"balanced_accuracy": reason, "auroc_macro": reason}
            findings.append(Finding("inconclusive", "only one class has images, so performance cannot be judged (and cannot pass)"))
        from mcaudit.reports.plots import confusion_figure

        absent = [c for c, s in zip(classes, support) if s == 0]
        warnings = [f"no images of class(es) {', '.join(absent)}: their recall and AUROC are undefined"] if absent else []
        return CheckResult(
            metrics=metrics, intervals=intervals, summary=_summary(metrics, classes, cm, rec), counts=counts,
            sample_size=len(labels), not_evaluated=not_evaluated, findings=findings,
            tables=_tables(classes, cm, rec, prec, auc_per), figures=[confusion_figure(cm, classes)], warnings=warnings,
            details={"confusion_matrix": cm.tolist(), "classes": classes, "interval_methods": methods},
        )


def _metrics(labels, preds, classes, rec, prec, auc) -> dict[str, float]:
    k = len(classes)
    metrics = {
        "accuracy": accuracy(labels, preds),
        "balanced_accuracy": balanced_accuracy(labels, preds, k),
        "auroc_macro": auc,
        "n_images": float(len(labels)),
    }
    for c, r, p in zip(classes, rec, prec):
        metrics[f"recall.{c}"] = float(r)
        metrics[f"precision.{c}"] = float(p)
    metrics["chance_level"] = 1.0 / k
    return metrics


def _counts(classes, cm, n: int) -> dict[str, tuple[int, int]]:
    """Successes and trials of every proportion, for the Wilson intervals and the report."""
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    counts = {"accuracy": (int(np.trace(cm)), n)}
    for j, c in enumerate(classes):
        if support[j] > 0:
            counts[f"recall.{c}"] = (int(cm[j, j]), int(support[j]))
        if predicted[j] > 0:
            counts[f"precision.{c}"] = (int(cm[j, j]), int(predicted[j]))
    return counts


def _tables(classes, cm, rec, prec, auc_per) -> list[Table]:
    support = cm.sum(axis=1)
    per_class = Table(
        "Per class",
        ["class", "images", "recall", "precision", "AUROC (one vs rest)"],
        [[c, int(s), float(r), float(p), float(a)] for c, s, r, p, a in zip(classes, support, rec, prec, auc_per)],
    )
    cm_table = Table("Confusion matrix (rows: true, columns: predicted)", ["true \\ predicted"] + classes,
                     [[c] + [int(v) for v in row] for c, row in zip(classes, cm)])
    return [per_class, cm_table]


def _summary(metrics, classes, cm, rec) -> str:
    k = len(classes)
    support = cm.sum(axis=1)
    # The weakest class weighs support: the lowest upper bound of recall, so a class of
    # 12 images at recall 0 outranks one of 2 images at recall 0.
    upper = np.array([wilson_interval(int(cm[j, j]), int(support[j]))[1] if support[j] else np.inf for j in range(k)])
    worst = int(np.argmin(upper))
    return (
        f"Accuracy {metrics['accuracy']:.1%}, balanced accuracy {metrics['balanced_accuracy']:.1%} "
        f"(chance {1 / k:.0%}), AUROC {metrics['auroc_macro']:.3f}; weakest class {classes[worst]!r} "
        f"(recall {rec[worst]:.1%}, {int(cm[worst, worst])} of {int(support[worst])})."
    )


def _intervals(ctx, params, labels, preds, probs, cm, counts):
    """95% intervals and the method behind each (see docs/statistics.md for their coverage).

    Images are independent unless the data name subjects: then every interval treats a
    subject's images as one unit, since slices or views of one patient are correlated.
    """
    k = cm.shape[0]
    rng = ctx.rng("performance:intervals")
    clusters = ctx.clusters()
    if clusters is None:
        intervals = {m: wilson_interval(*kn) for m, kn in counts.items()}
        methods = {m: "Wilson score" for m in counts}
        lo, hi = balanced_accuracy_interval(cm, rng)
        intervals["balanced_accuracy"] = (float(lo), float(hi))
        methods["balanced_accuracy"] = "Jeffreys posterior of the mean per-class recall (Brodersen et al. 2010)"
        intervals["auroc_macro"] = auroc_interval(labels, probs)
        methods["auroc_macro"] = AUROC_METHOD
    else:
        n_subjects = len(np.unique(clusters))
        correct = labels == preds
        intervals = {"accuracy": cluster_wilson_interval(correct, clusters)}
        for m in counts:
            if m == "accuracy":
                continue
            kind, name = m.split(".", 1)
            j = ctx.classes.index(name)
            rows = (labels == j) if kind == "recall" else (preds == j)
            intervals[m] = cluster_wilson_interval(correct[rows], clusters[rows])
        methods = {m: f"Wilson score with the design effect of {n_subjects} subjects" for m in counts}
        resampled = confusion_resamples(labels, preds, k, rng, params["n_bootstrap"], clusters=clusters)
        intervals["balanced_accuracy"] = percentile_interval(balanced_accuracy_of(resampled))
        methods["balanced_accuracy"] = f"percentile bootstrap over {n_subjects} subjects ({params['n_bootstrap']} resamples)"
        intervals["auroc_macro"] = auroc_interval(labels, probs, clusters=clusters)
        methods["auroc_macro"] = AUROC_CLUSTER_METHOD
    intervals = {m: v for m, v in intervals.items() if np.isfinite(v[0])}
    return intervals, {m: v for m, v in methods.items() if m in intervals}


@hookimpl
def mcaudit_register_checks(register):
    register(PerformanceCheck)
