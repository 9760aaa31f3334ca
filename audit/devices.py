"""Device and precision choices shared by the forward pass and the checks."""

from __future__ import annotations

import contextlib

import torch

from mcaudit.errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name}: not a device (use auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name}: not supported (use auto, cpu, cuda, cuda:N or mps)")
    return device


def full_precision(device: torch.device):
    """Autocast off: scores computed from encoder outputs stay fp32 under a bf16/fp16 pass."""
    return torch.autocast(device_type=device.type, enabled=False)


def autocast(device: torch.device, precision: str):
    """Mixed precision for bf16/fp16; weights stay fp32 so gradients stay well-behaved."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
