"""The shared forward pass: every image through the image encoder exactly once.

Checks that need only forward outputs (features, logits, probabilities) read them from
:class:`ForwardOutputs` instead of running the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mcaudit.batching import with_backoff
from mcaudit.data.dataset import AuditDataset, collate
from mcaudit.devices import autocast, full_precision
from mcaudit.distributed import SINGLE, World, all_gather_objects, shard
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


def encode_with_backoff(adapter: ModelAdapter, pixels: torch.Tensor) -> torch.Tensor:
    """Encode a batch; on a CUDA out-of-memory error, halve it and retry instead of failing."""
    return with_backoff(lambda rows: adapter.encode_image(pixels[rows]), 0, len(pixels))


def _gather(indices, feats, logits, grey, failures, world: World):
    local = (
        torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        torch.cat(feats) if feats else None,
        torch.cat(logits) if logits else None,
        list(grey),
        list(failures),
    )
    parts = [p for p in all_gather_objects(local, world)]
    parts = [p for p in parts if p[1] is not None]
    failures = sorted(f for p in all_gather_objects(local[4], world) for f in p)
    if not parts:
        return [], [], [], [], failures
    idx = torch.cat([p[0] for p in parts])
    order = torch.argsort(idx)
    grey = np.concatenate([np.asarray(p[3], dtype=bool) for p in parts])[order.numpy()]
    return [idx[order]], [torch.cat([p[1] for p in parts])[order]], [torch.cat([p[2] for p in parts])[order]], list(grey), failures


class _OutputBuffers:
    """Per-image outputs of one rank, written in place batch by batch."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.count = 0
        self.index = torch.empty(capacity, dtype=torch.long)
        self.features: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def add(self, index: torch.Tensor, features: torch.Tensor, logits: torch.Tensor) -> None:
        if self.features is None:
            self.features = torch.empty(self.capacity, features.shape[1], dtype=torch.float32)
            self.logits = torch.empty(self.capacity, logits.shape[1], dtype=torch.float32)
        end = self.count + len(index)
        self.index[self.count : end] = index
        self.features[self.count : end] = features
        self.logits[self.count : end] = logits
        self.count = end

    def parts(self) -> tuple[list, list, list]:
        """Lists of one tensor each (empty when no image could be read), as _gather takes them."""
        if self.features is None:
            return [], [], []
        n = self.count
        return [self.index[:n]], [self.features[:n]], [self.logits[:n]]


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
    world: World = SINGLE,
    cache=None,
) -> ForwardOutputs:
    """Encode every image once; under torchrun each rank encodes its shard, then all gather.

    The dataset takes the adapter's own preprocessing from here on, so these pixels and
    those that checks load later through the same dataset are the ones the model's users
    would give it.
    """
    dataset.use_preprocessing(adapter.pixel_transform)

    def encode(rows=None):
        return _encode_rows(adapter, dataset, class_features, rows, batch_size, precision, workers, strict,
                            show_progress, world)

    # A mcaudit.forward_cache.ForwardCache encodes only the images it lacks (single process only).
    found = cache.forward(adapter, dataset, class_features, precision, encode) if cache is not None and not world.active else None
    indices, feats, logits, grey, failures = found if found is not None else encode()
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


def _encode_rows(adapter, dataset, class_features, rows, batch_size, precision, workers, strict, show_progress, world):
    """(indices, features, logits, grey, failures) of the dataset rows ``rows`` (all when None)."""
    device = adapter.device
    subset = dataset if rows is None else torch.utils.data.Subset(dataset, list(rows))
    if world.active:
        subset = torch.utils.data.Subset(dataset, shard(np.arange(len(dataset)), world).tolist())
    loader = torch.utils.data.DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    out, failures, grey = _encode_batches(adapter, loader, class_features, len(subset), precision, strict, show_progress)
    indices, feats, logits = out.parts()
    if world.active:
        return _gather(indices, feats, logits, grey, failures, world)
    return indices, feats, logits, grey, failures


def _encode_batches(adapter, loader, class_features, n: int, precision: str, strict: bool, show_progress: bool):
    device = adapter.device
    text = class_features.to(device)
    scale = adapter.logit_scale
    # Outputs go into buffers allocated once. Keeping small per-batch tensors alive between
    # the large short-lived batch allocations fragments the C heap: at 16k images the
    # resident memory grew by 700 MB for 10 MB of outputs, and streaming is the point.
    out = _OutputBuffers(n)
    failures, grey = [], []
    with torch.inference_mode(), autocast(device, precision):
        for batch in progress(loader, "forward pass", enabled=show_progress, unit="batch"):
            for index, error in batch["failed"]:
                if strict:
                    raise InputError(f"unreadable image (--strict): {error}")
                failures.append((index, error))
            if batch["pixels"] is None:
                continue
            pixels = batch["pixels"].to(device, non_blocking=True)
            f = encode_with_backoff(adapter, pixels).float()
            with full_precision(device):
                out.add(batch["index"], f, scale * f @ text.float().T)
            grey.extend(batch["grey"])
    return out, failures, grey
