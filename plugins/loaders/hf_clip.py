"""Built-in loader for transformers ``CLIPModel`` checkpoints: PLIP, PubMedCLIP, OpenAI CLIP.

An optional extra: ``pip install "mcaudit[hf]"`` brings transformers, which is imported only
when a spec is claimed. Spec forms:

* ``path/to/folder``: what ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained``
  write (``config.json`` with ``model_type: clip``, ``model.safetensors`` or
  ``pytorch_model.bin``, tokenizer files, ``preprocessor_config.json``).
* ``ORG/NAME`` (``vinid/plip``, ``flaviagiammarino/pubmed-clip-vit-base-patch32``): the same
  layout from the local Hugging Face cache; the hub is asked only with ``--allow-network``.
* either of them with ``--checkpoint FILE``: fine-tuned weights for that architecture.

Weights are untrusted: they are read from safetensors or with ``torch.load(weights_only=True)``
and loaded strictly, so a checkpoint that does not fit fails with its missing and unexpected
keys instead of leaving layers at random initialisation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mcaudit.errors import InputError
from mcaudit.hookimpl import hookimpl
from mcaudit.models.adapter import ModelAdapter
from mcaudit.models.checkpoints import WEIGHT_SUFFIXES, load_into, read_state_dict, sha256_file
from mcaudit.plugins.loaders.openclip import HUB_ID, OPENAI_MEAN, OPENAI_STD, hub_folder
from mcaudit.plugins.loaders.openclip_adapter import ClipModelAdapter
from mcaudit.models.preprocessing import hf_processor_preprocessing, processor_scale
from mcaudit.hook_types import LoaderInfo, ModelRequest

LOADER_NAME = "hf-clip"
INSTALL_HINT = 'pip install "mcaudit[hf]"'
# Single-file weights first, safetensors preferred; then the index of a sharded checkpoint.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
# What a download needs: no TensorFlow/Flax weights, no example images.
HUB_FILES = ["*.json", "*.txt", "*.safetensors", "pytorch_model*.bin", "*.model"]


@hookimpl
def mcaudit_register_model_loaders(register):
    register(
        LoaderInfo(
            LOADER_NAME,
            (
                "FOLDER (transformers CLIPModel: config.json + weights + tokenizer + processor config)",
                "ORG/NAME (hub id, e.g. vinid/plip; local cache; --allow-network to download)",
                "FOLDER or ORG/NAME --checkpoint FILE (fine-tuned weights)",
            ),
            f"transformers CLIPModel models: PLIP, PubMedCLIP, OpenAI CLIP (optional: {INSTALL_HINT})",
        )
    )


@hookimpl
def mcaudit_load_model(spec: str, request: ModelRequest) -> ModelAdapter | None:
    folder = _claim(spec, request.allow_network)
    if folder is None:
        return None
    transformers = _import_transformers(spec)
    try:
        config = transformers.CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--model {spec}: {folder / 'config.json'} is not a readable CLIP config ({exc})") from exc
    # Not CLIPModel.from_pretrained: it initialises missing weights at random with only a
    # logged warning, and whether it unpickles .bin files weights-only depends on the version.
    model = transformers.CLIPModel(config)
    if request.checkpoint is not None:
        weights = [Path(request.checkpoint)]
    else:
        weights = _weight_files(folder, spec)
    state: dict[str, torch.Tensor] = {}
    for path in weights:
        state.update(read_state_dict(path))
    load_into(model, state, ", ".join(str(p) for p in weights))
    model.eval().requires_grad_(False)
    tokenizer = _tokenizer(transformers, folder, spec)
    size = int(config.vision_config.image_size)
    processor = _image_processor(transformers, folder, spec, size)
    mean, std = _pixel_normalisation(processor)
    adapter = HFClipAdapter(
        model,
        tokenizer,
        spec=spec,
        image_size=(size, size),
        mean=mean,
        std=std,
        weights_sha256=_weights_digest(weights),
        loader=LOADER_NAME,
        pixel_transform=hf_processor_preprocessing(processor, (size, size)),
    )
    if (folder / "prompts.toml").is_file():
        adapter.default_prompts = folder / "prompts.toml"
    return adapter.to(request.device)


# -- which specs are ours ----------------------------------------------------------------------
def _claim(spec: str, allow_network: bool) -> Path | None:
    """The local folder of a transformers CLIP model named by ``spec``, or None if not ours."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return None  # the open_clip layout (BiomedCLIP, QuiltNet)
        model_type = _model_type(path)
        if model_type is None:
            return None
        if model_type != "clip":
            raise InputError(
                f"--model {spec}: config.json describes a {model_type!r} model; the {LOADER_NAME} loader "
                f"reads transformers CLIPModel folders (model_type 'clip')"
            )
        return path
    if ":" in spec.split("/")[0] or path.exists():
        return None  # another loader's scheme (hf-hub:, medclip:), or a file
    if not HUB_ID.fullmatch(spec) or path.suffix in (".json", *WEIGHT_SUFFIXES):
        return None
    folder = hub_folder(spec, allow_network, HUB_FILES, spec=spec,
                        missing="no such folder, and not in the Hugging Face cache")
    if (folder / "open_clip_config.json").is_file():
        raise InputError(f"--model {spec}: this repository holds an open_clip model; use --model hf-hub:{spec}")
    model_type = _model_type(folder)
    if model_type != "clip":
        raise InputError(
            f"--model {spec}: {folder} has no config.json of a transformers CLIPModel "
            f"(model_type {model_type!r}); the {LOADER_NAME} loader reads CLIP models only"
        )
    return folder


def _model_type(folder: Path) -> str | None:
    try:
        value = json.loads((folder / "config.json").read_text()).get("model_type")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{folder / 'config.json'}: not a readable JSON config ({exc})") from exc
    return value if isinstance(value, str) else None


def _import_transformers(spec: str):
    try:
        import transformers
    except ImportError as exc:
        raise InputError(
            f"--model {spec}: loading transformers CLIP models needs the optional transformers "
            f"package; install it with {INSTALL_HINT}"
        ) from exc
    return transformers


# -- the files of a folder -----------------------------------------------------------------------
def _weight_files(folder: Path, spec: str) -> list[Path]:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in SHARD_INDEXES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted({folder / shard for shard in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise InputError(f"--model {spec}: {index} is not a readable shard index ({exc})") from exc
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise InputError(f"--model {spec}: {index} names shards that are missing: {', '.join(missing)}")
            return shards
    found = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.suffix in (".h5", ".msgpack"))
    raise InputError(
        f"--model {spec}: no PyTorch weights in {folder} (looked for {', '.join(WEIGHT_FILES + SHARD_INDEXES)}"
        + (f"; found {', '.join(found)}: pass a PyTorch one with --checkpoint" if found else "")
        + ")"
    )


def _weights_digest(paths: list[Path]) -> str:
    if len(paths) == 1:
        return sha256_file(paths[0])
    digest = hashlib.sha256()
    for path in paths:  # sorted shard order, so the digest names the set of files
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _tokenizer(transformers, folder: Path, spec: str):
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"--model {spec}: no usable tokenizer in {folder} (a CLIP tokenizer needs vocab.json and "
            f"merges.txt, or tokenizer.json; save it with CLIPProcessor.save_pretrained) ({exc})"
        ) from exc


def _image_processor(transformers, folder: Path, spec: str, size: int):
    """The image processor the model's users get from ``AutoImageProcessor`` (and so from
    ``CLIPProcessor``). Without a processor config the model is taken to use OpenAI CLIP's
    preprocessing: transformers' default ``CLIPImageProcessor`` at the model's size."""
    # transformers 4 writes preprocessor_config.json; 5 nests it in processor_config.json.
    configs = [folder / n for n in PROCESSOR_CONFIGS if (folder / n).is_file()]
    if not configs:
        return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                               image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    try:
        return transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise InputError(f"--model {spec}: the image processor in {configs[0]} does not load ({exc})") from exc


def _pixel_normalisation(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std that map pixels in [0, 1] to what the model saw in training.

    The processor rescales 8-bit values by ``rescale_factor`` before normalising, so for
    ``x = pixels * 255 * rescale_factor`` the model sees ``(x - mean) / std``; dividing mean
    and std by ``255 * rescale_factor`` gives the same thing in [0, 1] pixel space.
    """
    scale = processor_scale(processor)
    if getattr(processor, "do_normalize", True):
        mean, std = _three(processor.image_mean), _three(processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(m / scale for m in mean), tuple(s / scale for s in std)


def _three(values) -> tuple[float, ...]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(values * 3) if len(values) == 1 else tuple(values)


# -- the adapter ---------------------------------------------------------------------------------
class HFClipAdapter(ClipModelAdapter):
    """A transformers ``CLIPModel`` seen through pixel-space encoding, with a CoOp text path."""

    def __init__(self, model: nn.Module, tokenizer, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = tokenizer
        limit = int(model.config.text_config.max_position_embeddings)
        self.max_length = min(limit, int(getattr(tokenizer, "model_max_length", limit) or limit))

    def _encode_normalized_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=images)
        return self.model.visual_projection(out.pooler_output)

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return self._text_features(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))

    def _text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.model.text_projection(out.pooler_output)

    # -- learned context (CoOp) ------------------------------------------------------------
    def token_embeddings(self, text: str) -> torch.Tensor:
        """Word embeddings of ``text``'s tokens without start/end tokens, (n_tokens, width)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return self._word_embedding()(torch.tensor(ids, device=self.device)).detach().clone()

    def encode_text_with_context(self, context: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """Features of ``[start] context <class name>. [end]``, one per class, L2-normalised.

        The learned vectors replace the word embeddings of placeholder tokens inside the
        model's own text forward (a hook on the token embedding), so masking and end-token
        pooling stay exactly those of the installed transformers version. A context equal to
        ``token_embeddings("a photo of")`` gives the features of ``"a photo of <class>."``.
        """
        if context.ndim != 2 or context.shape[1] != self.text_width:
            raise ValueError(f"context must have shape (n_ctx, {self.text_width}), got {tuple(context.shape)}")
        n_ctx = int(context.shape[0])
        ids, mask = self._spliced_ids(list(class_names), n_ctx)

        def splice(_module, _inputs, words):
            ctx = context.to(device=words.device, dtype=words.dtype).unsqueeze(0).expand(words.shape[0], -1, -1)
            # Rebuild the sequence instead of writing in place, so gradients reach ``context``.
            return torch.cat([words[:, :1], ctx, words[:, 1 + n_ctx :]], dim=1)

        handle = self._word_embedding().register_forward_hook(splice)
        try:
            feats = self._text_features(ids, mask)
        finally:
            handle.remove()
        return nn.functional.normalize(feats.float(), dim=-1)

    def _word_embedding(self) -> nn.Embedding:
        return self.model.text_model.embeddings.token_embedding

    def _spliced_ids(self, class_names: list[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids of ``[start] X*n_ctx <name>. [end]``, right-padded, and their attention mask.

        The placeholders X take the start token's id: it is not the end token, so pooling
        (the first end token, or the largest id in configs from before transformers 4.31)
        still lands on the real end of each prompt.
        """
        if n_ctx + 2 > self.max_length:
            raise ValueError(f"{n_ctx} context tokens do not fit the text tower's {self.max_length} positions")
        rows = []
        for name in class_names:
            ids = self.tokenizer(f"{name}.", add_special_tokens=True)["input_ids"]
            start, body, end = ids[0], ids[1:-1], ids[-1]
            body = body[: self.max_length - 2 - n_ctx]  # keep the end token when the name is long
            rows.append([start] * (1 + n_ctx) + body + [end])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else rows[0][-1]
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)
