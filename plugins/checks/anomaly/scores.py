"""The six OOD scores and how well one separates audited from OOD images.

Every score is an "ID-ness": higher means more like the audited (in-distribution) images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from mcaudit.metrics import auroc_binary, average_precision, fpr_at_tpr

SCORES = {
    "msp": "MSP: the top class probability (softmax of the model's logits)",
    "mcm": "MCM: the top class probability of a softmax over cosine similarities / temperature",
    "energy": "energy: log-sum-exp of the logits (the negative free energy)",
    "max_logit": "max logit: the top class logit",
    "mahalanobis": "Mahalanobis: minus the smallest class-conditional Mahalanobis distance of the image features",
    "knn": "kNN: minus the distance to the k-th nearest fitted image feature",
}


@dataclass
class Encoded:
    """Image features (L2-normalised) and logits of a set of images, on the CPU."""

    features: torch.Tensor
    logits: torch.Tensor
    kinds: list[str] = field(default_factory=list)  # how each generated image was made


def logit_scores(logits: torch.Tensor, features: torch.Tensor, class_features: torch.Tensor, temperature: float) -> dict[str, np.ndarray]:
    logits = logits.double()
    cos = features.double() @ class_features.double().T
    return {
        "msp": torch.softmax(logits, dim=1).max(dim=1).values.numpy(),
        "mcm": torch.softmax(cos / temperature, dim=1).max(dim=1).values.numpy(),
        "energy": torch.logsumexp(logits, dim=1).numpy(),
        "max_logit": logits.max(dim=1).values.numpy(),
    }


class MahalanobisScorer:
    """Class means and one shared covariance of the fit split's features (Lee et al., 2018).

    The covariance is Ledoit-Wolf shrunk toward a scaled identity, which keeps it invertible
    when the fit split has fewer images than feature dimensions, as it has for a 512-d CLIP
    model on a small audit.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.classes = np.unique(labels)
        self.means = np.stack([features[labels == c].mean(axis=0) for c in self.classes])
        centred = features - self.means[np.searchsorted(self.classes, labels)]
        # Centred on the class means already: the pooled within-class covariance.
        self.covariance = LedoitWolf(assume_centered=True).fit(centred)
        self.shrinkage = float(self.covariance.shrinkage_)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        squared = np.stack([self.covariance.mahalanobis(features - mean) for mean in self.means], axis=1)
        return -squared.min(axis=1)


class KnnScorer:
    """Distance to the k-th nearest fit feature on the unit sphere (Sun et al., 2022)."""

    def __init__(self, features: np.ndarray, k: int):
        bank = _unit(features)
        self.k = min(k, len(bank))
        self.index = NearestNeighbors(n_neighbors=self.k).fit(bank)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        distances, _ = self.index.kneighbors(_unit(features))
        return -distances[:, self.k - 1]


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=1, keepdims=True)


class Scorers:
    """All six scores, with Mahalanobis and kNN fitted on the fit split's features."""

    def __init__(self, class_features: torch.Tensor, fit_features: np.ndarray, fit_labels: np.ndarray,
                 temperature: float, knn_k: int):
        self.class_features = class_features
        self.temperature = temperature
        self.mahalanobis = MahalanobisScorer(fit_features, fit_labels)
        self.knn = KnnScorer(fit_features, knn_k)

    def logit_based(self, logits: torch.Tensor, features: torch.Tensor) -> dict[str, np.ndarray]:
        return logit_scores(logits, features, self.class_features, self.temperature)

    def feature_based(self, features: np.ndarray) -> dict[str, np.ndarray]:
        return {"mahalanobis": self.mahalanobis(features), "knn": self.knn(features)}

    def __call__(self, encoded: Encoded) -> dict[str, np.ndarray]:
        return self.logit_based(encoded.logits, encoded.features) | self.feature_based(encoded.features.double().numpy())


def separation(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR with ID and with OOD as positive, and FPR at 95% TPR (ID positive)."""
    scores = np.r_[id_scores, ood_scores]
    is_id = np.r_[np.ones(len(id_scores), bool), np.zeros(len(ood_scores), bool)]
    return {
        "auroc": auroc_binary(is_id, scores),
        "aupr_in": average_precision(is_id, scores),
        "aupr_out": average_precision(~is_id, -scores),
        "fpr95": fpr_at_tpr(is_id, scores, 0.95),
    }
