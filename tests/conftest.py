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
