"""Point metrics of a classifier, from scikit-learn: confusion matrix, accuracy, recall and
precision per class, balanced accuracy, AUROC, ROC curve, average precision, and the false
positive rate at a fixed true positive rate."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm


def confusion(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return skm.confusion_matrix(labels, preds, labels=np.arange(n_classes))


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(skm.accuracy_score(labels, preds)) if len(labels) else float("nan")


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def per_class_precision(cm: np.ndarray) -> np.ndarray:
    predicted = cm.sum(axis=0)
    # scikit-learn's convention: precision of a never-predicted class is 0.
    return np.where(predicted > 0, np.diag(cm) / np.maximum(predicted, 1), 0.0)


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``labels``."""
    if len(labels) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": those are left out, as intended
        return float(skm.balanced_accuracy_score(labels, preds))


def auroc_binary(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == len(positive):
        return float("nan")
    return float(skm.roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


def auroc_ovr(labels: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro one-vs-rest AUROC and the per-class values; binary tasks use class 1's score.

    Classes absent from ``labels`` (or present alone) have no AUROC and are left out of the
    macro mean.
    """
    n_classes = probs.shape[1]
    per = np.array([auroc_binary(labels == k, probs[:, k]) for k in range(n_classes)])
    if n_classes == 2:
        return float(per[1]), per
    ok = ~np.isnan(per)
    return (float(per[ok].mean()) if ok.any() else float("nan")), per


def roc_points(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates, thresholds) of "score >= threshold".

    One point per distinct score, highest threshold first, starting at (0, 0): tied scores
    move the curve diagonally, as scikit-learn's ``roc_curve`` does.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class only: the undefined rates come back as NaN
        fpr, tpr, thresholds = skm.roc_curve(positive, scores, drop_intermediate=False)
    return fpr, tpr, thresholds


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum of precision x recall gain.

    Tied scores form one threshold (no interpolation), which is scikit-learn's
    ``average_precision_score``.
    """
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    return float(skm.average_precision_score(positive, np.asarray(scores, dtype=np.float64)))


def fpr_at_tpr(positive: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """Share of negatives scoring at or above the highest threshold that keeps ``tpr`` of the
    positives, i.e. the false positive rate at the first ROC point reaching that TPR."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = np.sort(scores[positive])[::-1], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    k = int(np.ceil(tpr * len(pos) - 1e-9))  # positives that must score >= the threshold
    threshold = pos[max(k, 1) - 1]
    return float(np.mean(neg >= threshold))
