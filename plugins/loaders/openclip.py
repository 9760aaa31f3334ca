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

A Hugging Face text tower (``text_cfg.hf_model_name``, the BiomedCLIP layout) and its
tokenizer (``hf_tokenizer_name``) are resolved to local files before open_clip sees them:
the model folder, a local folder of that name, then the Hugging Face cache; the hub is
asked only with ``--allow-network``. Only the tower's config and tokenizer are needed:
the checkpoint holds every weight.
"""

from __future__ import annotations

import copy
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mcaudit.errors import InputError
from mcaudit.hookimpl import hookimpl
from mcaudit.models.adapter import ModelAdapter
from mcaudit.plugins.loaders.openclip_adapter import OpenClipAdapter
from mcaudit.models.preprocessing import open_clip_preprocessing
from mcaudit.models.checkpoints import WEIGHT_SUFFIXES, load_into, read_state_dict, sha256_file
from mcaudit.hook_types import LoaderInfo, ModelRequest

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
            "open_clip models: BiomedCLIP and QuiltNet as published, built-in or custom architectures with fine-tuned checkpoints",
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
    model = build_model(model_cfg, tokenizer_dir, allow_network=request.allow_network)
    load_into(model, read_state_dict(weights), str(weights))
    model.eval().requires_grad_(False)
    tokenizer = make_tokenizer(model_cfg, tokenizer_dir, allow_network=request.allow_network)
    size = model.visual.image_size
    pixel_transform = open_clip_preprocessing(size, preprocess_cfg)
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
        pixel_transform=pixel_transform,
    )
    if tokenizer_dir is not None and (tokenizer_dir / "prompts.toml").is_file():
        adapter.default_prompts = tokenizer_dir / "prompts.toml"
    return adapter.to(request.device)


def _resolve(spec: str, request: ModelRequest):
    """(model_cfg, preprocess_cfg, weights path, folder with tokenizer files) or None."""
    if spec == "demo":
        folder = Path(str(resources.files("mcaudit.demo")))
        return _from_folder(folder, spec, request.checkpoint)
    if spec.startswith("hf-hub:"):
        repo_id = spec[len("hf-hub:"):]
        folder = hub_folder(repo_id, request.allow_network, allow_patterns=HUB_MODEL_FILES)
        if not (folder / "open_clip_config.json").is_file() and _is_transformers_clip(folder):
            raise InputError(
                f"--model {spec}: this repository holds a transformers CLIPModel, not an open_clip "
                f"model; use --model {repo_id} (needs pip install \"mcaudit[hf]\")"
            )
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
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        raise InputError(
            f"--model {spec}: this is a weights file; name the architecture with --model "
            f"(e.g. ViT-B-16) and pass the file with --checkpoint"
        )
    import open_clip

    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        if HUB_ID.fullmatch(spec) and Path(spec).suffix not in WEIGHT_SUFFIXES:
            return None  # ORG/NAME: a hub id for the transformers loader
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


# A repository id on the Hugging Face hub: ``org/name``.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a model needs from a hub repository; example images and notebooks are left behind.
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.bin", "*.pth", "*.pt", "*.txt", "*.model"]
# What a Hugging Face text tower needs when the checkpoint holds its weights.
TEXT_TOWER_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt", "*.model"]
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time.

    huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HOME`` once, at import; reading them
    here as well honours a cache chosen later in the same process (notebooks, tests).
    """
    from huggingface_hub import constants

    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def cache_entry(repo_id: str) -> Path:
    """Where the cache keeps ``repo_id`` (``models--org--name``), for error messages."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` (its ``main`` revision), never downloading."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True))
    except Exception:  # noqa: BLE001 - hub errors vary by version; all mean "not cached"
        return None


def hub_folder(repo_id: str, allow_network: bool, allow_patterns: list[str] | None = None, spec: str | None = None,
               missing: str = "not in the Hugging Face cache") -> Path:
    """The local snapshot folder of a hub repository, downloading only when allowed. ``spec``
    is the --model value as the user wrote it (``hf-hub:<repo_id>`` unless given) and
    ``missing`` what the error says was not found, for the messages of both hub loaders."""
    from huggingface_hub import snapshot_download

    spec = spec or f"hf-hub:{repo_id}"
    cached = cached_snapshot(repo_id)
    if cached is not None:
        return cached
    how = (
        "download it once with network access (mcaudit run --allow-network ...) or with "
        f"`hf download {repo_id}`, or pass the downloaded folder as --model"
    )
    if not allow_network:
        raise InputError(
            f"--model {spec}: {missing} (looked for {cache_entry(repo_id)}; "
            f"set HF_HUB_CACHE or HF_HOME if the cache is elsewhere); {how}"
        )
    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), allow_patterns=allow_patterns))
    except Exception as exc:  # noqa: BLE001 - hub errors vary by version
        raise InputError(f"--model {spec}: download failed ({type(exc).__name__}: {exc}); {how}") from exc


def _is_transformers_clip(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def _json_model_type(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _has_text_config(folder: Path) -> bool:
    """A transformers config of a text tower that open_clip can wrap (BERT, RoBERTa, ...).

    A model folder may also carry the config of a whole transformers CLIPModel (repos that
    publish both formats), which is not a text tower and must not be taken for one.
    """
    from open_clip.hf_configs import arch_dict

    return _json_model_type(folder / "config.json") in arch_dict


def _has_tokenizer_files(folder: Path) -> bool:
    """Enough for ``AutoTokenizer``: a vocabulary and something naming the tokenizer class."""
    vocab = any((folder / n).is_file() for n in TOKENIZER_VOCAB_FILES)
    named = (folder / "tokenizer_config.json").is_file() or _json_model_type(folder / "config.json") is not None
    return vocab and named


def resolve_hf_text_files(name: str, folder: Path | None, allow_network: bool, what: str) -> str:
    """A local folder holding the ``what`` ("config" or "tokenizer") of HF text tower ``name``.

    Looks in the model folder, then at ``name`` as a local path, then in the Hugging Face
    cache; downloads the tower's small files (never its weights) only when allowed.
    """
    usable = _has_text_config if what == "config" else _has_tokenizer_files
    looked: list[str] = []
    candidates: list[Path] = []
    if folder is not None:
        candidates.append(Path(folder))
    local = Path(name).expanduser()
    if local.is_dir():
        candidates.append(local)
    for candidate in candidates:
        looked.append(str(candidate))
        if usable(candidate):
            return str(candidate)
    is_hub_id = bool(HUB_ID.fullmatch(name)) and not local.exists()
    if is_hub_id:
        looked.append(str(cache_entry(name)))
        cached = cached_snapshot(name)
        if cached is not None and usable(cached):
            return str(cached)
        if allow_network:
            from huggingface_hub import snapshot_download

            try:
                fetched = Path(snapshot_download(name, cache_dir=hub_cache_dir(), allow_patterns=TEXT_TOWER_FILES))
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"text tower {name}: download of its {what} failed ({type(exc).__name__}: {exc})") from exc
            if usable(fetched):
                return str(fetched)
            looked.append(f"{fetched} (downloaded)")
    files = "config.json (a BERT-like config)" if what == "config" else "vocab.txt or tokenizer.json, with config.json or tokenizer_config.json"
    fix = (
        f"copy its {files} into the model folder, or run once with --allow-network, or "
        f'`hf download {name} --include "*.json" --include "*.txt"` (its config and vocabulary, not its weights)'
        if is_hub_id else f"copy its {files} into the model folder"
    )
    raise InputError(
        f"Hugging Face text tower {name}: its {what} is not available offline (looked in "
        f"{'; '.join(looked) or 'nowhere'}); {fix}"
    )


def build_model(model_cfg: dict[str, Any], folder: Path | None, allow_network: bool = False) -> torch.nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    hf_text = bool(text_cfg.get("hf_model_name"))
    if hf_text:
        # Never fetch base tower weights: the checkpoint provides all of them. open_clip
        # reads the tower's config with AutoConfig.from_pretrained(hf_model_name), so hand it
        # a local folder: a hub id would reach for the network.
        text_cfg["hf_model_pretrained"] = False
        try:
            import transformers  # noqa: F401 - open_clip's HF tower needs it
        except ImportError as exc:
            raise InputError(
                f"the text tower {text_cfg['hf_model_name']} is a Hugging Face model and needs the "
                f'optional transformers package; install it with pip install "mcaudit[hf]"'
            ) from exc
        text_cfg["hf_model_name"] = resolve_hf_text_files(text_cfg["hf_model_name"], folder, allow_network, "config")
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


def make_tokenizer(model_cfg: dict[str, Any], folder: Path | None, allow_network: bool = False):
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:
        source = resolve_hf_text_files(hf_name, folder, allow_network, "tokenizer")
        try:
            return HFTokenizer(
                source,
                context_length=context_length,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **text_cfg.get("tokenizer_kwargs", {}),
            )
        except (OSError, ValueError) as exc:
            raise InputError(f"tokenizer {hf_name}: the files in {source} do not load ({exc})") from exc
    return SimpleTokenizer(context_length=context_length)
