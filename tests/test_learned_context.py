"""The learned-context (CoOp) text path of the open_clip adapter.

Known answer: when the context equals the word embeddings of a template's words, the
learned-context features must be those of the written prompt ``"<template> <class>."``.
Checked on the three text-tower layouts: open_clip's CLIP (the demo model), CustomTextCLIP
with its own text transformer, and CustomTextCLIP with a Hugging Face BERT tower (the
BiomedCLIP layout, built here from a tiny local BERT config).
"""

from __future__ import annotations

import json

import pytest
import torch

from mcaudit.plugins.loaders.openclip_adapter import OpenClipAdapter
from mcaudit.testing import TINY_MODEL_CFG, demo_prompts

CLASS_NAMES = ["clear lungs", "a focal opacity", "a lung nodule"]
TEMPLATES = ["a chest radiograph showing", "a frontal chest x-ray with", "an x-ray image of"]
WORDS = sorted({w for t in TEMPLATES + CLASS_NAMES for w in t.replace("-", " - ").split()} | {".", "x", "ray"})


def _adapter(model, tokenizer) -> OpenClipAdapter:
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return OpenClipAdapter(model.eval().requires_grad_(False), tokenizer, spec="test", image_size=size,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()


@pytest.fixture(scope="module")
def custom_text_adapter():
    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(3)
    model = CustomTextCLIP(**TINY_MODEL_CFG)
    return _adapter(model, SimpleTokenizer(context_length=TINY_MODEL_CFG["text_cfg"]["context_length"]))


@pytest.fixture(scope="module")
def hf_text_adapter(tmp_path_factory):
    """A CustomTextCLIP with a 2-layer BERT text tower, as BiomedCLIP is laid out."""
    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # a wide init: a random tower whose output still depends clearly on its input words
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=32, initializer_range=0.5).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 32}))
    text_cfg = {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "hf_model_pretrained": False,
                "context_length": 24}
    torch.manual_seed(4)
    model = CustomTextCLIP(embed_dim=16, vision_cfg=TINY_MODEL_CFG["vision_cfg"], text_cfg=text_cfg)
    return _adapter(model, HFTokenizer(str(folder), context_length=24))


@pytest.fixture(params=["clip", "custom_text", "hf_text"])
def adapter(request, mcaudit_demo_model):
    if request.param == "clip":
        return mcaudit_demo_model
    return request.getfixturevalue(f"{request.param}_adapter")


def test_layouts_are_the_ones_named(adapter, request):
    text = getattr(adapter.model, "text", None)
    layout = {None: "clip", "TextTransformer": "custom_text", "HFTextEncoder": "hf_text"}[
        None if text is None else type(text).__name__
    ]
    assert request.node.callspec.params["adapter"] == layout


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_context_reproduces_written_prompt(adapter, template):
    ctx = adapter.token_embeddings(template)
    assert ctx.shape[1] == adapter.text_width
    with torch.no_grad():
        learned = adapter.encode_text_with_context(ctx, CLASS_NAMES)
        written = adapter.encode_text([f"{template} {name}." for name in CLASS_NAMES])
    assert learned.shape == written.shape == (len(CLASS_NAMES), written.shape[1])
    torch.testing.assert_close(learned, written, atol=1e-5, rtol=0)
    # and a different context gives different features (the context is really used)
    with torch.no_grad():
        other = adapter.encode_text_with_context(torch.randn(ctx.shape, generator=torch.Generator().manual_seed(1)), CLASS_NAMES)
    assert (other - written).abs().max() > 1e-2


def test_demo_prompts_reproduced(mcaudit_demo_model):
    prompts = demo_prompts()
    for template in prompts.templates:
        assert template.endswith(" {}.")
        ctx = mcaudit_demo_model.token_embeddings(template[: -len(" {}.")])
        names = [w for c in prompts.classes for w in prompts.phrasings[c]]
        with torch.no_grad():
            learned = mcaudit_demo_model.encode_text_with_context(ctx, names)
            written = mcaudit_demo_model.encode_text([template.format(n) for n in names])
        torch.testing.assert_close(learned, written, atol=1e-5, rtol=0)


def test_context_receives_gradients_and_model_does_not(adapter):
    ctx = torch.randn(8, adapter.text_width, generator=torch.Generator().manual_seed(0)) * 0.02
    ctx.requires_grad_(True)
    feats = adapter.encode_text_with_context(ctx, CLASS_NAMES[:2])
    assert feats.shape[0] == 2
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    (feats[0] @ feats[1]).backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.parameters())


def test_long_class_name_keeps_end_token(adapter):
    long_name = " ".join(["lungs"] * 40)
    ctx = adapter.token_embeddings("an x-ray image of")
    with torch.no_grad():
        learned = adapter.encode_text_with_context(ctx, [long_name])
        written = adapter.encode_text([f"an x-ray image of {long_name}."])
    # both are truncated to the tower's length with the end token kept; the full stop is cut
    assert torch.isfinite(learned).all()
    ids, _ = adapter._spliced_ids([long_name], ctx.shape[0])
    assert adapter._sequence_length(ids[0]) == ids.shape[1]
    assert (learned - written).abs().max() < 1e-5


def test_bad_context_shape_is_refused(adapter):
    with pytest.raises(ValueError, match="shape"):
        adapter.encode_text_with_context(torch.zeros(4, adapter.text_width + 1), CLASS_NAMES)
    with pytest.raises(ValueError, match="fit"):
        adapter.encode_text_with_context(torch.zeros(200, adapter.text_width), CLASS_NAMES)
