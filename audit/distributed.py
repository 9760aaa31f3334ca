"""Running one audit across processes with torchrun.

``torchrun --nproc_per_node N -m mcaudit run ...`` starts N copies; each reads the
``RANK``/``WORLD_SIZE`` variables torchrun sets. Images are sharded contiguously with no
duplicates, per-image outputs are all-gathered so that every rank holds the whole forward
pass, expensive checks split their subsamples with :func:`shard` and combine with
:func:`gather_rows`, and only rank 0 writes outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def init_from_env(device: torch.device) -> World:
    """Join the process group torchrun set up; a single process when not under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """With several GPUs on a node, rank r uses cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shard(items: np.ndarray | list, world: World) -> np.ndarray:
    """The contiguous slice of ``items`` this rank handles; slices differ by at most one item."""
    items = np.asarray(items)
    if not world.active:
        return items
    bounds = np.linspace(0, len(items), world.size + 1).round().astype(int)
    return items[bounds[world.rank] : bounds[world.rank + 1]]


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    if not world.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(rows: np.ndarray, values: dict[str, Any], world: World) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Concatenate per-row results from every rank, sorted by row."""
    parts = all_gather_objects((np.asarray(rows), {k: np.asarray(v) for k, v in values.items()}), world)
    all_rows = np.concatenate([p[0] for p in parts])
    order = np.argsort(all_rows, kind="stable")
    merged = {k: np.concatenate([p[1][k] for p in parts])[order] for k in values}
    return all_rows[order], merged


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()


def shutdown(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
