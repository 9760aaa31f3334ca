"""One model scanned: its reversed triggers, how often they send held-out images of other classes
to their class, and its clean accuracy on the same images."""

from __future__ import annotations

import numpy as np
import torch

from .inversion import invert_triggers


def scan_model(ctx, model, class_features: torch.Tensor, candidates: np.ndarray, opt_rows: np.ndarray,
               eval_rows: np.ndarray, params: dict) -> dict:
    """Reversed triggers of one model and their held-out attack success."""
    # A clone: class features made under inference_mode cannot take part in autograd.
    classifier = model.zero_shot_classifier(class_features.clone()).to(ctx.device).eval()
    trainable = [p.requires_grad for p in classifier.parameters()]
    classifier.requires_grad_(False)  # the model stays frozen: only masks and patterns learn
    try:
        size = tuple(ctx.model.image_size)
        inversion = invert_triggers(ctx, classifier, candidates, opt_rows, size, 1 if ctx.is_grey else 3, params)
        hits, trials = reversed_attack_counts(ctx, classifier, inversion, candidates, eval_rows)
        correct = clean_correct(ctx, classifier, eval_rows)
    finally:
        for p, flag in zip(classifier.parameters(), trainable):
            p.requires_grad_(flag)
    area = float(size[0] * size[1])
    majority = np.bincount(ctx.forward.labels[eval_rows]).max() / max(len(eval_rows), 1)
    return inversion | {"hits": hits, "trials": trials, "area": inversion["norms"] / area,
                        "correct": correct, "scored": len(eval_rows), "majority_share": float(majority)}


def clean_correct(ctx, classifier, rows: np.ndarray) -> int:
    correct = 0
    with torch.no_grad():
        for _, x, y in ctx.iter_batches(rows, desc="backdoor_scan: clean accuracy"):
            with ctx.autocast():
                correct += int((classifier(x).float().argmax(dim=-1) == y).sum())
    return correct


def reversed_attack_counts(ctx, classifier, inversion: dict, candidates: np.ndarray,
                           rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per trigger, how many of the rows of other classes it sends to its class, of how many."""
    k = len(candidates)
    hits, counts = np.zeros(k, dtype=int), np.zeros(k, dtype=int)
    stamps = inversion["masks"] * inversion["patterns"]
    keep = 1 - inversion["masks"]
    with torch.no_grad():
        for _, x, y in ctx.iter_batches(rows, desc="backdoor_scan: reversed triggers"):
            y = y.cpu().numpy()
            for i, c in enumerate(candidates):
                other = np.flatnonzero(y != c)
                if len(other) == 0:
                    continue
                with ctx.autocast():
                    preds = classifier(keep[i] * x[other] + stamps[i]).float().argmax(dim=-1).cpu().numpy()
                hits[i] += int((preds == c).sum())
                counts[i] += len(other)
    return hits, counts


def reversed_attack_success(ctx, classifier, inversion: dict, candidates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Share of the rows of other classes that each reversed trigger sends to its class."""
    hits, counts = reversed_attack_counts(ctx, classifier, inversion, candidates, rows)
    return np.divide(hits, counts, out=np.full(len(candidates), np.nan), where=counts > 0)
