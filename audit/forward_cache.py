"""The forward pass and finished checks kept on disk, so that a re-run, a re-gate, a changed
prompt or an interrupted audit never encodes an image twice.

Image features are keyed by everything that decides them: the weights' sha256, the model's
spec, loader and class, its preprocessing (``repr`` of the pixel transform), the data
options, the precision and the device type; within that, each image by its content (sha256
of its file) or, for images stored inside one file (MedMNIST .npz, phantoms), by the data's
fingerprint and the image's place in it. Logits are kept apart, keyed further by the class
text features and the logit scale: a changed prompt re-encodes text only. Finished checks
(:class:`CheckStore`) are keyed by the run's settings and the forward outputs themselves.

Files are plain ``.npz`` arrays (read with ``allow_pickle=False``) except finished checks,
which are pickles this code wrote under the cache folder; delete the folder to clear it.
A pickle runs code when read, so one is read only when it is a regular file owned by the
current user and writable by nobody else (:func:`written_by_us`): a cache folder shared with
others (a group or world-writable scratch disk) cannot hand this user someone else's pickle.
The cache is off under torchrun (ranks need not share a disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CACHE_VERSION = 1


def default_cache_dir() -> Path | None:
    """$MCAUDIT_CACHE_DIR, else $XDG_CACHE_HOME/mcaudit, else ~/.cache/mcaudit. Under pytest
    (PYTEST_CURRENT_TEST set) without $MCAUDIT_CACHE_DIR: None, so that tests never share,
    nor depend on, the user's cache."""
    if os.environ.get("MCAUDIT_CACHE_DIR"):
        return Path(os.environ["MCAUDIT_CACHE_DIR"])
    if os.environ.get("PYTEST_CURRENT_TEST"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mcaudit"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(adapter, dataset, precision: str) -> tuple[dict | None, str]:
    """What decides an image's features, or (None, why it cannot be cached)."""
    if not adapter.weights_sha256:
        return None, "the model's loader records no weights hash"
    transform = dataset.pixel_transform
    preprocessing = repr(transform) if transform is not None else f"to_model_size{tuple(dataset.image_size)}"
    if " at 0x" in preprocessing:
        return None, "the model's preprocessing has no stable description (its repr names a memory address)"
    return {"version": CACHE_VERSION, "weights": adapter.weights_sha256, "spec": adapter.spec,
            "loader": adapter.loader, "adapter": type(adapter).__qualname__, "preprocessing": preprocessing,
            "data_class": type(dataset).__qualname__,
            # the class list names labels, not pixels: a new prompt file may bring one
            "data_options": {k: v for k, v in dataset.options.items() if k != "classes"},
            "precision": precision, "device": adapter.device.type}, ""


def image_keys(dataset) -> list[str]:
    """One key per record: its file's sha256, or the data's fingerprint and its source."""
    keys = []
    for record in dataset.records:
        path = record.path
        if path is not None and Path(path).is_file():
            keys.append("file:" + _file_sha256(Path(path)))
        else:
            keys.append(f"in:{dataset.fingerprint}:{record.source}")
    return keys


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError):  # a truncated file from a killed run: start that entry afresh
        return {}


def _save(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _merge(old: dict, new: dict, field_names: tuple[str, ...]) -> dict:
    if not old or "keys" not in old:
        return new
    keep = ~np.isin(old["keys"], new["keys"])
    return {k: np.concatenate([old[k][keep], new[k]]) for k in ("keys", *field_names)}


@dataclass
class ForwardCache:
    """Image features and logits of one cache folder; ``last`` says what the latest run reused."""

    root: Path
    show: bool = False
    last: dict[str, Any] = field(default_factory=dict)

    def _note(self, message: str) -> None:
        if self.show:
            print(f"mcaudit: forward cache: {message}", file=sys.stderr)

    def forward(self, adapter, dataset, class_features: torch.Tensor, precision: str, encode: Callable):
        """(indices, features, logits, grey, failures) as ``encode(rows)`` gives them for the
        dataset rows ``rows``, encoding only the images the cache lacks; None when this model
        cannot be cached (the reason is in ``last``)."""
        identity, reason = model_identity(adapter, dataset, precision)
        if identity is None:
            self.last = {"used": False, "reason": reason}
            self._note(f"not used: {reason}")
            return None
        folder = self.root / f"v{CACHE_VERSION}" / _digest(identity)
        keys = np.array(image_keys(dataset))
        text_key = _digest([hashlib.sha256(class_features.float().cpu().numpy().tobytes()).hexdigest(),
                            float(adapter.logit_scale)])
        stored = _load(folder / "images.npz")
        failed = _load(folder / "failed.npz")
        known = set(stored.get("keys", np.zeros(0, str)).tolist()) | set(failed.get("keys", np.zeros(0, str)).tolist())
        missing = [i for i, k in enumerate(keys) if k not in known]
        self._report(len(keys), len(missing), bool(known))
        fresh = encode(missing) if missing else None
        new = self._fresh_arrays(fresh, keys)
        stored = _merge(stored, new["images"], ("features", "grey")) if len(new["images"]["keys"]) else stored
        failed = _merge(failed, new["failed"], ("errors",)) if len(new["failed"]["keys"]) else failed
        logits_path = folder / f"logits-{text_key}.npz"
        logits = _load(logits_path)
        if len(new["images"]["keys"]):
            logits = _merge(logits, {"keys": new["images"]["keys"], "logits": new["logits"]}, ("logits",))
        parts, added = self._assemble(keys, stored, failed, logits, adapter, class_features)
        if len(new["images"]["keys"]):
            _save(folder / "images.npz", **stored)
        if len(new["failed"]["keys"]):
            _save(folder / "failed.npz", **failed)
        if len(new["images"]["keys"]) or added is not None:
            _save(logits_path, **(added if added is not None else logits))
        return parts

    def _report(self, total: int, missing: int, had_entries: bool) -> None:
        reason = ""
        if missing == total and had_entries:
            reason = ("no image of this data is in the cache for this model (the images, or the file "
                      "holding them, changed)")
        self.last = {"used": True, "images": total, "reused": total - missing, "encoded": missing, "reason": reason}
        self._note(f"{total - missing} of {total} images reused, {missing} to encode" + (f": {reason}" if reason else ""))

    @staticmethod
    def _fresh_arrays(fresh, keys: np.ndarray) -> dict:
        empty = {"images": {"keys": np.zeros(0, str)}, "failed": {"keys": np.zeros(0, str)}}
        if fresh is None:
            return empty
        indices, feats, logits, grey, failures = fresh
        out = dict(empty)
        if indices:
            idx = torch.cat(indices).numpy()
            out["images"] = {"keys": keys[idx], "features": torch.cat(feats).numpy(),
                             "grey": np.asarray(grey, dtype=bool)}
            out["logits"] = torch.cat(logits).numpy()
        if failures:
            out["failed"] = {"keys": keys[[i for i, _ in failures]], "errors": np.array([e for _, e in failures])}
        return out

    @staticmethod
    def _assemble(keys, stored, failed, logits, adapter, class_features):
        """Rows in dataset order, and the logits store when rows were added to it: logits the
        cache lacks (a new prompt) come from the cached features by the forward pass's formula."""
        row_of = {k: r for r, k in enumerate(stored.get("keys", np.zeros(0, str)).tolist())}
        fail_of = {k: str(e) for k, e in zip(failed.get("keys", []), failed.get("errors", []))}
        idx = np.array([i for i, k in enumerate(keys) if k in row_of], dtype=np.int64)
        rows = np.array([row_of[keys[i]] for i in idx], dtype=np.int64)
        failures = sorted((i, fail_of[k]) for i, k in enumerate(keys) if k not in row_of and k in fail_of)
        if not len(idx):
            return ([], [], [], [], failures), None
        feats = torch.from_numpy(np.ascontiguousarray(stored["features"][rows]))
        logit_row = {k: r for r, k in enumerate(logits.get("keys", np.zeros(0, str)).tolist())}
        lacking = [k for k in keys[idx] if k not in logit_row]
        if lacking:
            lack_rows = np.array([row_of[k] for k in lacking])
            text = class_features.float().cpu()
            computed = (adapter.logit_scale * torch.from_numpy(stored["features"][lack_rows]) @ text.T).numpy()
            logits = _merge(logits, {"keys": np.array(lacking), "logits": computed}, ("logits",))
            logit_row = {k: r for r, k in enumerate(logits["keys"].tolist())}
        out_logits = torch.from_numpy(np.ascontiguousarray(logits["logits"][[logit_row[k] for k in keys[idx]]]))
        grey = stored["grey"][rows].tolist()
        return ([torch.from_numpy(idx)], [feats], [out_logits], grey, failures), (logits if lacking else None)


def run_key(cfg, adapter, dataset, forward) -> str:
    """What a finished check's result depends on beyond its own name and parameters."""
    settings = {k: v for k, v in cfg.public().items()
                if k not in ("out", "gate", "thresholds", "gate_policy", "config_file", "check_params", "checks",
                             "profile", "threads", "workers", "cache_dir", "no_cache", "resume", "label",
                             "models")}
    outputs = hashlib.sha256()
    for array in (forward.indices, forward.labels, forward.logits.numpy(), forward.image_features.numpy()):
        outputs.update(np.ascontiguousarray(array).tobytes())
    from mcaudit import __version__

    return _digest([__version__, settings, adapter.weights_sha256, dataset.fingerprint, outputs.hexdigest(),
                    adapter.device.type])


def written_by_us(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link) owned by this user and writable only by
    them. Whoever can write a folder can swap its entries, but not forge their owner, and
    this code writes its files with mode 0600."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


@dataclass
class CheckStore:
    """Finished checks of one run key: a re-run with ``--resume`` takes them instead of running
    them again. Only checks that completed are kept (an error is retried)."""

    root: Path
    key: str
    resume: bool = False

    def _path(self, name: str, params: dict) -> Path:
        return self.root / f"v{CACHE_VERSION}" / "checks" / self.key / f"{name}-{_digest(params)}.pkl"

    def load(self, name: str, params: dict):
        """(results.json entry, CheckResult) of a finished check when resuming, else None."""
        path = self._path(name, params)
        if not self.resume or not path.is_file():
            return None
        if not written_by_us(path):
            print(f"mcaudit: not resuming {name} from {path}: the file is not this user's alone "
                  "(another owner, or writable by others); running it again", file=sys.stderr)
            return None
        try:
            with open(path, "rb") as f:
                return pickle.load(f)  # noqa: S301 - written by save() below, under the user's own cache folder
        except Exception:  # noqa: BLE001 - a truncated or stale file: run the check again
            return None

    def save(self, name: str, params: dict, entry: dict, result) -> None:
        path = self._path(name, params)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                pickle.dump((entry, result), f)
        except Exception:  # noqa: BLE001 - a result that cannot be pickled is simply not kept
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, path)


def cache_for_run(cfg, show: bool) -> ForwardCache | None:
    """The forward cache a run's settings ask for (``--cache-dir``, ``--no-cache``), or None."""
    if getattr(cfg, "no_cache", False):
        return None
    root = getattr(cfg, "cache_dir", None) or default_cache_dir()
    return ForwardCache(Path(root), show=show) if root else None


def store_for_run(cfg, ctx, cache: ForwardCache | None):
    """Where finished checks are kept (always, with the cache on) and whether ``--resume``
    takes them; None without a cache or under torchrun."""
    from mcaudit.errors import InputError

    if cache is None or ctx.world.active:
        if getattr(cfg, "resume", False):
            raise InputError("--resume keeps finished checks in the forward cache: it needs the cache "
                             "(drop --no-cache) and one process (not torchrun)")
        return None
    return CheckStore(cache.root, run_key(cfg, ctx.model, ctx.dataset, ctx.forward), bool(getattr(cfg, "resume", False)))
