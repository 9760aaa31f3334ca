"""The helpers AuditContext gives every check, built-in or third-party."""

from __future__ import annotations

import numpy as np
import torch


def test_context_helpers(mcaudit_demo_model, mcaudit_phantoms, mcaudit_context):
    ctx = mcaudit_context(mcaudit_demo_model, mcaudit_phantoms(n=40, image_size=mcaudit_demo_model.image_size))
    # Stratified within given rows: only those rows, both classes, seeded.
    pool = np.arange(0, 40, 2)
    picked = ctx.stratified_rows(6, "t", rows=pool)
    assert len(picked) == 6 and set(picked) <= set(pool)
    assert set(ctx.forward.labels[picked]) == set(ctx.forward.labels[pool])
    assert np.array_equal(picked, ctx.stratified_rows(6, "t", rows=pool[::-1]))
    assert np.array_equal(ctx.stratified_rows(0, "t", rows=pool), pool)
    # A samples.csv column: values at the rows, empty elsewhere.
    column = ctx.per_image([2, 5], np.array([0.25, 0.75], dtype=np.float32))
    assert len(column) == 40 and column[2] == 0.25 and column[5] == 0.75 and column[0] is None
    # Frozen parameters inside, restored after.
    first = next(mcaudit_demo_model.parameters())
    first.requires_grad_(True)
    try:
        with ctx.frozen_model() as model:
            assert not any(p.requires_grad for p in model.parameters())
        assert first.requires_grad
    finally:
        first.requires_grad_(False)  # the demo model is shared by the whole session
    # Per-image generators depend on the image, not on what else was drawn before.
    a = ctx.image_rng("noise", 7).random(3)
    ctx.rng("noise").random(100)
    assert np.array_equal(a, ctx.image_rng("noise", 7).random(3))
    assert not np.array_equal(a, ctx.image_rng("noise", 8).random(3))
    # Encoding a data set through the shared path gives the shared pass's outputs.
    again = ctx.encode(ctx.dataset)
    assert torch.allclose(again.logits, ctx.forward.logits, atol=1e-6)
    assert ctx.ood is None and ctx.reference is None
