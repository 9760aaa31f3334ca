"""A third-party model loader: MedCLIP (Wang et al., EMNLP 2022) as an mcaudit plugin.

MedCLIP is its own package (``pip install medclip``) with its own model classes, so neither
built-in loader reads it. This module claims ``medclip:vit`` and ``medclip:resnet`` specs
through the ``mcaudit_load_model`` hook and wraps the model in a ``ModelAdapter``::

    mcaudit run -p examples/medclip_loader_plugin.py \\
        --model medclip:vit --checkpoint medclip-vit/pytorch_model.bin --data manifest.csv

``--checkpoint`` is the ``pytorch_model.bin`` of the released MedCLIP weights (unzipped).
It is read with ``weights_only=True`` and loaded strictly. MedCLIP builds its towers from
Bio_ClinicalBERT (and swin-tiny for the ViT variant) through transformers, so those must be
in the local Hugging Face cache unless ``--allow-network`` is given.

Only ``mcaudit_load_model`` and ``mcaudit_register_model_loaders`` are needed; everything
else (checks, reports) works on the adapter unchanged.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

from mcaudit import InputError, LoaderInfo, ModelAdapter, hookimpl
from mcaudit.models.checkpoints import load_into, read_state_dict, sha256_file
from mcaudit.plugins.loaders.openclip import cache_entry, cached_snapshot

VARIANTS = ("vit", "resnet")
# ITU-R 601 luma, what PIL's convert("L") uses: MedCLIP's processor makes every image grey.
LUMA = (0.299, 0.587, 0.114)


@hookimpl
def mcaudit_register_model_loaders(register):
    register(LoaderInfo(
        "medclip",
        ("medclip:vit --checkpoint pytorch_model.bin", "medclip:resnet --checkpoint pytorch_model.bin"),
        "MedCLIP (pip install medclip): Swin-T or ResNet-50 image tower, Bio_ClinicalBERT text tower",
    ))


@hookimpl
def mcaudit_load_model(spec: str, request):
    if not spec.startswith("medclip:"):
        return None
    variant = spec[len("medclip:"):]
    if variant not in VARIANTS:
        raise InputError(f"--model {spec}: MedCLIP comes as medclip:vit or medclip:resnet")
    try:
        import medclip
        from medclip import constants
    except ImportError as exc:
        raise InputError(f"--model {spec}: the MedCLIP package is not installed; pip install medclip ({exc})") from exc
    if request.checkpoint is None:
        raise InputError(
            f"--model {spec}: pass the MedCLIP weights with --checkpoint .../pytorch_model.bin "
            f"(from the unzipped MedCLIP release)"
        )
    if not request.allow_network:
        _require_cached_towers(spec, variant, constants)

    vision_cls = medclip.MedCLIPVisionModelViT if variant == "vit" else medclip.MedCLIPVisionModel
    model = medclip.MedCLIPModel(vision_cls=vision_cls)
    load_into(model, read_state_dict(request.checkpoint), str(request.checkpoint))
    model.eval().requires_grad_(False)
    size = int(constants.IMG_SIZE)
    adapter = MedCLIPAdapter(
        model,
        spec=spec,
        image_size=(size, size),
        mean=(float(constants.IMG_MEAN),) * 3,
        std=(float(constants.IMG_STD),) * 3,
        weights_sha256=sha256_file(Path(request.checkpoint)),
        loader="medclip",
    )
    return adapter.to(request.device)


def _require_cached_towers(spec: str, variant: str, constants) -> None:
    """MedCLIP's constructor downloads its base towers; refuse before it tries, offline."""
    repos = [constants.BERT_TYPE] + ([constants.VIT_TYPE] if variant == "vit" else [])
    missing = [repo for repo in repos if cached_snapshot(repo) is None]
    if missing:
        where = "; ".join(str(cache_entry(repo)) for repo in missing)
        raise InputError(
            f"--model {spec}: MedCLIP builds on {', '.join(missing)}, not in the Hugging Face cache "
            f"(looked for {where}); run once with --allow-network or `hf download {missing[0]}`"
        )
    if variant == "resnet":
        # torchvision's ImageNet ResNet-50, which MedCLIP's ResNet tower starts from.
        checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
        if not glob.glob(os.path.join(checkpoints, "resnet50-*.pth")):
            raise InputError(
                f"--model {spec}: torchvision's ResNet-50 weights are not in {checkpoints}; "
                f"run once with --allow-network"
            )


class MedCLIPAdapter(ModelAdapter):
    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = model.text_model.tokenizer
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1))

    def _encode_normalized_image(self, images: torch.Tensor) -> torch.Tensor:
        # Normalisation is the same on every channel, so taking luma after it equals
        # MedCLIP's grey conversion before it.
        grey = (images * self.luma.to(images.dtype)).sum(dim=1, keepdim=True)
        return self.model.vision_model(pixel_values=grey.repeat(1, 3, 1, 1))

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        # MedCLIPModel.encode_text moves inputs to CUDA; the text tower itself does not.
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return self.model.text_model(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))

    @property
    def logit_scale(self) -> float:
        # MedCLIP clamps the log-temperature to [0, ln 100] when it computes logits.
        return float(self.model.logit_scale.detach().clamp(0, 4.6052).exp())
