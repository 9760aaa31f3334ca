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
