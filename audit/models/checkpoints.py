"""Read untrusted checkpoint files without executing anything in them."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from mcaudit.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor map from a safetensors file or a weights-only torch file.

    Accepts a bare state dict or one nested under ``state_dict`` or ``model``, and strips
    the ``module.`` prefix that DataParallel/DDP training leaves behind.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"checkpoint {path}: not a readable safetensors file ({exc})") from exc
    else:
        _check_torch_file(path)
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputError(
                f"checkpoint {path}: refused to unpickle, it holds objects other than tensors "
                f"and plain containers (loaded with weights_only=True; convert it to "
                f"safetensors from a trusted environment). {first}"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - a damaged pickle can fail in any way; the file is the user's to fix
            raise InputError(f"checkpoint {path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    state = raw
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            nested = state.get(key)
            if isinstance(nested, dict) and nested and all(isinstance(v, torch.Tensor) for v in nested.values()):
                state = nested
                break
    if not isinstance(state, dict) or not state:
        raise InputError(f"checkpoint {path}: does not hold a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"checkpoint {path}: holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# torch.save writes a zip archive (since torch 1.6) or, before that, a pickle (protocol 2+).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_torch_file(path: Path) -> None:
    """Refuse what cannot be a torch checkpoint (a text file named .bin) before unpickling it."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith(TORCH_FILE_MAGIC):
        what = "an empty file" if not head else "neither a zip archive nor a pickle"
        raise InputError(f"checkpoint {path}: not a torch checkpoint ({what}); "
                         f"expected a file written by torch.save or a .safetensors file")


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, failing with the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    # Older checkpoints store logit_scale as a scalar, newer ones as shape [1].
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own and state[key].shape != own[key].shape and state[key].numel() == own[key].numel():
            state[key] = state[key].reshape(own[key].shape)
    # transformers >= 4.31 no longer keeps position_ids as a buffer.
    for key in [k for k in state if k.endswith("embeddings.position_ids") and k not in own]:
        del state[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} keys with the wrong shape ({_few(bad_shapes)})")
        raise InputError(f"checkpoint {source} does not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... {len(keys) - n} more" if len(keys) > n else "")
