"""From an Outcome to numbers: robust accuracy and attack success per attack and budget, the
worst case over attacks, the gated pair at the smallest budget, the masking metrics, each with
its count for an exact (Clopper-Pearson) interval; and the plain-numbers summary."""

from __future__ import annotations

from typing import Any

import numpy as np

from mcaudit.metrics import clopper_pearson_interval

from .budgets import budget_label, budget_name, largest_budget, norm_name, smallest_budget
from .campaign import Outcome
from .masking import masking_flags

Counts = dict[str, tuple[int, int]]


def robust_metrics(ctx, o: Outcome):
    """Robust accuracy and attack success per attack and budget, and the worst case over the
    attacks of each budget, with their counts and table rows."""
    n, n_correct = o.n, o.n_correct
    labels = ctx.forward.labels[o.rows]
    metrics: dict[str, float] = {"clean_accuracy": n_correct / n if n else float("nan"), "n_images": float(n),
                                 "chance_level": float(np.bincount(labels).max() / n) if n else float("nan")}
    counts: Counts = {"clean_accuracy": (n_correct, n)}
    table_rows = []
    for (name, norm, eps), ok in o.robust.items():
        label = budget_label(norm, eps)
        flipped = n_correct - int(ok.sum())
        metrics[f"robust_accuracy.{name}.{label}"] = float(ok.mean()) if n else float("nan")
        metrics[f"attack_success_rate.{name}.{label}"] = flipped / n_correct if n_correct else float("nan")
        counts[f"robust_accuracy.{name}.{label}"] = (int(ok.sum()), n)
        counts[f"attack_success_rate.{name}.{label}"] = (flipped, n_correct)
        table_rows.append(_table_row(name, norm, eps, int(ok.sum()), n, flipped, n_correct))
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
                table_rows.append(_table_row("worst case (all attacks)", norm, eps, int(w.sum()), n, flipped, n_correct))
    return metrics, counts, table_rows, worst


def _table_row(name: str, norm: str, eps: float, kept: int, n: int, flipped: int, n_correct: int) -> list[Any]:
    return ([name, norm_name(norm), budget_label(norm, eps)] + _with_interval(kept, n)
            + _with_interval(flipped, n_correct) + [flipped])


def headline(worst, n_correct, metrics, counts: Counts) -> dict[str, str]:
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


def masking_metrics(o: Outcome, worst, metrics, counts: Counts) -> tuple[list[str], list[str]]:
    """Adds the sanity and zero-gradient shares and the flags to ``metrics`` and ``counts``;
    returns the names of the flags raised and their warnings."""
    sanity_acc = int(o.survives.sum()) / o.n if (o.sanity > 0 and o.n) else float("nan")
    zero_grad = float(o.zero[o.correct].mean()) if o.n_correct else 0.0
    flags, warnings = masking_flags(o.robust, worst, o.attacks, o.eps_linf, o.eps_l2, o.sanity, sanity_acc,
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
    return [k.replace("_", " ") for k, v in flags.items() if v], warnings


def details(o: Outcome, worst, params) -> dict[str, Any]:
    smallest = smallest_budget(worst)
    return {
        "rows": [int(r) for r in o.rows],
        "attacks": o.attacks,
        "eps_linf": o.eps_linf,
        "eps_l2": o.eps_l2,
        "smallest_eps": budget_name(smallest_budget(worst)),
        "grey_perturbation": o.grey,
        "steps": params["steps"],
        "restarts": params["restarts"],
        "square_queries": params["square_queries"],
        "sanity_eps": o.sanity,
        "notes": o.notes,
        # robust_accuracy_at_smallest_eps is exactly the mean of this per-image column (the
        # worst case over the attacks at that budget), so runs on the same images can be
        # compared image by image (mcaudit.comparison); the retained accuracy is not a mean
        "paired_columns": {} if smallest is None else {
            "robust_accuracy_at_smallest_eps": f"robust.{smallest[0]}.{budget_label(*smallest)}"},
    }


def summary(counts: Counts, worst, raised) -> str:
    """Plain numbers with their counts; the verdict itself comes from the thresholds and findings."""
    k, n = counts["clean_accuracy"]
    parts = [f"Clean accuracy {_share(k, n)} on the attacked subsample"]
    budgets = [smallest_budget(worst), largest_budget(worst)]
    for budget in dict.fromkeys(b for b in budgets if b):
        key = f"worst_case_robust_accuracy.{budget[0]}.{budget_label(*budget)}"
        parts.append(f"worst-case robust accuracy {_share(*counts[key])} at {budget_name(budget)}")
    tail = ("; gradient masking suspected (" + ", ".join(raised) + ")." if raised
            else "; no warning sign of gradient masking was raised.")
    return ", ".join(parts) + tail


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
