"""How much zero-shot accuracy depends on the wording of the class prompts.

Two questions, both answered from the image features of the shared forward pass (the image
encoder is never run again; only prompts are encoded):

* Template sensitivity: accuracy when every class is described with one template alone.
* Adversarial wording: within a small edit budget, which misspelling (character level: typos,
  swapped letters, deleted letters) or synonym substitution (word level, from a medical
  synonym list shipped with mcaudit) of a class's phrasings lowers accuracy most? The search
  is greedy: each step tries a seeded sample of single edits and keeps the most harmful.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl
from mcaudit.metrics import accuracy, balanced_accuracy, bootstrap_interval

LEVELS = ("char", "word")

# Neighbouring keys on a QWERTY keyboard: the typos a hurried typist makes.
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def keyboard_neighbours() -> dict[str, str]:
    where = {ch: (r, c) for r, row in enumerate(KEYBOARD_ROWS) for c, ch in enumerate(row)}
    out = {}
    for ch, (r, c) in where.items():
        near = []
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if (dr or dc) and 0 <= rr < len(KEYBOARD_ROWS) and 0 <= cc < len(KEYBOARD_ROWS[rr]):
                    near.append(KEYBOARD_ROWS[rr][cc])
        out[ch] = "".join(near)
    return out


NEIGHBOURS = keyboard_neighbours()


# -- the synonym list ------------------------------------------------------------------
def load_synonym_groups(path: str | Path | None = None) -> list[list[str]]:
    """The shipped synonym groups, plus those of ``path`` when given."""
    shipped = resources.files("mcaudit.plugins.checks") / "medical_synonyms.toml"
    groups = _read_groups(shipped.read_text(encoding="utf-8"), "medical_synonyms.toml")
    if path:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"prompt_robustness.synonyms: cannot read {p} ({exc.strerror or exc})") from exc
        groups += _read_groups(text, str(p))
    return groups


def _readable_synonyms(path: str) -> None:
    """Param validation: a synonym file that cannot be read or parsed stops the run before the model loads."""
    if path:
        load_synonym_groups(path)


def _read_groups(text: str, source: str) -> list[list[str]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"prompt_robustness.synonyms: {source} is not valid TOML ({exc})") from exc
    groups = data.get("groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and len(g) >= 2 and all(isinstance(t, str) and t.strip() for t in g) for g in groups
    ):
        raise InputError(f"prompt_robustness.synonyms: {source} needs groups = [[\"term\", \"synonym\", ...], ...]")
    return [[" ".join(t.lower().split()) for t in g] for g in groups]


def synonym_map(groups: list[list[str]]) -> dict[str, list[str]]:
    """term -> the other terms of every group it belongs to, in a stable order."""
    out: dict[str, dict[str, None]] = {}
    for group in groups:
        for term in group:
            alts = out.setdefault(term, {})
            for other in group:
                if other != term:
                    alts[other] = None
    return {t: list(a) for t, a in out.items()}


# -- single edits ----------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    phrasing: int  # which of the class's phrasings is edited
    text: str  # the phrasing after the edit
    what: str  # for the report, e.g. "swap 'ac' -> 'ca'"


def char_edits(text: str, index: int) -> list[Edit]:
    """Every deletion, adjacent swap and keyboard typo of a letter."""
    out: list[Edit] = []
    for i, ch in enumerate(text):
        if not ch.isalpha():
            continue
        if len(text.strip()) > 1:
            out.append(Edit(index, text[:i] + text[i + 1 :], f"delete '{ch}'"))
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt.isalpha() and nxt.lower() != ch.lower():
            out.append(Edit(index, text[:i] + nxt + ch + text[i + 2 :], f"swap '{ch}{nxt}' -> '{nxt}{ch}'"))
        for typo in NEIGHBOURS.get(ch.lower(), ""):
            typo = typo.upper() if ch.isupper() else typo
            out.append(Edit(index, text[:i] + typo + text[i + 1 :], f"typo '{ch}' -> '{typo}'"))
    return out


def word_edits(text: str, index: int, synonyms: dict[str, list[str]]) -> list[Edit]:
    """Every replacement of a listed term (whole words, any case) by one of its synonyms."""
    out: list[Edit] = []
    lower = text.lower()
    for term, alternatives in synonyms.items():
        for match in re.finditer(r"(?<![\w-])" + re.escape(term) + r"(?![\w-])", lower):
            a, b = match.span()
            for alt in alternatives:
                out.append(Edit(index, text[:a] + alt + text[b:], f"'{text[a:b]}' -> '{alt}'"))
    return out


# -- scoring prompts against cached image features -------------------------------------
class PromptScorer:
    """Encodes prompts once each and scores class embeddings against fixed image features."""

    def __init__(self, ctx, rows: np.ndarray):
        self.model = ctx.model
        self.feats = ctx.forward.image_features[rows].to(ctx.device)
        self.labels = ctx.forward.labels[rows]
        self.labels_t = torch.as_tensor(self.labels, device=ctx.device)
        self.scale = float(ctx.model.logit_scale)
        self.n_classes = len(ctx.classes)
        self._cache: dict[str, torch.Tensor] = {}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            with torch.inference_mode():
                emb = self.model.encode_text(todo).float()
            self._cache.update(zip(todo, emb))
        return torch.stack([self._cache[p] for p in prompts])

    def class_embedding(self, prompts: list[str]) -> torch.Tensor:
        # CLIP's prompt ensemble, as ModelAdapter.class_text_features builds it
        return torch.nn.functional.normalize(self.encode(prompts).mean(dim=0), dim=-1)

    def logits(self, class_emb: torch.Tensor) -> torch.Tensor:
        return self.scale * self.feats @ class_emb.T

    def objective(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy and mean true-class margin for logits shaped (..., N, C)."""
        correct = (logits.argmax(dim=-1) == self.labels_t).double().mean(dim=-1)  # float32 would leave 1e-8 "drops"
        true = logits.gather(-1, self.labels_t.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        other = logits.scatter(-1, self.labels_t.expand(*logits.shape[:-1]).unsqueeze(-1), float("-inf")).amax(dim=-1)
        margin = (true - other).mean(dim=-1)
        return correct.cpu().numpy(), margin.cpu().numpy()


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
class ClassAttack:
    class_name: str
    level: str
    original: list[str]
    perturbed: list[str]
    edits: list[str] = field(default_factory=list)
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")
    preds_after: np.ndarray | None = None
    # The greedy search's first step is the most harmful single edit among those scored.
    one_edit: str = ""
    one_edit_accuracy: float = float("nan")
    one_edit_preds: np.ndarray | None = None
    candidates_scored: int = 0


def greedy_attack(
    scorer: PromptScorer, base: torch.Tensor, k: int, phrasings: list[str], templates: list[str],
    level: str, budget: int, max_candidates: int, synonyms: dict[str, list[str]], rng: np.random.Generator,
    class_name: str,
) -> ClassAttack:
    """Greedily edit class ``k``'s phrasings to lower accuracy; other classes stay as they are.

    Each step scores a seeded sample of single edits and keeps the one with the lowest accuracy
    (ties broken by the lowest mean margin of the true class); the search stops early when no
    edit makes things worse.
    """
    current = list(phrasings)
    emb = base.clone()
    acc0, margin0 = scorer.objective(scorer.logits(emb))
    best = (float(acc0), float(margin0))
    result = ClassAttack(class_name, level, list(phrasings), list(phrasings), accuracy_before=float(acc0),
                         one_edit_accuracy=float(acc0), one_edit_preds=scorer.logits(emb).argmax(dim=1).cpu().numpy())
    for step in range(budget):
        candidates: list[Edit] = []
        for i, text in enumerate(current):
            candidates += char_edits(text, i) if level == "char" else word_edits(text, i, synonyms)
        candidates = [c for c in candidates if c.text.strip() and c.text not in current]
        if not candidates:
            break
        if len(candidates) > max_candidates:
            pick = np.sort(rng.choice(len(candidates), size=max_candidates, replace=False))
            candidates = [candidates[i] for i in pick]
        result.candidates_scored += len(candidates)
        prompt_sets = [[t.format(w) for w in _with(current, c) for t in templates] for c in candidates]
        scorer.encode([p for ps in prompt_sets for p in ps])  # one batched text pass per step
        cand_emb = torch.stack([scorer.class_embedding(ps) for ps in prompt_sets])
        logits = scorer.logits(emb).unsqueeze(0).repeat(len(candidates), 1, 1)
        logits[:, :, k] = scorer.scale * (cand_emb @ scorer.feats.T)
        accs, margins = scorer.objective(logits)
        j = int(np.lexsort((margins, accs))[0])
        if (accs[j], margins[j]) >= best:
            break
        best = (float(accs[j]), float(margins[j]))
        current = _with(current, candidates[j])
        emb[k] = cand_emb[j]
        result.edits.append(candidates[j].what)
        if step == 0:
            result.one_edit = candidates[j].what
            result.one_edit_accuracy = best[0]
            result.one_edit_preds = scorer.logits(emb).argmax(dim=1).cpu().numpy()
    result.perturbed = current
    result.accuracy_after = best[0]
    result.preds_after = scorer.logits(emb).argmax(dim=1).cpu().numpy()
    return result


def _with(phrasings: list[str], edit: Edit) -> list[str]:
    out = list(phrasings)
    out[edit.phrasing] = edit.text
    return out


# -- the check -------------------------------------------------------------------------
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
                          validate=lambda path: _readable_synonyms(path)),
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
            summary=_summary(sweep, findings), tables=_tables(sweep, attacks, params), figures=[_template_figure(sweep)],
            warnings=_warnings(sweep, findings), details=_details(sweep, attacks, levels),
            per_image=_per_image(ctx, rows, sweep, findings),
        )


@dataclass
class TemplateSweep:
    """Accuracy with every template together and with each template alone, on the scored images."""

    labels: np.ndarray
    ensemble_preds: np.ndarray
    ensemble_acc: float
    templates: list[str]
    rows: list[list]  # template, accuracy, balanced accuracy, change vs all templates
    preds: list[np.ndarray]

    @classmethod
    def run(cls, ctx, scorer: PromptScorer, phrasings: list[list[str]], ensemble_preds: np.ndarray) -> "TemplateSweep":
        labels = scorer.labels
        ensemble_acc = accuracy(labels, ensemble_preds)
        templates = ctx.prompts.all_templates()
        scorer.encode([t.format(w) for t in templates for ws in phrasings for w in ws])
        rows, preds_all = [], []
        for template in templates:
            emb = torch.stack([scorer.class_embedding([template.format(w) for w in ws]) for ws in phrasings])
            preds = scorer.logits(emb).argmax(dim=1).cpu().numpy()
            acc = accuracy(labels, preds)
            preds_all.append(preds)
            rows.append([template, acc, balanced_accuracy(labels, preds, len(ctx.classes)), acc - ensemble_acc])
        return cls(labels, ensemble_preds, ensemble_acc, list(templates), rows, preds_all)

    @property
    def accuracies(self) -> list[float]:
        return [r[1] for r in self.rows]

    @property
    def worst(self) -> int:
        return int(np.argmin(self.accuracies))

    @property
    def best(self) -> int:
        return int(np.argmax(self.accuracies))

    def correct(self, preds: np.ndarray) -> np.ndarray:
        return (preds == self.labels).astype(np.float64)

    def count(self, preds: np.ndarray) -> tuple[int, int]:
        return int(self.correct(preds).sum()), len(self.labels)


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


def _tables(sweep: TemplateSweep, attacks: list[ClassAttack], params: dict) -> list[Table]:
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


def _template_figure(sweep: TemplateSweep):
    from mcaudit.reports import plots

    ordered = sorted(sweep.rows, key=lambda r: r[1])
    fig, ax = plots.new_figure(5.4, max(2.2, 0.45 * len(ordered) + 1.0))
    ax.barh(range(len(ordered)), [r[1] for r in ordered], color="#4c72b0")
    ax.axvline(sweep.ensemble_acc, color="black", linestyle="--", label="all templates")
    ax.set_yticks(range(len(ordered)), [plots.short_label(r[0], 40) for r in ordered], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.legend(fontsize=8, loc="lower right")
    return plots.to_figure(fig, "Accuracy per template",
                           "Zero-shot accuracy when every class is described with one template alone; "
                           "the dashed line is the audited prompt ensemble.")


def _per_image(ctx, rows, sweep: TemplateSweep, findings: Findings) -> dict[str, list]:
    """samples.csv: whether each scored image is right under the worst template and the worst edit."""
    correct = lambda preds: [int(v) for v in sweep.correct(preds)]  # noqa: E731
    out = {"correct_worst_template": ctx.per_image(rows, correct(sweep.preds[sweep.worst]))}
    attack = findings.worst_attack
    if attack is not None and attack.preds_after is not None:
        out["correct_worst_prompt_edit"] = ctx.per_image(rows, correct(attack.preds_after))
    return out


def _warnings(sweep: TemplateSweep, findings: Findings) -> list[str]:
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


def _summary(sweep: TemplateSweep, findings: Findings) -> str:
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


def _details(sweep: TemplateSweep, attacks: list[ClassAttack], levels: list[str]) -> dict:
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


@hookimpl
def mcaudit_register_checks(register: Callable) -> None:
    register(PromptRobustnessCheck)
