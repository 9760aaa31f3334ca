"""mcaudit plugin: near-duplicate images, patient leakage and label conflicts.

Two images whose embeddings are almost identical are, in practice, one acquisition seen twice
(re-exported, resized, recompressed). Under two subject ids, that is one patient filed as two,
so a split by subject id puts the patient on both sides of it; with two different labels, at
least one label is wrong. The check reads the shared forward pass's image features and never
runs the image encoder again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcaudit import Check, CheckResult, Param, Table, hookimpl

BLOCK = 1024  # rows compared at once: a BLOCK x N similarity block, never the whole N x N matrix


@dataclass
class Neighbours:
    """Every pair (first < second) at or above the threshold, and each image's nearest other image."""

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray
    nearest: np.ndarray
    nearest_similarity: np.ndarray


def near_duplicates(features: torch.Tensor, threshold: float) -> Neighbours:
    """Cosine similarity of L2-normalised features, compared block by block."""
    f = features.float()
    n = len(f)
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    nearest = np.zeros(n, dtype=np.int64)
    nearest_sim = np.zeros(n)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        sim = f[start:stop] @ f.T
        own = torch.arange(start, stop)
        sim[own - start, own] = -2.0  # an image is not its own duplicate
        best, where = sim.max(dim=1)
        nearest[start:stop], nearest_sim[start:stop] = where.numpy(), best.double().numpy()
        i, j = torch.nonzero(sim >= threshold, as_tuple=True)
        keep = i + start < j  # each pair once
        i, j = i[keep], j[keep]
        pairs.append(((i + start).numpy(), j.numpy(), sim[i, j].double().numpy()))
    first, second, similarity = (np.concatenate(p) for p in zip(*pairs))
    order = np.argsort(-similarity, kind="stable")
    return Neighbours(first[order], second[order], similarity[order], nearest, nearest_sim)


def subject_ids(ctx) -> tuple[np.ndarray, bool]:
    """Each forward row's subject, and whether the data named subjects; without them every image
    is its own subject, so any near duplicate counts as one image filed twice."""
    clusters = ctx.clusters()
    if clusters is None:
        return np.array([f"image {r}" for r in range(len(ctx.forward))], dtype=object), False
    return clusters, True


class LeakageCheck(Check):
    name = "leakage"
    description = (
        "Near-duplicate images by the cosine similarity of their image features: pairs filed under two "
        "subject ids (patient leakage across a subject-wise split) and pairs whose labels disagree "
        "(annotation errors)."
    )
    params = {
        "threshold": Param(0.97, "cosine similarity at or above which two images are near duplicates",
                           min=0.0, max=1.0),
        "max_pairs": Param(50, "pairs listed in the report table (all are counted)", min=1),
    }
    metrics = {
        "near_duplicate_pairs": "pairs of images at or above the similarity threshold",
        "cross_subject_pairs": "near-duplicate pairs whose two images belong to different subjects",
        "leaked_fraction": "images with a near duplicate under another subject, as a fraction of all images",
        "label_conflict_pairs": "near-duplicate pairs whose two labels differ",
        "median_nearest_similarity": "the median over images of the similarity to the nearest other image",
        "n_images": "images compared",
    }
    default_thresholds = {
        "leaked_fraction": "<= 0.01",
        "label_conflict_pairs": {"rule": "<= 0", "severity": "warn"},
    }
    threshold_reasons = {
        "leaked_fraction": "a test set in which more than 1% of images reappear under another patient id "
                           "was not split by patient, so its scores are optimistic",
        "label_conflict_pairs": "the same image cannot show two findings: one of the two labels is wrong",
    }
    def run(self, ctx, params):
        n = len(ctx.forward)
        if n < 2:
            return CheckResult.skipped("fewer than two readable images: nothing to compare")
        found = near_duplicates(ctx.forward.image_features, params["threshold"])
        subjects, named = subject_ids(ctx)
        labels = ctx.forward.labels
        cross = subjects[found.first] != subjects[found.second]
        conflict = labels[found.first] != labels[found.second]
        leaked = np.zeros(n, dtype=bool)
        leaked[found.first[cross]] = leaked[found.second[cross]] = True
        median = float(np.median(found.nearest_similarity))
        result = CheckResult(
            metrics={"n_images": n, "median_nearest_similarity": median, "near_duplicate_pairs": len(found.first),
                     "cross_subject_pairs": int(cross.sum()), "leaked_fraction": float(leaked.mean()),
                     "label_conflict_pairs": int(conflict.sum())},
            counts={"leaked_fraction": (int(leaked.sum()), n)}, sample_size=n,
            summary=(f"{len(found.first)} near-duplicate pairs at cosine >= {params['threshold']:g}: "
                     f"{int(cross.sum())} across subjects, {int(conflict.sum())} with different labels."),
            tables=[pair_table(ctx, found, subjects, cross, conflict, params["max_pairs"], named)],
            per_image=per_image_columns(ctx, found, leaked, conflict),
            details={"title": "Whether one patient's images appear under two ids",
                     "plain_summary": plain_summary(leaked, conflict, named)},
        )
        if median >= params["threshold"]:
            # the threshold cannot separate duplicates from distinct images in this embedding
            reason = (f"half the images are at cosine >= {params['threshold']:g} from another image (median "
                      f"{median:.4f}): this model's features do not tell images apart at that threshold; raise it")
            result.not_evaluated |= {"leaked_fraction": reason, "label_conflict_pairs": reason}
            result.warnings.append(reason)
        return result


def pair_table(ctx, found: Neighbours, subjects, cross, conflict, limit: int, named: bool) -> Table:
    labels, classes = ctx.forward.labels, ctx.classes
    rows = []
    for k in range(min(limit, len(found.first))):
        a, b = int(found.first[k]), int(found.second[k])
        finding = [w for w, hit in (("two subjects", cross[k]), ("labels differ", conflict[k])) if hit]
        rows.append([ctx.source(a), ctx.source(b), round(float(found.similarity[k]), 5),
                     f"{subjects[a]} / {subjects[b]}" if named else "", f"{classes[labels[a]]} / {classes[labels[b]]}",
                     ", ".join(finding) or "same subject, same label"])
    note = f"{len(found.first)} pairs, the {len(rows)} most similar shown"
    if not named:
        note += "; the data name no subjects (a manifest subject or patient_id column), so each image is its own"
    return Table("Near-duplicate pairs", ["image", "near duplicate", "cosine similarity", "subjects", "labels",
                                          "finding"], rows, note=note)


def per_image_columns(ctx, found: Neighbours, leaked: np.ndarray, conflict: np.ndarray) -> dict:
    """samples.csv columns: every image's nearest other image and whether it is in a flagged pair."""
    rows = np.arange(len(ctx.forward))
    in_conflict = np.zeros(len(rows), dtype=bool)
    in_conflict[found.first[conflict]] = in_conflict[found.second[conflict]] = True
    return {
        "nearest_similarity": ctx.per_image(rows, np.round(found.nearest_similarity, 6)),
        "nearest_image": ctx.per_image(rows, [ctx.source(int(r)) for r in found.nearest]),
        "leaked": ctx.per_image(rows, leaked.astype(int)),
        "label_conflict": ctx.per_image(rows, in_conflict.astype(int)),
    }


def plain_summary(leaked: np.ndarray, conflict: np.ndarray, named: bool) -> str:
    who = "under another patient id" if named else "twice"
    if not leaked.any() and not conflict.any():
        return f"No image appears {who}: a split of this data by patient keeps each patient on one side."
    return (f"{int(leaked.sum())} of {len(leaked)} images appear {who}, and {int(conflict.sum())} near-identical "
            "pairs carry different labels: deduplicate before splitting, and re-read those labels.")


@hookimpl
def mcaudit_register_checks(register):
    register(LeakageCheck)
