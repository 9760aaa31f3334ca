"""What a check sees: the model, the data, the shared forward outputs and run settings."""

from __future__ import annotations

import contextlib
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
    strict: bool = False

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

    @property
    def ood(self) -> str | None:
        """The ``--ood`` data spec, or None when the user gave no out-of-distribution set."""
        return self.options.get("ood") or None

    def encode(self, dataset: AuditDataset) -> ForwardOutputs:
        """Encode another data set (an OOD set, a corrupted copy) through the shared forward
        path: the model's own preprocessing, batching with out-of-memory halving, ``--strict``,
        and torchrun sharding (each rank encodes its part, every rank gets all rows)."""
        from mcaudit.forward import run_forward

        return run_forward(self.model, dataset, self.class_features, batch_size=self.batch_size,
                           precision=self.precision, workers=self.workers, strict=self.strict,
                           show_progress=self.show_progress and self.world.is_main, world=self.world)

    def per_image(self, rows: np.ndarray, values, fill: Any = None) -> list[Any]:
        """A samples.csv column for ``CheckResult.per_image``: ``values[i]`` at forward row
        ``rows[i]``, ``fill`` (None: an empty cell) for the rows the check did not look at."""
        column: list[Any] = [fill] * len(self.forward)
        for r, v in zip(np.asarray(rows).tolist(), values):
            column[int(r)] = v.item() if hasattr(v, "item") else v
        return column

    @contextlib.contextmanager
    def frozen_model(self):
        """The model with every parameter's ``requires_grad`` off (restored after), so attacks
        and attributions take gradients with respect to pixels only."""
        params = list(self.model.parameters())
        before = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            yield self.model
        finally:
            for p, flag in zip(params, before):
                p.requires_grad_(flag)

    def image_rng(self, name: str, row: int) -> np.random.Generator:
        """A generator for one image, seeded from the run seed, ``name`` and the image's place
        in the data set: its draws do not depend on batch size, shard or which other images
        were chosen."""
        return self.rng(f"{name}:image:{int(self.forward.indices[int(row)])}")

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

    def stratified_rows(self, n: int, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Up to ``n`` rows (of ``rows``, else of all), classes in proportion to the data (at
        least one each), seeded by ``name``; ``n <= 0`` means all of them."""
        pool = np.arange(len(self.forward)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        labels_all = self.forward.labels
        labels = labels_all[pool]
        total = len(labels)
        if n <= 0 or n >= total:
            return pool
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
            members = pool[labels == cls]
            chosen.append(rng.choice(members, size=min(quota, len(members)), replace=False))
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
