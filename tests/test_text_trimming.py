"""Prompts are cut after the longest end token before the text tower runs.

The features must equal open_clip's own ``encode_text`` on the full padded sequence for
every open_clip text layout, and the cut must really happen where it is safe (that is the
point: CLIP's 77 positions against ten-token prompts) and not where padding is visible.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mcaudit.plugins.loaders.openclip_adapter import OpenClipAdapter
from mcaudit.plugins.loaders.openclip import make_tokenizer
from mcaudit.testing import TINY_MODEL_CFG, tiny_openclip

PROMPTS = [
    "a photo of normal.",
    "a chest x-ray with a large right lower lobe opacity and a small pleural effusion.",
    "scan",
]


def with_text(**text_cfg):
    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg["text_cfg"].update(context_length=32, **text_cfg)
    return cfg


def custom(cfg):
    return {**cfg, "custom_text": True}


LAYOUTS = {
    # name: (model config, whether the sequence may be cut)
    "clip": (with_text(), True),
    "custom-text transformer": (custom(with_text()), True),
    "eos pooling": (custom(with_text(pool_type="eos", eos_id=49407)), True),
    "no causal mask, last-token pooling (SigLIP-like)": (custom(with_text(no_causal_mask=True, pool_type="last")), False),
    "padding mask with argmax pooling": (custom(with_text(pad_id=0, no_causal_mask=True, pool_type="argmax")), False),
}


def adapter_for(cfg):
    model = tiny_openclip(3, cfg)
    return OpenClipAdapter(model, make_tokenizer(cfg, None), spec="tiny", image_size=(32, 32),
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()


def tower_lengths(adapter):
    """Sequence lengths the text transformer is run on, recorded by a forward hook."""
    text = getattr(adapter.model, "text", None)
    transformer = text.transformer if text is not None else adapter.model.transformer
    seen = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        seen.append(x.shape[1] if getattr(module, "batch_first", True) else x.shape[0])

    return seen, transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cut_prompts_give_open_clips_features(layout):
    cfg, may_cut = LAYOUTS[layout]
    adapter = adapter_for(cfg)
    tokens = adapter.tokenizer(PROMPTS)
    with torch.no_grad():
        reference = F.normalize(adapter.model.encode_text(tokens).float(), dim=-1)
        seen, handle = tower_lengths(adapter)
        ours = adapter.encode_text(PROMPTS)
        handle.remove()
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    longest = int((tokens != 0).sum(dim=1).max())
    assert 10 < longest < tokens.shape[1]
    assert seen == [longest if may_cut else tokens.shape[1]]


def test_learned_context_is_cut_too_and_still_matches_the_written_prompt():
    adapter = adapter_for(LAYOUTS["clip"][0])
    names = ["normal", "pleural effusion"]
    with torch.no_grad():
        seen, handle = tower_lengths(adapter)
        learned = adapter.encode_text_with_context(adapter.token_embeddings("a photo of"), names)
        handle.remove()
        written = F.normalize(adapter.model.encode_text(adapter.tokenizer([f"a photo of {n}." for n in names])).float(), dim=-1)
    assert torch.allclose(learned, written, atol=1e-5)
    # [start] a photo of pleural effusion . [end]
    assert seen == [len(adapter.tokenizer(["a photo of pleural effusion."])[0].nonzero())]


def test_gradients_reach_the_context_through_the_cut_sequence():
    adapter = adapter_for(LAYOUTS["custom-text transformer"][0])
    ctx = adapter.token_embeddings("a photo of").requires_grad_(True)
    adapter.encode_text_with_context(ctx, ["normal", "opacity"]).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
