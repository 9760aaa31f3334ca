"""The shared forward pass: every image through the image encoder exactly once.

Checks that need only forward outputs (features, logits, probabilities) read them from
:class:`ForwardOutputs` instead of running the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mcaudit.data.dataset import AuditDataset, collate
from mcaudit.devices import autocast
from mcaudit.errors import InputError
from mcaudit.models.adapter import ModelAdapter
from mcaudit.progress import progress


@dataclass
class ForwardOutputs:
    """Per-image outputs, one row per image that could be read, in dataset order."""

    indices: np.ndarray  # dataset index of each row
    labels: np.ndarray
    image_features: torch.Tensor  # (N, D), L2-normalised, float32 on the CPU
    logits: torch.Tensor  # (N, C): logit_scale * cosine similarity
    grey: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def probs(self) -> np.ndarray:
        return torch.softmax(self.logits.double(), dim=1).numpy()

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(dim=1).numpy()

    def __len__(self) -> int:
        return len(self.indices)


def run_forward(
    adapter: ModelAdapter,
    dataset: AuditDataset,
    class_features: torch.Tensor,
    *,
    batch_size: int = 64,
    precision: str = "fp32",
    workers: int = 0,
    strict: bool = False,
    show_progress: bool = False,
) -> ForwardOutputs:
    device = adapter.device
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    text = class_features.to(device)
    scale = adapter.logit_scale
    indices, feats, logits, grey, failures = [], [], [], [], []
    with torch.inference_mode(), autocast(device, precision):
        for batch in progress(loader, "forward pass", enabled=show_progress, unit="batch"):
            for index, error in batch["failed"]:
                if strict:
                    raise InputError(f"unreadable image (--strict): {error}")
                failures.append((index, error))
            if batch["pixels"] is None:
                continue
            pixels = batch["pixels"].to(device, non_blocking=True)
            f = adapter.encode_image(pixels)
            indices.append(batch["index"])
            feats.append(f.float().cpu())
            logits.append((scale * f.float() @ text.T).cpu())
            grey.extend(batch["grey"])
    if not indices:
        raise InputError(f"--data {dataset.spec}: none of the {len(dataset)} images could be read")
    idx = torch.cat(indices).numpy()
    labels = np.array([dataset.records[i].label for i in idx], dtype=np.int64)
    return ForwardOutputs(
        indices=idx,
        labels=labels,
        image_features=torch.cat(feats),
        logits=torch.cat(logits),
        grey=np.array(grey, dtype=bool),
        failures=failures,
    )
