"""The greedy search for the class phrasing edits that lower accuracy most."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .edits import Edit, char_edits, word_edits
from .scoring import PromptScorer


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
