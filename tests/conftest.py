"""Shared test settings. mcaudit's own fixtures come from the mcaudit.testing pytest plugin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MCAUDIT_SHARED_DATA", REPO.parent / "shared" / "data"))

# Two cores on CI: with pytest-xdist workers, one intra-op thread each avoids oversubscription.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _no_entry_point_plugins(monkeypatch):
    # Tests must not depend on whatever plugins happen to be installed in the environment.
    monkeypatch.setenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD", "1")


def shared(path: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / path
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


NETWORK_ATTEMPTS: list = []


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network, and an empty Hugging Face cache instead of the developer's own."""
    import socket

    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        NETWORK_ATTEMPTS.append(args)
        raise RuntimeError(f"a test tried to reach the network: {args}")

    NETWORK_ATTEMPTS.clear()
    # Name lookup comes first (and fails quietly without a network), so refuse both.
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def put_in_hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face cache entry for ``repo_id`` holding the files of ``source``."""
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)
    return snapshot


PNEUMONIA_PROMPTS = """
templates = ["a paediatric chest x-ray showing {}.", "a chest radiograph with {}."]
[classes]
normal = ["clear lungs", "no pneumonia"]
pneumonia = ["pneumonia", "lung consolidation"]
"""


def train_pneumonia_clip(npz_path, steps: int = 160, balanced: bool = False):
    """The tiny open_clip model fine-tuned on PneumoniaMNIST's train split with the zero-shot
    objective: 96 images a step, drawn at random, or 48 per class when ``balanced`` (so that
    both classes are learned well enough for a recall floor)."""
    import numpy as np

    from mcaudit.plugins.loaders.openclip import make_tokenizer
    from mcaudit.testing import TINY_MODEL_CFG, tiny_openclip

    torch.manual_seed(0)
    data = np.load(npz_path)
    images = torch.as_tensor(data["train_images"], dtype=torch.float32).unsqueeze(1) / 255.0
    labels = torch.as_tensor(data["train_labels"].reshape(-1), dtype=torch.long)
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    model = tiny_openclip(0).train()
    tokens = make_tokenizer(TINY_MODEL_CFG, None)(
        ["a paediatric chest x-ray showing clear lungs.", "a paediatric chest x-ray showing pneumonia."])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    by_class = [torch.nonzero(labels == k).flatten() for k in (0, 1)]
    for _ in range(steps):
        if balanced:
            idx = torch.cat([c[torch.randint(0, len(c), (48,), generator=gen)] for c in by_class])
        else:
            idx = torch.randint(0, len(images), (96,), generator=gen)
        x = (images[idx].expand(-1, 3, -1, -1) - 0.5) / 0.25
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        loss = torch.nn.functional.cross_entropy(model.logit_scale.exp() * img @ txt.T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
