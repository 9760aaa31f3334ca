"""What a check sees: the model, the data, the shared forward outputs and run settings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mcaudit.data.dataset import AuditDataset
from mcaudit.devices import autocast
from mcaudit.distributed import SINGLE, World, gather_rows, shard
from mcaudit.forward import ForwardOutputs
from mcaudit.models.adapter import ModelAdapter, ZeroShotClassifier
from mcaudit.progress import progress
from mcaudit.prompts import PromptSet


@dataclass
class AuditContext:
    """Everything a check may use. Rows are positions in :attr:`forward` (readable images)."""

    model: ModelAdapter
    dataset: AuditDataset
    prompts: PromptSet
    class_features: torch.Tensor
    forward: ForwardOutputs
    device: torch.device
    precision: str = "fp32"
    batch_size: int = 64
    seed: int = 0
    workers: int = 0
    show_progress: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    open_dataset: Callable[[str], AuditDataset] | None = None
    world: World = SINGLE
    model_loader: Callable[[str, str | None], ModelAdapter] | None = None

    def load_model(self, spec: str, checkpoint: str | None = None) -> ModelAdapter:
        """Another model (a reference checkpoint) through the same loader hooks, plugins and
        network setting as ``--model``, on the run's device, in eval mode."""
        if self.model_loader is None:
            raise RuntimeError("this context was built without a model loader")
        return self.model_loader(spec, checkpoint)

    @property
    def reference(self) -> tuple[str, str | None] | None:
        """The ``--reference-model`` (and its ``--reference-checkpoint``), or None: the public
        checkpoint the audited model was fine-tuned from, for checks that compare against it."""
        spec = self.options.get("reference_model")
        return (spec, self.options.get("reference_checkpoint")) if spec else None

    def shard_rows(self, rows: np.ndarray) -> np.ndarray:
        """This process's part of ``rows`` under torchrun (all of them otherwise).

        An expensive check (attacks, attributions, smoothing) runs the model on its shard
        and combines per-row results with :meth:`gather_rows`; every rank then holds the
        same combined results, so the metrics it computes agree across ranks.
        """
        return shard(rows, self.world)

    def gather_rows(self, rows: np.ndarray, values: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-row results from every rank, concatenated and sorted by row."""
        return gather_rows(rows, values, self.world)

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def is_grey(self) -> bool:
        """True when every audited image was grey (X-ray, CT, MRI), as most medical images are."""
        return bool(len(self.forward.grey)) and bool(self.forward.grey.all())

    @property
    def group_columns(self) -> tuple[str, ...]:
        return self.dataset.group_columns

    def group_values(self, column: str) -> np.ndarray:
        recs = self.dataset.records
        return np.array([recs[i].groups.get(column, "") for i in self.forward.indices], dtype=object)

    def clusters(self, rows: np.ndarray | None = None) -> np.ndarray | None:
        """The resampling unit of each forward row (or of ``rows``): the subject/patient id
        when the data name one, else None (every image is its own unit). Pass it as
        ``bootstrap_interval(..., clusters=...)`` so that slices of one patient are resampled
        together."""
        recs = self.dataset.records
        indices = self.forward.indices if rows is None else self.forward.indices[np.asarray(rows)]
        subjects = [getattr(recs[i], "subject", None) for i in indices]
        if not any(subjects):
            return None
        return np.array([s if s else f"\0row{i}" for i, s in zip(indices, subjects)], dtype=object)

    def rng(self, name: str) -> np.random.Generator:
        """A generator seeded from the run seed and ``name``, stable across runs and checks."""
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def torch_generator(self, name: str) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(self.rng(name).integers(0, 2**62)))
        return g

    def autocast(self):
        return autocast(self.device, self.precision)

    def classifier(self) -> ZeroShotClassifier:
        """pixels in [0, 1] -> class logits, differentiable, on the run's device."""
        return self.model.zero_shot_classifier(self.class_features).to(self.device).eval()

    def stratified_rows(self, n: int, name: str) -> np.ndarray:
        """Up to ``n`` rows, classes in proportion to the data (at least one each), seeded."""
        labels = self.forward.labels
        total = len(labels)
        if n <= 0 or n >= total:
            return np.arange(total)
        rng = self.rng(name)
        chosen = []
        classes, counts = np.unique(labels, return_counts=True)
        quotas = np.maximum(1, np.floor(counts / total * n).astype(int))
        while quotas.sum() > n:
            quotas[np.argmax(quotas)] -= 1
        leftover = n - quotas.sum()
        order = np.argsort(-(counts / total * n - np.floor(counts / total * n)))
        for k in order[:leftover]:
            quotas[k] += 1
        for cls, quota in zip(classes, quotas):
            rows = np.flatnonzero(labels == cls)
            chosen.append(rng.choice(rows, size=min(quota, len(rows)), replace=False))
        return np.sort(np.concatenate(chosen))

    pixel_cache_bytes: int = 256 * 2**20
    _pixel_cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def load_pixels(self, rows: np.ndarray | list[int]) -> torch.Tensor:
        """Pixels of the given rows, (len(rows), 3, H, W) in [0, 1], on the run's device.

        Several checks attack or explain overlapping subsamples; decoded images are kept
        (up to ``pixel_cache_bytes``) so that a DICOM or large JPEG is decoded once per run.
        """
        out = []
        for r in rows:
            r = int(r)
            pixels = self._pixel_cache.get(r)
            if pixels is None:
                pixels = self.dataset[int(self.forward.indices[r])]["pixels"]
                size = pixels.numel() * pixels.element_size()
                if size * (len(self._pixel_cache) + 1) <= self.pixel_cache_bytes:
                    self._pixel_cache[r] = pixels
            out.append(pixels)
        return torch.stack(out).to(self.device)

    def iter_batches(self, rows: np.ndarray, batch_size: int | None = None, desc: str = "") -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """(rows, pixels, labels) batches over ``rows``, pixels on the device."""
        bs = batch_size or self.batch_size
        rows = np.asarray(rows)
        chunks = [rows[i : i + bs] for i in range(0, len(rows), bs)]
        for chunk in progress(chunks, desc or "batches", enabled=self.show_progress):
            pixels = self.load_pixels(chunk)
            labels = torch.as_tensor(self.forward.labels[chunk], device=self.device)
            yield chunk, pixels, labels

    def load_mask(self, row: int) -> torch.Tensor | None:
        return self.dataset.load_mask(int(self.forward.indices[row]))

    def source(self, row: int) -> str:
        return self.dataset.records[int(self.forward.indices[row])].source
