"""torchrun with the gloo backend: sharded forward pass, same metrics as one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcaudit.distributed import World, shard
from mcaudit.forward import encode_with_backoff
from mcaudit.testing import run_cli, run_torchrun


def test_shards_cover_every_item_once():
    items = np.arange(11)
    parts = [shard(items, World(r, 3)) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == items.tolist()
    assert [len(p) for p in parts] == [4, 3, 4] or max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_out_of_memory_halves_the_batch(mcaudit_demo_model, monkeypatch):
    pixels = torch.rand(12, 3, 64, 64)
    expected = mcaudit_demo_model.encode_image(pixels)
    sizes = []
    original = type(mcaudit_demo_model).encode_image

    def flaky(self, x):
        sizes.append(len(x))
        if len(x) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, x)

    monkeypatch.setattr(type(mcaudit_demo_model), "encode_image", flaky)
    got = encode_with_backoff(mcaudit_demo_model, pixels)
    assert torch.allclose(got, expected, atol=1e-6)
    assert sizes[0] == 12 and max(s for s in sizes if s <= 3) == 3


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    args = ["--quiet", "--model", "demo", "--data", "phantom:n=50", "--checks", "performance", "--seed", "5"]
    single = run_cli(["run", *args], tmp_path / "single")
    assert single.exit_code == 0, single.output
    multi = run_torchrun(args, tmp_path / "multi")
    assert multi["environment"]["world_size"] == 2
    assert multi["checks"]["performance"]["metrics"] == single.results["checks"]["performance"]["metrics"]
    assert multi["checks"]["performance"]["intervals"] == single.results["checks"]["performance"]["intervals"]
    assert (tmp_path / "multi" / "samples.csv").read_text() == (single.out_dir / "samples.csv").read_text()
