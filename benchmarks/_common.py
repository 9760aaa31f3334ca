"""Shared pieces of the benchmarks: the machine description and the data they run on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def write_phantom_manifest(folder: Path, n: int, seed: int = 7, size: int = 224) -> Path:
    """n phantom PNGs at ``size`` px and a manifest, so both sides decode the same files."""
    from mcaudit.demo.phantoms import render_phantom

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,site,sex"]
    for i in range(n):
        img, attrs = render_phantom(seed, i)
        big = Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        big.save(folder / f"{i:05d}.png")
        rows.append(f"{i:05d}.png,{['normal', 'opacity'][attrs['label']]},{attrs['site']},{attrs['sex']}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"
