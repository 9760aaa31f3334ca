"""Several models audited in one run, on the same data, so that they can be compared pair by pair.

Every model gets the same settings: the same images (opened and decoded once, see
:class:`mcaudit.runner.SharedData`), seed, subsamples, attack budgets and thresholds. Only
what a model is differs: its spec, checkpoint, label and, optionally, its reference model.
Models come from ``--model`` given several times (with one ``--checkpoint`` and ``--label``
per model, in the same order) or from a models TOML (``--models FILE``)::

    [[model]]
    label = "biomedclip"
    spec = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

    [[model]]
    label = "ours-epoch20"
    spec = "ViT-B-16"
    checkpoint = "runs/epoch20.safetensors"   # relative to the TOML file
    reference_model = "ViT-B-16"               # what it was fine-tuned from (backdoor_scan)
"""

from __future__ import annotations

import copy
import gc
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from mcaudit.config import RunConfig, read_toml
from mcaudit.errors import InputError

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENTRY_KEYS = {"label", "spec", "checkpoint", "reference_model", "reference_checkpoint"}


@dataclass
class ModelEntry:
    label: str
    model: str
    checkpoint: str | None = None
    reference_model: str | None = None
    reference_checkpoint: str | None = None


def default_label(model: str, checkpoint: str | None) -> str:
    """A folder-safe name from the checkpoint's or the spec's last part."""
    base = Path(checkpoint).stem if checkpoint else model.rstrip("/").split("/")[-1].split(":")[-1]
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"
    return label[:64] if label[0].isalnum() else f"m{label}"[:64]


def unique_labels(entries: list[ModelEntry], given: set[str]) -> None:
    """Labels the user gave must differ; made-up ones get -2, -3, ... where they clash."""
    seen: set[str] = set()
    for entry in entries:
        if entry.label in given:
            if entry.label in seen:
                raise InputError(f"label {entry.label!r} is given to two models: each model needs its own label")
        else:
            base, k = entry.label, 2
            while entry.label in seen or entry.label in given - {entry.label}:
                entry.label = f"{base}-{k}"
                k += 1
        seen.add(entry.label)


def check_label(label: str, where: str) -> str:
    if not LABEL.match(label):
        raise InputError(f"{where} {label!r}: a label is a folder name: letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, at most 64 characters")
    return label


def entries_from_options(models: list[str], checkpoints: list[str], labels: list[str]) -> list[ModelEntry]:
    """``--model`` (repeatable) with ``--checkpoint`` and ``--label`` matched by order."""
    if len(checkpoints) not in (0, len(models)):
        raise InputError(f"--checkpoint given {len(checkpoints)} times for {len(models)} --model: give one "
                         "--checkpoint per --model, in the same order (or a models TOML with --models FILE)")
    if len(labels) not in (0, len(models)):
        raise InputError(f"--label given {len(labels)} times for {len(models)} --model: give one --label per --model")
    entries = [ModelEntry(check_label(labels[i], "--label") if labels else default_label(m, checkpoints[i] if checkpoints else None),
                          m, checkpoints[i] if checkpoints else None) for i, m in enumerate(models)]
    unique_labels(entries, set(labels))
    return entries


def entries_from_file(path: str) -> list[ModelEntry]:
    """The ``[[model]]`` tables of a models TOML; paths in it are relative to the file."""
    folder = Path(path).parent
    table = read_toml(Path(path), "--models")
    models = table.get("model")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise InputError(f"--models {path}: expected [[model]] tables, each with spec = \"...\"")
    entries, given = [], set()
    for i, item in enumerate(models, 1):
        unknown = set(item) - ENTRY_KEYS
        if unknown:
            raise InputError(f"--models {path}: model {i} has unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(ENTRY_KEYS))})")
        if not all(isinstance(v, str) and v for v in item.values()):
            raise InputError(f"--models {path}: model {i}: every value must be a non-empty string")
        if "spec" not in item:
            raise InputError(f"--models {path}: model {i} has no spec")

        def local(value: str | None, spec: bool = False) -> str | None:
            if value is None or Path(value).is_absolute():
                return value
            beside = folder / value
            # a spec may be an architecture name rather than a path: resolve it only when it exists
            return str(beside) if (not spec or beside.exists()) else value

        label = item.get("label")
        if label is not None:
            given.add(check_label(label, f"--models {path}: model {i} label"))
        entries.append(ModelEntry(label or default_label(item["spec"], item.get("checkpoint")), local(item["spec"], True),
                                  local(item.get("checkpoint")), local(item.get("reference_model"), True),
                                  local(item.get("reference_checkpoint"))))
    unique_labels(entries, given)
    return entries


def model_entries(cfg: RunConfig, models: list[str], checkpoints: list[str], labels: list[str]) -> list[ModelEntry]:
    """The models of this run: from ``--models FILE`` or the ``--model`` options; one entry
    means an ordinary single-model audit."""
    if cfg.models and models:
        raise InputError("--models and --model: give the models one way, a models TOML or --model options")
    if cfg.models:
        if checkpoints or labels:
            raise InputError("--checkpoint and --label go in the models TOML when --models is given")
        return entries_from_file(cfg.models)
    if len(models) > 1:
        return entries_from_options(models, checkpoints, labels)
    return []


def apply_model_options(cfg: RunConfig, models: list[str], checkpoints: list[str], labels: list[str],
                        models_file: str | None) -> list[ModelEntry]:
    """Set the one model of an ordinary run on ``cfg``, or return the entries of a
    multi-model run (``cfg.model`` then names the first, so that --data is still required)."""
    if len(models) <= 1:
        for given, option in ((checkpoints, "--checkpoint"), (labels, "--label")):
            if len(given) > 1:
                raise InputError(f"{option} given {len(given)} times for {len(models)} --model")
        if models:
            cfg.model = models[0]
        if checkpoints:
            cfg.checkpoint = checkpoints[0]
        if labels:
            cfg.label = check_label(labels[0], "--label")
    if models_file:
        cfg.models = models_file
    entries = model_entries(cfg, models if len(models) > 1 or cfg.models else [], checkpoints, labels)
    if entries:
        cfg.model = entries[0].model
    return entries


def config_for(cfg: RunConfig, entry: ModelEntry) -> RunConfig:
    """The run settings for one model: a deep copy, since planning a run fills in its tables."""
    one = copy.deepcopy(cfg)
    one.model, one.checkpoint, one.label, one.models = entry.model, entry.checkpoint, entry.label, None
    if entry.reference_model:
        one.reference_model, one.reference_checkpoint = entry.reference_model, entry.reference_checkpoint
    return one


@dataclass
class ModelOutcome:
    label: str
    results: dict[str, Any]
    exit_code: int
    kept: Any = None  # what the caller's ``on_done`` returned (its files, say)


def run_models(cfg: RunConfig, manager, entries: list[ModelEntry],
               on_done: Callable[[Any], Any] | None = None) -> list[ModelOutcome]:
    """Audit each model in turn on the shared data. ``on_done(audit)`` is called while the
    model's run is still in memory (to render its outputs); the model is released after it,
    so that memory holds one model at a time."""
    from mcaudit.runner import SharedData, plan_run, run_audit

    for entry in entries:  # every model's settings, parameters and thresholds checked before any loads
        plan_run(config_for(cfg, entry), manager)
    shared = SharedData()
    outcomes = []
    for k, entry in enumerate(entries, 1):
        if not cfg.quiet:
            where = f" ({entry.checkpoint})" if entry.checkpoint else ""
            print(f"mcaudit: model {k} of {len(entries)}: {entry.label}: {entry.model}{where}", file=sys.stderr)
        audit = run_audit(config_for(cfg, entry), manager, shared)
        kept = on_done(audit) if on_done is not None else None
        outcomes.append(ModelOutcome(entry.label, audit.results, audit.exit_code, kept))
        del audit
        gc.collect()
        _empty_device_cache()
    return outcomes


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def audit_model_set(cfg, manager, entries, out: Path, extra_outputs, interrupted) -> int:
    """Audit every model on the shared data, compare them, write the folder; the exit code is
    1 when any model's gated run failed or any check errored."""
    import datetime as dt
    import time

    from mcaudit import __version__
    from mcaudit.comparison import compare_runs, comparison_text
    from mcaudit.distributed import SINGLE, barrier, shutdown
    from mcaudit.output_targets import write_extra_outputs
    from mcaudit.reports.atomic import replace_folder
    from mcaudit.reports.model_set import compared_runs, model_set_files, model_set_results
    from mcaudit.reports.writer import output_files
    from mcaudit.runner import SCHEMA_VERSION

    started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    worlds = []

    def render(audit):
        worlds.append(audit.world)
        return output_files(audit, manager) if audit.world.is_main else None

    outcomes = run_models(cfg, manager, entries, render)
    if interrupted():
        raise KeyboardInterrupt
    world = worlds[-1] if worlds else SINGLE
    if world.is_main:
        comparison = compare_runs(compared_runs(outcomes), seed=cfg.seed)
        head = {"schema_version": SCHEMA_VERSION, "mcaudit_version": __version__,
                "started_at": started.isoformat(timespec="seconds"),
                "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "duration_s": round(time.perf_counter() - t0, 3),
                "config": {k: v for k, v in cfg.public().items() if k not in ("model", "checkpoint", "label")}}
        results = model_set_results(outcomes, comparison, head)
        replace_folder(out, model_set_files(outcomes, results))
        write_extra_outputs(results, extra_outputs)
        if not cfg.quiet:
            for o in outcomes:
                verdict = o.results.get("verdict") or {}
                click.echo(f"{o.label}: {verdict.get('status', '?')}: {verdict.get('headline', '')}")
            click.echo(comparison_text(comparison), nl=False)
        click.echo(f"report: {out / 'index.html'}")
    barrier(world)
    shutdown(world)
    return max(o.exit_code for o in outcomes)
