"""Run settings from the command line, a TOML config file and defaults, in that priority.

A config file (``--config FILE``, or ``mcaudit.toml`` / ``[tool.mcaudit]`` in
``pyproject.toml`` in the working folder) has three tables:

.. code-block:: toml

    [run]                       # any ``mcaudit run`` option, long name with underscores
    model = "ViT-B-16"
    checkpoint = "ft.safetensors"
    data = "data/manifest.csv"
    groups = ["sex", "site"]

    [checks.calibration]        # check parameters, as --set calibration.n_bins=10
    n_bins = 10

    [thresholds]                # gate thresholds, as "check.metric" = "OP VALUE"
    "performance.accuracy" = ">= 0.80"
    "performance.recall.*" = { rule = ">= 0.9", on = "lower" }

    [gate]                      # what statuses mean for the exit code (see mcaudit.verdict)
    not_evaluated = "fail"      # default "show"; --strict sets "fail"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mcaudit.errors import InputError


@dataclass
class RunConfig:
    model: str | None = None
    checkpoint: str | None = None
    label: str | None = None  # the model's name in a multi-model audit
    models: str | None = None  # a models TOML: several models audited on the same data
    data: str | None = None
    prompts: str | None = None
    groups: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    out: str = "mcaudit-report"
    gate: str | None = None  # None: no gating; "": find thresholds; else a TOML file
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 64
    seed: int = 0
    workers: int = 0
    threads: int = 0  # CPU intra-op threads; 0 = automatic
    split: str = "test"
    profile: str | None = None  # None: "standard", or "quick" for the demo
    strict: bool = False
    allow_network: bool = False
    ood: str | None = None
    reference_model: str | None = None
    reference_checkpoint: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    check_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    gate_policy: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None  # None: default_cache_dir()
    no_cache: bool = False
    resume: bool = False
    quiet: bool = False
    config_file: str | None = None

    def public(self) -> dict[str, Any]:
        """The settings as results.json records them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("quiet",)}


# Seeds go to torch and numpy as signed 64-bit integers.
MAX_SEED = 2**63 - 1


def check_run_settings(cfg: RunConfig) -> None:
    """Numeric settings a library would otherwise reject deep inside the run, with a traceback."""
    if not 0 <= cfg.seed <= MAX_SEED:
        raise InputError(f"--seed {cfg.seed}: must be from 0 to {MAX_SEED}")
    if cfg.workers < 0:
        raise InputError(f"--workers {cfg.workers}: must be 0 (load images in the main process) or more")


RUN_KEYS = {f.name for f in fields(RunConfig)} - {"check_params", "thresholds", "config_file", "gate", "gate_policy"}


def read_toml(path: Path, what: str = "config") -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{what} {path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: malformed TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text") from exc


def mcaudit_table(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The mcaudit part of a config file: ``[tool.mcaudit]`` in pyproject.toml, else all of it."""
    if Path(path).name == "pyproject.toml":
        return data.get("tool", {}).get("mcaudit", {})
    return data


def default_config_file(cwd: Path | None = None) -> Path | None:
    cwd = cwd or Path.cwd()
    if (cwd / "mcaudit.toml").is_file():
        return cwd / "mcaudit.toml"
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        try:
            text = pyproject.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return None
        try:
            if "mcaudit" in tomllib.loads(text).get("tool", {}):
                return pyproject
        except tomllib.TOMLDecodeError as exc:
            # Settings or thresholds that silently vanish would change the verdict.
            if "[tool.mcaudit" in text:
                raise InputError(f"{pyproject}: malformed TOML ({exc}); its [tool.mcaudit] settings cannot be read") from exc
            return None
    return None


def apply_config_file(cfg: RunConfig, path: Path) -> None:
    table = mcaudit_table(path, read_toml(path))
    run = table.get("run", {})
    if not isinstance(run, dict):
        raise InputError(f"{path}: [run] must be a table")
    for key, value in run.items():
        key_ = key.replace("-", "_")
        if key_ == "group":
            key_ = "groups"
        if key_ not in RUN_KEYS:
            raise InputError(f"{path}: [run] has unknown option {key!r} (options: {', '.join(sorted(RUN_KEYS))})")
        setattr(cfg, key_, _coerce(key_, value, path))
    checks = table.get("checks", {})
    if not isinstance(checks, dict) or not all(isinstance(v, dict) for v in checks.values()):
        raise InputError(f"{path}: [checks.NAME] tables hold check parameters")
    for name, params in checks.items():
        cfg.check_params.setdefault(name, {}).update(params)
    gate = table.get("gate", {})
    if not isinstance(gate, dict):
        raise InputError(f"{path}: [gate] must be a table (not_evaluated, inconclusive, warn)")
    cfg.gate_policy.update(gate)
    thresholds = table.get("thresholds", {})
    if thresholds:
        cfg.thresholds.update(parse_threshold_table(thresholds, str(path)))
    cfg.config_file = str(path)


def _coerce(key: str, value: Any, path: Path) -> Any:
    default = getattr(RunConfig(), key)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise InputError(f"{path}: [run] {key} must be a list")
        return [str(v) for v in value]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"{path}: [run] {key} must be true or false")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{path}: [run] {key} must be an integer")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise InputError(f"{path}: [run] {key} must be a table")
        if key == "data_options":
            check_data_options(value, f"{path}: [run] data_options")
        return value
    if not isinstance(value, str):
        raise InputError(f"{path}: [run] {key} must be a string")
    return value


def parse_threshold_table(table: Any, where: str) -> dict[str, Any]:
    """``"check.metric" = ">= VALUE"`` or ``= { rule = ">= VALUE", on = "lower" }`` entries."""
    if not isinstance(table, dict):
        raise InputError(f"{where}: [thresholds] must be a table of \"check.metric\" = \">= VALUE\"")
    out: dict[str, Any] = {}
    for key, value in _flatten(table):
        if isinstance(value, dict):
            out[key] = value
            continue
        if not isinstance(value, str):
            value = f">= {value}" if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, str):
            raise InputError(f"{where}: threshold {key!r} must be a string like \">= 0.8\" or a table {{ rule = \">= 0.8\" }}")
        out[key] = value
    return out


THRESHOLD_KEYS = {"rule", "on", "severity"}


def _flatten(table: dict[str, Any], prefix: str = ""):
    # TOML turns unquoted dotted keys (performance.accuracy = ...) into nested tables; a table
    # holding a "rule" is one threshold's settings, not a level of its name.
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not ("rule" in value and set(value) <= THRESHOLD_KEYS):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set check.param=value`` options; values are read as TOML literals when they parse."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        check, dot, param = key.strip().partition(".")
        if not sep or not dot or not check or not param:
            raise InputError(f"--set {item}: expected CHECK.PARAM=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(check, {})[param] = value
    return out


def parse_data_options(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--data-option {item}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key.strip()] = value
    check_data_options(out, "--data-option")
    return out


def check_data_options(options: dict[str, Any], where: str) -> None:
    """The built-in formats' options; a plugin's own options pass through unchecked."""
    frame = options.get("dicom_frame")
    if frame is not None and frame != "middle" and not _natural_number(frame, minimum=0):
        raise InputError(f"{where} dicom_frame={frame}: expected a frame index (0, 1, ...) or 'middle'")
    limit = options.get("max_image_pixels")
    if limit is not None and not _natural_number(limit, minimum=1):
        raise InputError(f"{where} max_image_pixels={limit}: expected a whole number of pixels, at least 1")


def _natural_number(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
