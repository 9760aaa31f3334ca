"""Built-in loader for open_clip models (and the embedded demo model).

Spec forms:

* ``ARCH --checkpoint FILE``: an open_clip architecture name (``ViT-B-16``) with weights.
* ``path/to/arch.json --checkpoint FILE``: a custom architecture, as open_clip's model configs.
* ``path/to/folder``: a folder holding ``open_clip_config.json`` and weights
  (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), the layout in which
  BiomedCLIP and QuiltNet are published on the Hugging Face hub.
* ``hf-hub:org/name``: the same layout served from the local Hugging Face cache; the network
  is used only with ``--allow-network``.
* ``demo``: the tiny model that ships inside mcaudit.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mcaudit.errors import InputError
from mcaudit.hookimpl import hookimpl
from mcaudit.models.adapter import ModelAdapter
from mcaudit.models.openclip_adapter import OpenClipAdapter
from mcaudit.models.checkpoints import WEIGHT_SUFFIXES, load_into, read_state_dict, sha256_file
from mcaudit.registry import LoaderInfo, ModelRequest

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DIR_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


@hookimpl
def mcaudit_register_model_loaders(register):
    register(
        LoaderInfo(
            "openclip",
            (
                "ARCH --checkpoint FILE",
                "arch.json --checkpoint FILE",
                "FOLDER (open_clip_config.json + weights)",
                "hf-hub:ORG/NAME (local cache; --allow-network to download)",
                "demo",
            ),
            "open_clip models: built-in architectures, custom configs, hub folders",
        )
    )


@hookimpl
def mcaudit_load_model(spec: str, request: ModelRequest) -> ModelAdapter | None:
    resolved = _resolve(spec, request)
    if resolved is None:
        return None
    model_cfg, preprocess_cfg, weights, tokenizer_dir = resolved
    if weights is None:
        raise InputError(
            f"--model {spec}: no weights given; pass --checkpoint FILE "
            f"(.safetensors, .pt, .pth or .bin)"
        )
    model = build_model(model_cfg, tokenizer_dir)
    load_into(model, read_state_dict(weights), str(weights))
    model.eval().requires_grad_(False)
    tokenizer = make_tokenizer(model_cfg, tokenizer_dir)
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    adapter = OpenClipAdapter(
        model,
        tokenizer,
        spec=spec,
        image_size=size,
        mean=tuple(preprocess_cfg.get("mean") or OPENAI_MEAN),
        std=tuple(preprocess_cfg.get("std") or OPENAI_STD),
        weights_sha256=sha256_file(weights),
        loader="openclip",
    )
    return adapter.to(request.device)


def _resolve(spec: str, request: ModelRequest):
    """(model_cfg, preprocess_cfg, weights path, folder with tokenizer files) or None."""
    if spec == "demo":
        folder = Path(str(resources.files("mcaudit.demo")))
        return _from_folder(folder, spec, request.checkpoint)
    if spec.startswith("hf-hub:"):
        folder = hub_folder(spec[len("hf-hub:"):], request.allow_network)
        return _from_folder(folder, spec, request.checkpoint)
    if ":" in spec.split("/")[0] and not Path(spec).exists():
        return None  # another loader's scheme (medclip:, transformers:, ...)
    path = Path(spec)
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            return None  # maybe a transformers folder: let other loaders look
        return _from_folder(path, spec, request.checkpoint)
    if spec.endswith(".json"):
        if not path.is_file():
            raise InputError(f"--model {spec}: no such architecture file")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"--model {spec}: not valid JSON ({exc})") from exc
        cfg = cfg.get("model_cfg", cfg)
        _check_cfg(cfg, spec)
        return cfg, {}, request.checkpoint, None
    import open_clip

    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        if os.sep in spec or Path(spec).suffix:
            raise InputError(f"--model {spec}: no such file or folder")
        return None
    return copy.deepcopy(cfg), {}, request.checkpoint, None


def _from_folder(folder: Path, spec: str, checkpoint: Path | None):
    cfg_path = folder / "open_clip_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"--model {spec}: {cfg_path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--model {spec}: {cfg_path} is not valid JSON ({exc})") from exc
    if "model_cfg" not in config:
        raise InputError(f"--model {spec}: {cfg_path} has no model_cfg")
    _check_cfg(config["model_cfg"], spec)
    weights = checkpoint
    if weights is None:
        weights = next((folder / n for n in DIR_WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        raise InputError(
            f"--model {spec}: no weights in {folder} (looked for {', '.join(DIR_WEIGHT_NAMES)}"
            + (f"; found {', '.join(found)}: pass one with --checkpoint" if found else "")
            + ")"
        )
    return copy.deepcopy(config["model_cfg"]), config.get("preprocess_cfg", {}), weights, folder


def _check_cfg(cfg: Any, spec: str) -> None:
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise InputError(f"--model {spec}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")


def hub_folder(repo_id: str, allow_network: bool) -> Path:
    """The local snapshot folder of a hub repository, downloading only when allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=not allow_network))
    except Exception as exc:  # noqa: BLE001 - hub errors vary by version; all mean "not here"
        how = (
            "download it once with network access (mcaudit run --allow-network ...) or "
            "`huggingface-cli download " + repo_id + "`, or pass the downloaded folder as --model"
        )
        raise InputError(
            f"--model hf-hub:{repo_id}: not found in the Hugging Face cache at {HF_HUB_CACHE} "
            f"(HF_HUB_CACHE/HF_HOME set where it looks); {how} [{type(exc).__name__}]"
        ) from exc


def build_model(model_cfg: dict[str, Any], folder: Path | None) -> torch.nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        # Never fetch base tower weights: the checkpoint provides all of them.
        text_cfg["hf_model_pretrained"] = False
        if folder is not None and (folder / "config.json").is_file():
            text_cfg["hf_model_name"] = str(folder)
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or hf_text
    cls = CustomTextCLIP if custom else CLIP
    try:
        return cls(**cfg)
    except (TypeError, KeyError, ValueError) as exc:
        raise InputError(f"model config does not build an open_clip model: {exc}") from exc
    except OSError as exc:
        raise InputError(f"model config names files that are not available offline: {exc}") from exc


def make_tokenizer(model_cfg: dict[str, Any], folder: Path | None):
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:
        source = str(folder) if folder is not None and _has_tokenizer_files(folder) else hf_name
        try:
            return HFTokenizer(source, context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))
        except OSError as exc:
            raise InputError(
                f"tokenizer {hf_name}: not available offline; put its files (vocab.txt or "
                f"tokenizer.json) in the model folder ({exc})"
            ) from exc
    return SimpleTokenizer(context_length=context_length)


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
