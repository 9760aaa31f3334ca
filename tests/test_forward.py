"""The shared forward pass under mixed precision: the encoder runs in bf16, the scores do not."""

from __future__ import annotations

import torch

from mcaudit.forward import run_forward
from mcaudit.testing import demo_prompts, phantom_dataset


def test_bf16_autocast_encodes_in_bf16_but_scores_in_fp32(mcaudit_demo_model):
    model = mcaudit_demo_model
    data = phantom_dataset(24, image_size=model.image_size)
    with torch.inference_mode():
        text = model.class_text_features(demo_prompts().class_prompts(data.classes)).float()
    full = run_forward(model, data, text, batch_size=8)
    half = run_forward(model, data, text, batch_size=8, precision="bf16")
    # the encoder ran in bf16: its features differ from fp32 by more than float noise ...
    assert (half.image_features - full.image_features).abs().max() > 1e-4
    assert torch.nn.functional.cosine_similarity(half.image_features, full.image_features).min() > 0.99
    # ... but the logits are the fp32 product of the features stored, not a bf16 one
    expected = model.logit_scale * half.image_features @ text.T
    torch.testing.assert_close(half.logits, expected, atol=1e-5, rtol=1e-6)
