"""Scoring prompts against the cached image features, and accuracy under each template alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcaudit.metrics import accuracy, balanced_accuracy


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
