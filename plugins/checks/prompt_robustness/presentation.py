"""What the prompt_robustness check shows: tables, the per-template figure, per-image columns,
warnings, the summary and the details of every attack."""

from __future__ import annotations

from mcaudit import Table

from .scoring import TemplateSweep
from .search import ClassAttack
from .statistics import Findings


def tables(sweep: TemplateSweep, attacks: list[ClassAttack], params: dict) -> list[Table]:
    template_table = Table(
        "Accuracy under each template alone",
        ["template", "accuracy", "balanced accuracy", "change vs all templates"],
        sorted(sweep.rows, key=lambda r: r[1]),
        note=f"All templates together (the audited prompt set): accuracy {sweep.ensemble_acc:.1%} on "
             f"{len(sweep.labels)} images. Image features come from the shared forward pass; only the prompts "
             "are re-encoded.",
    )
    ranked = sorted(attacks, key=lambda a: a.accuracy_after)[: params["worst_prompts"]]
    attack_table = Table(
        "Worst prompt edits found",
        ["class edited", "edit level", "edits", "original phrasing", "edited phrasing", "accuracy before",
         "accuracy after one edit", "accuracy after"],
        [[a.class_name, a.level, "; ".join(a.edits) or "none found",
          " | ".join(a.original), " | ".join(a.perturbed), a.accuracy_before, a.one_edit_accuracy,
          a.accuracy_after] for a in ranked],
        note=(f"Greedy search per class: up to {params['char_budget']} character edit(s) (typo, swap, deletion) or "
              f"{params['word_budget']} synonym substitution(s) of the class's phrasings, every template kept; "
              f"the other classes' prompts unchanged. {params['max_candidates']} candidate edits scored per step."),
    )
    return [template_table, attack_table]


def template_figure(sweep: TemplateSweep):
    from mcaudit.reports import plots

    ordered = sorted(sweep.rows, key=lambda r: r[1])
    fig, ax = plots.new_figure(5.4, max(2.2, 0.45 * len(ordered) + 1.0))
    ax.barh(range(len(ordered)), [r[1] for r in ordered], color="#0072B2")
    ax.axvline(sweep.ensemble_acc, color="black", linestyle="--", label="all templates")
    ax.set_yticks(range(len(ordered)), [plots.short_label(r[0], 40) for r in ordered], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.legend(fontsize=8, loc="lower right")
    return plots.to_figure(fig, "Accuracy per template",
                           "Zero-shot accuracy when every class is described with one template alone; "
                           "the dashed line is the audited prompt ensemble.")


def per_image_columns(ctx, rows, sweep: TemplateSweep, findings: Findings) -> dict[str, list]:
    """samples.csv: whether each scored image is right under the worst template and the worst edit."""
    correct = lambda preds: [int(v) for v in sweep.correct(preds)]  # noqa: E731
    out = {"correct_worst_template": ctx.per_image(rows, correct(sweep.preds[sweep.worst]))}
    attack = findings.worst_attack
    if attack is not None and attack.preds_after is not None:
        out["correct_worst_prompt_edit"] = ctx.per_image(rows, correct(attack.preds_after))
    return out


def warnings_for(sweep: TemplateSweep, findings: Findings) -> list[str]:
    warnings = []
    spread = findings.metrics["template_accuracy_spread"]
    if len(sweep.rows) == 1:
        warnings.append("Only one template: template sensitivity cannot be measured; add templates to the prompt file.")
    elif spread >= 0.10:
        warnings.append(f"Accuracy depends strongly on the template: {spread:.1%} between the best and the worst "
                        f"({sweep.templates[sweep.worst]!r}).")
    drop = findings.metrics.get("prompt_attack.accuracy_drop", 0.0)
    attack = findings.worst_attack
    if attack is not None and drop >= 0.10:
        warnings.append(
            f"Small prompt edits change the result: {', '.join(attack.edits) or 'edits'} on the "
            f"{attack.class_name!r} phrasing drop accuracy by {drop:.1%}.")
    return warnings


def summary_text(sweep: TemplateSweep, findings: Findings) -> str:
    metrics, ensemble_acc = findings.metrics, sweep.ensemble_acc
    worst_t, best_t = metrics["template_accuracy.worst"], metrics["template_accuracy.best"]
    summary = f"Accuracy {ensemble_acc:.1%} with all templates; " + (
        f"single templates range from {worst_t:.1%} to {best_t:.1%}" if f"{worst_t:.1%}" != f"{best_t:.1%}"
        else f"every single template gives {best_t:.1%}")
    one_drop = metrics.get("one_edit_accuracy_drop", 0.0)
    one_edit, attack = findings.one_edit, findings.worst_attack
    if one_edit is not None and one_drop > 0:
        summary += (f"; one edit ({one_edit.one_edit}, {one_edit.level} level, class {one_edit.class_name!r}) "
                    f"lowers it to {one_edit.one_edit_accuracy:.1%}")
    drop = metrics.get("prompt_attack.accuracy_drop", 0.0)
    if attack is not None and drop > 0 and attack.accuracy_after < ensemble_acc - one_drop:
        summary += (f"; {len(attack.edits)} edits ({attack.level} level, class "
                    f"{attack.class_name!r}) lower it to {attack.accuracy_after:.1%}")
    elif attack is not None and drop <= 0:
        summary += "; no prompt edit tried lowers it"
    return summary + "."


def details(sweep: TemplateSweep, attacks: list[ClassAttack], levels: list[str]) -> dict:
    return {
        "rows": len(sweep.labels),
        "templates": [r[0] for r in sweep.rows],
        "template_accuracy": [r[1] for r in sweep.rows],
        "attacks": [
            {"class": a.class_name, "level": a.level, "original": a.original, "perturbed": a.perturbed,
             "edits": a.edits, "accuracy_before": a.accuracy_before, "accuracy_after": a.accuracy_after,
             "one_edit": a.one_edit, "one_edit_accuracy": a.one_edit_accuracy, "candidates_scored": a.candidates_scored}
            for a in attacks
        ],
        "levels": levels,
    }
