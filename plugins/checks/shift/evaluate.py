"""The evaluation loop: each image of the subsample, corrupted at every severity, through the
audited model (and the reference model when there is one), sharded under torchrun.

Every (image, corruption) pair draws from its own generator, ``shift:<corruption>`` for that
image, and the same draws serve every severity (common random numbers): a severity differs
from the next only in strength, so the accuracy curve is not blurred by fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mcaudit.batching import in_batches

from .severities import CORRUPTIONS, level


@dataclass
class Plan:
    modality: str
    corruptions: list[str]
    severities: list[int]

    @property
    def cells(self) -> list[tuple[str, int]]:
        return [(c, s) for c in self.corruptions for s in self.severities]


@dataclass
class Outcome:
    """Per-image results over the subsample's rows, keyed by (corruption, severity)."""

    rows: np.ndarray
    labels: np.ndarray
    clean_pred: np.ndarray
    clean_conf: np.ndarray
    pred: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    conf: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    ref_clean: np.ndarray | None = None
    ref_pred: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)


def corrupt(ctx, pixels: torch.Tensor, rows: np.ndarray, plan: Plan, corruption: str, severity: int) -> torch.Tensor:
    """``pixels`` of ``rows`` under one corruption at one severity (0: unchanged)."""
    if severity == 0:
        return pixels
    rngs = [ctx.image_rng(f"shift:{corruption}", int(r)) for r in rows]
    grey = np.asarray(ctx.forward.grey)[np.asarray(rows)]
    return CORRUPTIONS[corruption].apply(pixels, level(plan.modality, corruption, severity), rngs, grey)


def reference_classifier(ctx):
    """The ``--reference-model`` as a classifier over the same classes and prompts, or None."""
    if ctx.reference is None:
        return None
    adapter = ctx.load_model(*ctx.reference)
    with torch.no_grad():
        features = adapter.class_text_features(ctx.prompts.class_prompts(ctx.classes)).float()
    classifier = adapter.zero_shot_classifier(features).to(ctx.device).eval()
    size = tuple(adapter.image_size)

    def classify(pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != size:  # the corrupted image, at the reference's size
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        return classifier(pixels)

    return classify


def _probs(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return in_batches(lambda sl: model(x[sl]).float().softmax(dim=1), len(x), batch_size)


def _run_shard(ctx, local: np.ndarray, plan: Plan, reference) -> dict[str, np.ndarray]:
    model = ctx.classifier()
    parts: dict[str, list[np.ndarray]] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        parts.setdefault(key, []).append(value.cpu().numpy())

    with torch.no_grad(), ctx.autocast():
        for chunk, pixels, _ in ctx.iter_batches(local, desc="shift"):
            if reference is not None:
                keep("ref_clean", reference(pixels).argmax(dim=1))
            for i, (c, s) in enumerate(plan.cells):
                x = corrupt(ctx, pixels, chunk, plan, c, s)
                probs = _probs(model, x, ctx.batch_size)
                conf, pred = probs.max(dim=1)
                keep(f"pred{i}", pred)
                keep(f"conf{i}", conf)
                if reference is not None:
                    keep(f"ref{i}", reference(x).argmax(dim=1))
    empty = {"ref_clean": np.zeros(0, np.int64)} if reference is not None else {}
    for i in range(len(plan.cells)):
        empty |= {f"pred{i}": np.zeros(0, np.int64), f"conf{i}": np.zeros(0, np.float32)}
        if reference is not None:
            empty[f"ref{i}"] = np.zeros(0, np.int64)
    return {k: (np.concatenate(parts[k]) if k in parts else v) for k, v in empty.items()}


def evaluate(ctx, rows: np.ndarray, plan: Plan, reference=None) -> Outcome:
    """Predictions on every cell of ``plan`` for ``rows``; clean predictions come from the
    shared forward pass (the audited model is not run again on clean images)."""
    rows = np.asarray(rows)
    local = ctx.shard_rows(rows)
    values = _run_shard(ctx, local, plan, reference)
    _, merged = ctx.gather_rows(local, values)
    probs = np.asarray(ctx.forward.probs)[rows]
    outcome = Outcome(rows=rows, labels=np.asarray(ctx.forward.labels)[rows],
                      clean_pred=np.asarray(ctx.forward.preds)[rows], clean_conf=probs.max(axis=1),
                      ref_clean=merged.get("ref_clean"))
    for i, cell in enumerate(plan.cells):
        outcome.pred[cell] = merged[f"pred{i}"]
        outcome.conf[cell] = merged[f"conf{i}"]
        if reference is not None:
            outcome.ref_pred[cell] = merged[f"ref{i}"]
    return outcome


def example_images(ctx, row: int, plan: Plan) -> dict[tuple[str, int], np.ndarray]:
    """One image under every corruption at every severity (and clean, severity 0), as
    H x W x 3 arrays for the report."""
    pixels = ctx.load_pixels([row])
    rows = np.array([row])
    out = {}
    with torch.no_grad():
        for c in plan.corruptions:
            for s in sorted(set(plan.severities) | {0}):
                out[(c, s)] = corrupt(ctx, pixels, rows, plan, c, s)[0].permute(1, 2, 0).float().cpu().numpy()
    return out
