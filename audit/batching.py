"""Batches that survive running out of GPU memory.

A batch size that fits the shared forward pass can be too large for a backward pass through
the same model (attacks, attributions). Instead of failing the check, a batch that raises a
CUDA out-of-memory error is split in half and each half retried, down to single images.
"""

from __future__ import annotations

from typing import Callable

import torch


def with_backoff(fn: Callable[[slice], torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """``fn(slice(start, stop))``; on out-of-memory, the two halves, concatenated."""
    try:
        return fn(slice(start, stop))
    except torch.OutOfMemoryError:
        if stop - start <= 1:
            raise
    # Retry outside the except clause: while it runs, the traceback keeps the failed attempt's
    # activations alive, and the halves would run out of memory on their account.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    middle = (start + stop) // 2
    return torch.cat([with_backoff(fn, start, middle), with_backoff(fn, middle, stop)])


def in_batches(fn: Callable[[slice], torch.Tensor], n: int, batch_size: int) -> torch.Tensor:
    """``fn`` over ``range(n)`` in slices of ``batch_size``, concatenated along the first axis."""
    if n == 0:
        return fn(slice(0, 0))
    return torch.cat([with_backoff(fn, start, min(start + batch_size, n)) for start in range(0, n, batch_size)])
