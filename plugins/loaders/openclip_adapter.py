"""The adapter over an open_clip model (CLIP or CustomTextCLIP, e.g. BiomedCLIP).

Besides plain prompts it offers the learned-context text path of CoOp: a sequence of free
token embeddings takes the place of a hand-written template, followed by the class name's
own tokens. Three text-tower layouts are supported: open_clip's ``CLIP`` (text transformer
inlined in the model), ``CustomTextCLIP`` with a ``TextTransformer`` and ``CustomTextCLIP``
with a Hugging Face tower (``HFTextEncoder``, the BiomedCLIP layout).

Token sequences are cut after the longest prompt's end token before the text tower runs.
open_clip pads every prompt to the full context (77 tokens for CLIP, 256 for BiomedCLIP)
while medical prompts are about ten tokens long, so this makes text encoding several times
faster. It changes no feature: under CLIP's causal mask no position sees the ones after it,
and a Hugging Face tower masks padding out. Towers where padding does reach the pooled
token (no causal mask, a CoCa class token, last-token pooling) get the full sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from mcaudit.models.adapter import ModelAdapter


class ClipModelAdapter(ModelAdapter):
    """What every CLIP-shaped ``self.model`` (open_clip's and transformers') exposes alike: a
    learned log temperature, and word embeddings whose width is the size of a CoOp context
    vector. Subclasses say where the word embeddings are (``_word_embedding``)."""

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0])

    # -- learned context (CoOp) ------------------------------------------------------------
    @property
    def text_width(self) -> int:
        return int(self._word_embedding().embedding_dim)


class OpenClipAdapter(ClipModelAdapter):
    def __init__(self, model: torch.nn.Module, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = tokenizer

    def _encode_normalized_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts).to(self.device)
        if not self._padding_is_invisible():
            return self.model.encode_text(ids)
        ids = self._trim(ids)
        if self._hf_tower() is not None:
            return self.model.encode_text(ids)  # the tower masks what padding is left itself
        return _text_transformer_from_embeddings(self._text_transformer_parts(), self._word_embedding()(ids), ids)

    # -- learned context (CoOp) ------------------------------------------------------------
    def token_embeddings(self, text: str) -> torch.Tensor:
        """Word embeddings of ``text``'s tokens without start/end tokens, (n_tokens, width).

        Used to start learned context from a template (CoOp's ``ctx_init``), and to check that
        the learned-context path reproduces the plain prompt path.
        """
        ids = self.tokenizer([text])[0]
        length = self._sequence_length(ids)
        inner = ids[1 : length - 1].to(self.device)
        with torch.no_grad():
            return self._word_embedding()(inner).detach().clone()

    def encode_text_with_context(self, context: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """Features of ``[start] context <class name>. [end]``, one per class, L2-normalised.

        The class name is followed by a full stop, as in CoOp, so a context equal to the
        word embeddings of ``"a photo of"`` gives the features of ``"a photo of <class>."``.
        """
        if context.ndim != 2 or context.shape[1] != self.text_width:
            raise ValueError(f"context must have shape (n_ctx, {self.text_width}), got {tuple(context.shape)}")
        ids, ctx_slice = self._spliced_ids(class_names, context.shape[0])
        if self._padding_is_invisible():
            ids = self._trim(ids)
        words = self._word_embedding()(ids)
        ctx = context.to(device=words.device, dtype=words.dtype).unsqueeze(0).expand(len(class_names), -1, -1)
        # Rebuild the sequence instead of writing in place, so gradients reach ``context``.
        embeds = torch.cat([words[:, : ctx_slice.start], ctx, words[:, ctx_slice.stop :]], dim=1)
        hf = self._hf_tower()
        if hf is not None:
            feats = _hf_tower_from_embeddings(hf, embeds, ids)
        else:
            feats = _text_transformer_from_embeddings(self._text_transformer_parts(), embeds, ids)
        return nn.functional.normalize(feats.float(), dim=-1)

    # -- helpers -----------------------------------------------------------------------------
    def _word_embedding(self) -> nn.Embedding:
        text = getattr(self.model, "text", None)
        if text is None:
            return self.model.token_embedding  # CLIP: the text tower is inlined in the model
        if _is_hf_tower(text):
            return text.transformer.get_input_embeddings()
        return text.token_embedding

    def _pad_id(self) -> int:
        hf = getattr(self.tokenizer, "tokenizer", None)
        pad = getattr(hf, "pad_token_id", None)
        return int(pad) if pad is not None else 0  # open_clip's SimpleTokenizer pads with 0

    def _sequence_length(self, ids: torch.Tensor) -> int:
        """Tokens up to and including the end token (the last one that is not padding)."""
        real = torch.nonzero(ids != self._pad_id()).flatten()
        return int(real[-1]) + 1 if len(real) else 0

    def _hf_tower(self) -> nn.Module | None:
        text = getattr(self.model, "text", None)
        return text if text is not None and _is_hf_tower(text) else None

    def _padding_is_invisible(self) -> bool:
        """Whether padding after the last end token can change no pooled text feature, so the
        sequence may be cut there: a Hugging Face tower masks it, a causal CLIP tower never
        looks ahead (unless a class token or last-token pooling reads the end)."""
        if self._hf_tower() is not None:
            return True
        p = self._text_transformer_parts()
        return (p.attn_mask is not None and p.cls_emb is None and not p.use_pad_mask
                and p.pool_type in ("argmax", "eos", "first"))

    def _trim(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` cut after the last token that is not padding in any row."""
        positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
        longest = int(((ids != self._pad_id()) * positions).max()) if ids.numel() else 0
        return ids[:, : max(longest, 1)]

    def _spliced_ids(self, class_names: list[str], n_ctx: int) -> tuple[torch.Tensor, slice]:
        """Token ids of ``[start] X*n_ctx <name>. [end] pad...`` and where the X's are.

        The X's take the start token's id: it is neither padding (masks stay right) nor the
        end token, and it is below the end token, so open_clip's argmax pooling still finds
        the end token.
        """
        raw = self.tokenizer([f"{name}." for name in class_names])
        context_length = raw.shape[1]
        if n_ctx + 2 > context_length:
            raise ValueError(f"{n_ctx} context tokens do not fit the text tower's {context_length} positions")
        pad = self._pad_id()
        out = torch.full_like(raw, pad)
        for i, ids in enumerate(raw):
            length = self._sequence_length(ids)
            start, body, end = ids[:1], ids[1 : length - 1], ids[length - 1 : length]
            body = body[: context_length - 2 - n_ctx]  # keep the end token when it is too long
            seq = torch.cat([start, start.repeat(n_ctx), body, end])
            out[i, : len(seq)] = seq
        return out.to(self.device), slice(1, 1 + n_ctx)

    def _text_transformer_parts(self) -> "_TextParts":
        text = getattr(self.model, "text", None)
        if text is None:
            m = self.model
            return _TextParts(m.positional_embedding, m.transformer, m.ln_final, m.text_projection,
                              m.attn_mask, m.text_pool_type, getattr(m, "text_eos_id", None), None, False, None)
        return _TextParts(text.positional_embedding, text.transformer, text.ln_final, text.text_projection,
                          text.attn_mask, text.pool_type, getattr(text, "eos_id", None), text.cls_emb,
                          bool(getattr(text, "use_pad_mask", False)), text)


class _TextParts:
    """The pieces of an open_clip text transformer, wherever the model keeps them."""

    def __init__(self, positional_embedding, transformer, ln_final, text_projection, attn_mask,
                 pool_type, eos_id, cls_emb, use_pad_mask, tower):
        self.positional_embedding = positional_embedding
        self.transformer = transformer
        self.ln_final = ln_final
        self.text_projection = text_projection
        self.attn_mask = attn_mask
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.cls_emb = cls_emb
        self.use_pad_mask = use_pad_mask
        self.tower = tower


def _is_hf_tower(text: nn.Module) -> bool:
    return type(text).__name__ == "HFTextEncoder"



def _text_transformer_from_embeddings(p: _TextParts, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's text forward (TextTransformer.forward / CLIP.encode_text) from embeddings."""
    from open_clip.transformer import text_global_pool

    cast_dtype = p.transformer.get_cast_dtype()
    x = x.to(cast_dtype)
    seq_len = x.shape[1]
    if p.cls_emb is not None:  # CoCa-style towers append a class token
        x = torch.cat([x, p.cls_emb.to(cast_dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)], dim=1)
        seq_len += 1
    attn_mask = p.attn_mask
    if attn_mask is not None and attn_mask.shape[-1] > seq_len:
        attn_mask = attn_mask[:seq_len, :seq_len]  # the sequence was cut after its end tokens
    if p.tower is not None and (p.use_pad_mask or p.cls_emb is not None):
        add_mask = p.tower._build_additive_mask(ids, seq_len, x.dtype)
        attn_mask = add_mask if attn_mask is None else attn_mask[:seq_len, :seq_len].unsqueeze(0) + add_mask
    x = x + p.positional_embedding[:seq_len].to(cast_dtype)
    x = p.transformer(x, attn_mask=attn_mask)
    if p.cls_emb is not None:
        pooled = p.ln_final(text_global_pool(x, pool_type="last"))
    else:
        pooled = text_global_pool(p.ln_final(x), ids, p.pool_type, eos_token_id=p.eos_id)
    if p.text_projection is not None:
        if isinstance(p.text_projection, nn.Linear):
            pooled = p.text_projection(pooled)
        else:
            pooled = pooled @ p.text_projection
    return pooled


def _hf_tower_from_embeddings(text: nn.Module, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's HFTextEncoder.forward with word embeddings given instead of token ids."""
    attn_mask = (ids != text.config.pad_token_id).long()
    out = text.transformer(inputs_embeds=embeds, attention_mask=attn_mask)
    return text.proj(text.pooler(out, attn_mask))
