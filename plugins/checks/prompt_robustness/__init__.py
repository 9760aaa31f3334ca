"""How much zero-shot accuracy depends on the wording of the class prompts.

Two questions, both answered from the image features of the shared forward pass (the image
encoder is never run again; only prompts are encoded):

* Template sensitivity: accuracy when every class is described with one template alone.
* Adversarial wording: within a small edit budget, which misspelling (character level: typos,
  swapped letters, deleted letters) or synonym substitution (word level, from a medical
  synonym list shipped with mcaudit) of a class's phrasings lowers accuracy most? The search
  is greedy: each step tries a seeded sample of single edits and keeps the most harmful.

The check is here; ``edits`` makes the candidate edits (keyboard typos, synonym list),
``scoring`` scores prompts against the cached features and sweeps the templates, ``search``
runs the greedy attack, ``statistics`` turns both into metrics, counts and paired intervals,
``presentation`` holds the tables, figure, warnings and summary.
"""

from __future__ import annotations

from typing import Callable

import torch

from mcaudit import Check, CheckResult, Param, hookimpl

from .edits import (
    KEYBOARD_ROWS,
    LEVELS,
    NEIGHBOURS,
    Edit,
    char_edits,
    keyboard_neighbours,
    load_synonym_groups,
    readable_synonyms,
    synonym_map,
    word_edits,
)
from .presentation import details, per_image_columns, summary_text, tables, template_figure, warnings_for
from .scoring import PromptScorer, TemplateSweep
from .search import ClassAttack, greedy_attack
from .statistics import Findings, PairedDrops

__all__ = [
    "KEYBOARD_ROWS", "LEVELS", "NEIGHBOURS", "ClassAttack", "Edit", "Findings", "PairedDrops", "PromptRobustnessCheck",
    "PromptScorer", "TemplateSweep", "char_edits", "greedy_attack", "keyboard_neighbours", "load_synonym_groups",
    "synonym_map", "word_edits",
]


class PromptRobustnessCheck(Check):
    name = "prompt_robustness"
    description = (
        "Prompt robustness from the cached image features: accuracy under each template alone (spread, "
        "worst template), and the worst accuracy a greedy search finds within a small edit budget of "
        "character-level misspellings or medical synonym substitutions of each class's phrasings."
    )
    params = {
        "levels": Param(list(LEVELS), "edit levels searched: char (typos, swaps, deletions), word (synonyms)",
                        choices=LEVELS),
        "char_budget": Param(2, "character edits allowed per class", min=0),
        "word_budget": Param(1, "synonym substitutions allowed per class", min=0),
        "max_candidates": Param(48, "single edits scored per greedy step (a seeded sample when there are more)", min=1),
        "synonyms": Param("", "extra synonym TOML (groups = [[\"term\", \"synonym\"], ...]) added to the shipped list",
                          validate=lambda path: readable_synonyms(path)),
        "n_images": Param(0, "images scored: a stratified, seeded subsample (0: all; no image is re-encoded)", min=0),
        "worst_prompts": Param(10, "rows of the worst prompts table", min=0),
        "n_bootstrap": Param(1000, "bootstrap resamples over images (patients where the data name them) for the 95% intervals",
                             min=0),
    }
    metrics = {
        "ensemble_accuracy": "accuracy with every template together (the audited prompt set)",
        "template_accuracy.worst": "accuracy with the worst single template",
        "template_accuracy.best": "accuracy with the best single template",
        "template_accuracy_spread": "best minus worst single-template accuracy (paired over the same images)",
        "prompt_attack.<level>.accuracy.<class>": "accuracy after the worst edits found for that class's phrasings",
        "prompt_attack.<level>.worst_accuracy": "lowest accuracy over classes for that edit level",
        "prompt_attack.<level>.one_edit_drop": "largest accuracy drop from one edit of one class's phrasings at that level",
        "prompt_attack.worst_accuracy": "lowest accuracy over classes and edit levels, within the edit budget",
        "prompt_attack.accuracy_drop": "ensemble accuracy minus the worst accuracy under prompt edits, within the edit budget",
        "one_edit_accuracy_drop": "ensemble accuracy minus the lowest accuracy found after ONE edit (one typo, "
                                       "swap or deletion of a letter, or one synonym substitution) of one class's "
                                       "phrasings; paired over the same images",
        "n_images": "images scored",
    }
    default_thresholds = {
        "one_edit_accuracy_drop": "<= 0.05",
        "template_accuracy_spread": {"rule": "<= 0.10", "on": "value", "severity": "warn"},
    }
    threshold_reasons = {
        "one_edit_accuracy_drop": (
            "a single typo or synonym in a class description is an everyday event in clinical use; it should not "
            "move accuracy by more than 5 percentage points, the margin diagnostic non-inferiority studies commonly "
            "accept. Decided on the paired 95% interval of the drop over images; the edit is the worst the search "
            "found on these images, so the drop is what an unlucky wording costs on them"),
        "template_accuracy_spread": (
            "warn only: a 10-point gap between the best and the worst single template means the reported accuracy "
            "hangs on how the prompt is phrased; decided on the observed gap since the worst template is picked on "
            "the same images"),
    }
    profiles = {
        "quick": {"n_images": 200, "char_budget": 1, "word_budget": 1, "max_candidates": 16, "n_bootstrap": 200},
        "standard": {"n_images": 0, "char_budget": 2, "word_budget": 1, "max_candidates": 48, "n_bootstrap": 1000},
        "thorough": {"n_images": 0, "char_budget": 3, "word_budget": 2, "max_candidates": 256, "n_bootstrap": 2000},
    }

    def run(self, ctx, params):
        levels = list(dict.fromkeys(params["levels"]))
        synonyms = synonym_map(load_synonym_groups(params["synonyms"] or None))

        rows = ctx.stratified_rows(params["n_images"], "prompt_robustness:rows")
        scorer = PromptScorer(ctx, rows)
        phrasings = [list(ctx.prompts.phrasings.get(c) or [c]) for c in ctx.classes]
        templates = [list(ctx.prompts.class_templates.get(c) or ctx.prompts.templates) for c in ctx.classes]
        base = torch.stack([
            scorer.class_embedding([t.format(w) for w in ws for t in ts]) for ws, ts in zip(phrasings, templates)
        ])
        ensemble_preds = scorer.logits(base).argmax(dim=1).cpu().numpy()
        sweep = TemplateSweep.run(ctx, scorer, phrasings, ensemble_preds)
        attacks = [
            greedy_attack(scorer, base, c, phrasings[c], templates[c], level, params[f"{level}_budget"],
                          params["max_candidates"], synonyms, ctx.rng(f"prompt_robustness:{level}:{name}"), name)
            for level in levels for c, name in enumerate(ctx.classes)
        ]
        findings = Findings.collect(sweep, attacks, levels)
        paired = PairedDrops(ctx.clusters(rows), ctx.rng("prompt_robustness:bootstrap"), params["n_bootstrap"],
                             sweep.correct(ensemble_preds))
        return CheckResult(
            metrics=findings.metrics, intervals=findings.intervals(sweep, paired), counts=findings.counts(sweep),
            sample_size=len(rows), not_evaluated=findings.not_evaluated(),
            summary=summary_text(sweep, findings), tables=tables(sweep, attacks, params),
            figures=[template_figure(sweep)], warnings=warnings_for(sweep, findings),
            details=details(sweep, attacks, levels), per_image=per_image_columns(ctx, rows, sweep, findings),
        )


@hookimpl
def mcaudit_register_checks(register: Callable) -> None:
    register(PromptRobustnessCheck)
