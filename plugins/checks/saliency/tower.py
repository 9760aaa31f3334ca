"""Where attributions look inside the image tower: the Grad-CAM layer and the blocks to randomise.

Checks see a :class:`mcaudit.ModelAdapter`, not the network it wraps. Grad-CAM and the model
parameter randomisation test need the layers of the image tower, so this module recognises the
towers that open_clip builds (its VisionTransformer, its ModifiedResNet and timm trunks such as
BiomedCLIP's) through ``adapter.model.visual``. Any other adapter still gets the randomisation
test, over its parameterised layers in reverse order, but no Grad-CAM.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from mcaudit import ZeroShotClassifier


class TokenGrid(nn.Module):
    """Views a transformer's patch tokens as a (N, D, rows, cols) feature map.

    Captum's LayerGradCam averages gradients over the spatial dimensions of a layer's output;
    a token sequence (N, L, D) has none, so the tap exposes the patch tokens, class token and
    any register tokens dropped, in the layout Grad-CAM expects.
    """

    def __init__(self, prefix_tokens: int, grid: tuple[int, int], batch_first: bool = True):
        super().__init__()
        self.prefix_tokens = prefix_tokens
        self.grid = grid
        self.batch_first = batch_first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        patches = tokens[:, self.prefix_tokens :]
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *self.grid)

    def merge(self, tokens: torch.Tensor, grid_map: torch.Tensor) -> torch.Tensor:
        """Rebuild the token sequence from the (unchanged) grid so gradients pass through it."""
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        patches = grid_map.flatten(2).transpose(1, 2)
        merged = torch.cat([tokens[:, : self.prefix_tokens], patches], dim=1)
        return merged if self.batch_first else merged.transpose(0, 1)


@dataclass
class ImageTower:
    """What the saliency check knows about one classifier's image tower."""

    kind: str  # "open_clip ViT", "open_clip ResNet", "timm ViT" or "unknown"
    cam_layer: nn.Module | None = None  # the module whose output Grad-CAM reads
    token_source: nn.Module | None = None  # for transformers: the module the TokenGrid taps
    token_grid: TokenGrid | None = None
    levels: list[tuple[str, list[nn.Parameter]]] = field(default_factory=list)  # top block first
    note: str = ""

    @property
    def has_grad_cam(self) -> bool:
        return self.cam_layer is not None

    @contextlib.contextmanager
    def grad_cam_tap(self) -> Iterator[None]:
        """While open, transformer tokens flow through :attr:`token_grid` (values unchanged)."""
        if self.token_source is None:
            yield
            return
        tap = self.token_grid

        def hook(_module, _inputs, output):
            return tap.merge(output, tap(output))

        handle = self.token_source.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def find_image_tower(classifier: ZeroShotClassifier) -> ImageTower:
    adapter = classifier.adapter
    visual = getattr(getattr(adapter, "model", None), "visual", None)
    if visual is not None:
        resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        trunk = getattr(visual, "trunk", None)
        if resblocks is not None and hasattr(visual, "conv1") and hasattr(visual, "grid_size"):
            return _vit_tower(visual, resblocks)
        if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
            return _resnet_tower(visual)
        if trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
            return _timm_vit_tower(visual, trunk)
    return ImageTower(
        kind="unknown",
        levels=_leaf_levels(adapter),
        note=(
            f"the {type(adapter).__name__} adapter does not expose an open_clip image tower "
            "(adapter.model.visual), so Grad-CAM is skipped and the randomisation test "
            "randomises the adapter's layers in reverse order of definition"
        ),
    )


def _vit_tower(visual: nn.Module, resblocks: nn.Module) -> ImageTower:
    last = resblocks[-1]
    # The class token pools the output of the last block, so the patch tokens leaving it get no
    # gradient; the last block's pre-attention norm is where patch tokens still matter.
    source = getattr(last, "ln_1", last)
    grid = TokenGrid(1, tuple(visual.grid_size), getattr(visual.transformer, "batch_first", True))
    embed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout")
    return ImageTower(
        kind="open_clip ViT", cam_layer=grid, token_source=source, token_grid=grid,
        levels=_levels(visual, "transformer.resblocks", list(resblocks), embed),
    )


def _resnet_tower(visual: nn.Module) -> ImageTower:
    stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    names = ["layer1", "layer2", "layer3", "layer4"]
    embed = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    levels = _levels(visual, None, stages, embed, block_names=names)
    return ImageTower(kind="open_clip ResNet", cam_layer=visual.layer4, levels=levels)


def _timm_vit_tower(visual: nn.Module, trunk: nn.Module) -> ImageTower:
    blocks = list(trunk.blocks)
    last = blocks[-1]
    source = getattr(last, "norm1", last)
    grid_size = tuple(getattr(trunk.patch_embed, "grid_size", ()) or ())
    embed = ("trunk.patch_embed", "trunk.cls_token", "trunk.reg_token", "trunk.pos_embed", "trunk.norm_pre")
    levels = _levels(visual, "trunk.blocks", blocks, embed)
    if len(grid_size) != 2:
        return ImageTower(kind="timm ViT", levels=levels, note="the timm trunk has no fixed patch grid, so Grad-CAM is skipped")
    grid = TokenGrid(int(getattr(trunk, "num_prefix_tokens", 1)), grid_size, True)
    return ImageTower(kind="timm ViT", cam_layer=grid, token_source=source, token_grid=grid, levels=levels)


def _levels(visual, block_prefix, blocks, embed_prefixes, block_names=None):
    """[output head, last block, ..., first block, embedding], each a list of parameters."""
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    head, embed = [], []
    for name, p in visual.named_parameters():
        if id(p) in in_blocks:
            continue
        (embed if name.startswith(embed_prefixes) else head).append(p)
    levels = [("output head", head)] if head else []
    names = block_names or [f"block {i + 1}" for i in range(len(blocks))]
    for name, block in reversed(list(zip(names, blocks))):
        levels.append((name, list(block.parameters())))
    if embed:
        levels.append(("patch embedding" if block_prefix else "stem", embed))
    return [(n, ps) for n, ps in levels if ps]


def _leaf_levels(adapter: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    leaves = [(n, list(m.parameters(recurse=False))) for n, m in adapter.named_modules()]
    return [(n or "adapter", ps) for n, ps in reversed(leaves) if ps]


def detached_copy(classifier: ZeroShotClassifier) -> ZeroShotClassifier:
    """A deep copy whose image tower can be randomised; the text tower is shared, not copied.

    The classifier's class embeddings are fixed buffers, so the text tower takes no part in
    its output; sharing it keeps the copy small for large models.
    """
    memo: dict[int, object] = {}
    # Plain attributes (tokenizer, spec) are read-only for the copy; a tokenizer's vocabulary
    # alone would otherwise dominate the copying time.
    for key, value in vars(classifier.adapter).items():
        if not key.startswith("_") and not isinstance(value, (nn.Module, torch.Tensor)):
            memo[id(value)] = value
    wrapped = getattr(classifier.adapter, "model", None)
    if isinstance(wrapped, nn.Module) and isinstance(getattr(wrapped, "visual", None), nn.Module):
        for name, child in wrapped.named_children():
            if name != "visual":
                memo[id(child)] = child
        for p in wrapped._parameters.values():
            if p is not None:
                memo[id(p)] = p
    return copy.deepcopy(classifier, memo)


@torch.no_grad()
def randomise_parameters(params: list[nn.Parameter], generator: torch.Generator) -> None:
    """Re-draw each tensor from a normal with its own mean and spread, as a fresh initialisation.

    Matching each tensor's scale keeps activations in range, so a map that survives this is
    explained by the architecture and the input, not by overflowing activations.
    """
    for p in params:
        flat = p.detach().float()
        mean = flat.mean()
        std = flat.std(unbiased=False) if p.numel() > 1 else flat.abs().mean()
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        p.copy_((noise.to(p.device) * std + mean).to(p.dtype))
