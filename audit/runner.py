"""One audit, start to finish: load, forward pass, checks, results, gate.

The order of the steps is the order of this module's functions.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcaudit import __version__
from mcaudit.catalog import Catalog, build_catalog
from mcaudit.check_api import Check, CheckResult
from mcaudit.config import RunConfig, check_run_settings
from mcaudit.context import AuditContext
from mcaudit.data.dataset import AuditDataset
from mcaudit.devices import PRECISIONS, resolve_device
from mcaudit.distributed import SINGLE, World, init_from_env, local_device
from mcaudit.errors import ExitCode, InputError
from mcaudit.forward import run_forward
from mcaudit.forward_cache import cache_for_run, store_for_run
from mcaudit.gating import apply_gate, collect_thresholds, gate_policy
from mcaudit.models.adapter import ModelAdapter
from mcaudit.plugin_manager import PluginManager
from mcaudit.prompts import PromptSet, load_prompts
from mcaudit.results import describe_run, result_entry
from mcaudit.hook_types import DataRequest, ModelRequest

SCHEMA_VERSION = 1
DEMO_GROUPS = ["site", "sex"]


@dataclass
class AuditRun:
    """The outcome of a run: results.json content, check results and per-image rows."""

    results: dict[str, Any]
    check_results: dict[str, CheckResult] = field(default_factory=dict)
    context: AuditContext | None = None
    world: World = SINGLE

    @property
    def exit_code(self) -> int:
        return exit_code(self.results)


def exit_code(results: dict[str, Any]) -> int:
    """1 when a gated run did not pass or any check errored, else 0."""
    errored = any(c.get("execution") == "error" for c in results["checks"].values())
    gate = results.get("gate") or {}
    failed = gate.get("applied") and not gate.get("passed")
    return ExitCode.FAILED if errored or failed else ExitCode.OK


def apply_demo_defaults(cfg: RunConfig) -> bool:
    """No model and no data means the embedded demo; returns whether it applies."""
    if cfg.model is None and cfg.data is None:
        cfg.model = "demo"
        cfg.data = "phantom:"
        if cfg.profile is None:
            cfg.profile = "quick"
        if not cfg.groups:
            cfg.groups = list(DEMO_GROUPS)
        return True
    if cfg.model is None:
        raise InputError("--model is required when --data is given (or give neither for the demo)")
    if cfg.data is None:
        raise InputError("--data is required when --model is given (or give neither for the demo)")
    return False


def select_checks(catalog: Catalog, cfg: RunConfig) -> dict[str, tuple[type[Check], dict[str, Any]]]:
    if cfg.profile is None:
        cfg.profile = "standard"
    names = cfg.checks or list(catalog.checks)
    unknown = [n for n in names if n not in catalog.checks]
    if unknown:
        raise InputError(f"--checks: unknown check {unknown[0]!r} (available: {', '.join(catalog.checks) or 'none'})")
    for name in cfg.check_params:
        if name not in catalog.checks:
            raise InputError(f"parameters given for unknown check {name!r} (available: {', '.join(catalog.checks)})")
    from mcaudit.check_api import PROFILES

    if cfg.profile not in PROFILES:
        raise InputError(f"--profile {cfg.profile}: use one of {', '.join(PROFILES)}")
    selected = {}
    for n in names:
        cls = catalog.checks[n]
        given = cls.profile_params(cfg.profile) | cfg.check_params.get(n, {})
        selected[n] = (cls, cls.resolve_params(given))
    return selected


def load_model(manager: PluginManager, cfg: RunConfig, device: torch.device, flags=("--model", "--checkpoint")) -> ModelAdapter:
    request = ModelRequest(
        checkpoint=Path(cfg.checkpoint) if cfg.checkpoint else None,
        device=str(device),
        precision=cfg.precision,
        allow_network=cfg.allow_network,
    )
    if request.checkpoint is not None and not request.checkpoint.is_file():
        raise InputError(f"{flags[1]} {cfg.checkpoint}: no such file")
    adapter = manager.first_result("mcaudit_load_model", spec=cfg.model, request=request)
    if adapter is None:
        raise InputError(f"{flags[0]} {cfg.model}: no loader claims this spec{manager.skipped_from('mcaudit_load_model')} "
                         "(see `mcaudit plugins` for the spec forms)")
    return adapter.to(device).eval()


def dataset_opener(manager: PluginManager, cfg: RunConfig, image_size, classes: list[str] | None, pixel_transform=None,
                   shared: SharedData | None = None):
    def open_dataset(spec: str, role: str = "audit", groups: tuple[str, ...] = ()) -> AuditDataset:
        opened = shared.get(spec, role, groups) if shared is not None else None
        if opened is not None:
            opened.image_size = tuple(image_size)
            opened.use_preprocessing(pixel_transform)
            return opened
        options = dict(cfg.data_options)
        if classes and role == "audit":
            # An OOD set's labels are never used, so they need not be the audited classes.
            options["classes"] = classes
        request = DataRequest(image_size=tuple(image_size), split=cfg.split, groups=groups, options=options, role=role)
        dataset = manager.first_result("mcaudit_load_dataset", spec=spec, request=request)
        if dataset is None:
            flag = "--ood" if role == "ood" else "--data"
            raise InputError(f"{flag} {spec}: no data format claims this{manager.skipped_from('mcaudit_load_dataset')} "
                             "(see `mcaudit plugins` for the formats)")
        # The model sees every image through its own preprocessing, whatever reads it first.
        dataset.use_preprocessing(pixel_transform)
        if shared is not None:
            shared.put(spec, role, groups, dataset)
        return dataset

    return open_dataset


class SharedData:
    """The data sets of a multi-model audit, opened once and shared by every model: each
    image is decoded once (kept in memory up to ``budget_bytes``) and every model sees the
    same images, in the same order, with the same failures."""

    def __init__(self, budget_bytes: int = 2 * 1024**3):
        self.budget_bytes = budget_bytes
        self.opened: dict[tuple[str, str, tuple[str, ...]], AuditDataset] = {}

    def get(self, spec: str, role: str, groups: tuple[str, ...]) -> AuditDataset | None:
        return self.opened.get((spec, role, tuple(groups)))

    def put(self, spec: str, role: str, groups: tuple[str, ...], dataset: AuditDataset) -> None:
        # the budget is shared: the audited set first, then the OOD set
        dataset.keep_decoded(max(0, self.budget_bytes - sum(d.kept_bytes for d in self.opened.values())))
        self.opened[(spec, role, tuple(groups))] = dataset


SMALL_MODEL_PARAMS = 10_000_000


def set_cpu_threads(threads: int, model: ModelAdapter, device: torch.device) -> None:
    """Intra-op threads for CPU work.

    A tiny model spends its time in per-operation overhead, where extra threads only add
    synchronisation (measured here: ten times slower with two threads on a busy two-core
    machine), so below SMALL_MODEL_PARAMS parameters one thread is the default.
    """
    if threads < 0:
        raise InputError(f"--threads {threads}: must be 0 (automatic) or more")
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)


def check_finite(forward, dataset: AuditDataset, class_features: torch.Tensor) -> None:
    """Metrics computed from NaN probabilities would read as a verdict; stop with the facts instead."""
    if not torch.isfinite(class_features).all():
        raise InputError("the model's text features are not finite (NaN or inf in the weights?): nothing can be scored")
    bad = ~torch.isfinite(forward.logits).all(dim=1).numpy()
    if bad.any():
        rows = np.flatnonzero(bad)
        where = ", ".join(dataset.records[forward.indices[r]].source for r in rows[:3])
        raise InputError(f"the model gave non-finite logits (NaN or inf) for {len(rows)} of {len(bad)} images "
                         f"(first: {where}); check the checkpoint's weights")


def run_checks(ctx: AuditContext, selected, show_progress: bool, store=None) -> tuple[dict[str, Any], dict[str, CheckResult]]:
    entries, results = {}, {}
    for name, (cls, params) in selected.items():
        kept = store.load(name, params) if store is not None else None  # --resume: finished before
        if kept is not None:
            entries[name], results[name] = kept
            continue
        start = time.perf_counter()
        entry: dict[str, Any] = {"description": cls.description, "params": params,
                                 "declared_metrics": list(cls.metrics)}
        try:
            torch.manual_seed(int(ctx.rng(f"torch:{name}").integers(0, 2**62)))
            result = cls().run(ctx, dict(params))
            if not isinstance(result, CheckResult):
                raise TypeError(f"check {name!r} returned {type(result).__name__}, not CheckResult")
            results[name] = result
            entry.update(result_entry(result))
        except InputError:
            raise  # a bad parameter or input is the user's to fix (exit 2), not a check failure
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one failing check must not stop the others
            entry.update(
                execution="error",
                status="error",
                summary=f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                error=traceback.format_exc(),
                metrics={},
            )
            if show_progress:
                print(f"mcaudit: check {name} failed: {entry['summary']}", file=sys.stderr)
        entry["duration_s"] = round(time.perf_counter() - start, 4)
        entries[name] = entry
        if store is not None and name in results:
            store.save(name, params, entry, results[name])
    return entries, results


@dataclass
class Plan:
    """What a run will do, settled before anything loads: checks with their parameters,
    thresholds and the gate policy."""

    selected: dict[str, tuple[type[Check], dict[str, Any]]]
    thresholds: list
    policy: Any


def plan_run(cfg: RunConfig, manager: PluginManager) -> Plan:
    """Every setting, parameter and threshold checked, so bad usage stops before the model loads."""
    if cfg.precision not in PRECISIONS:
        raise InputError(f"--precision {cfg.precision}: use one of {', '.join(PRECISIONS)}")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size {cfg.batch_size}: must be at least 1")
    check_run_settings(cfg)
    catalog = build_catalog(manager)
    if cfg.reference_checkpoint and not cfg.reference_model:
        raise InputError("--reference-checkpoint needs --reference-model")
    if cfg.reference_checkpoint and not Path(cfg.reference_checkpoint).is_file():
        raise InputError(f"--reference-checkpoint {cfg.reference_checkpoint}: no such file")
    if cfg.reference_model and "backdoor_scan" in catalog.checks:
        scan = cfg.check_params.setdefault("backdoor_scan", {})
        scan.setdefault("reference_model", cfg.reference_model)
        scan.setdefault("reference_checkpoint", cfg.reference_checkpoint or "")
    selected = select_checks(catalog, cfg)
    defaults = {f"{n}.{m}": v for n, (cls, _) in selected.items() for m, v in cls.default_thresholds.items()}
    # Thresholds decide every check's status on every run; --gate only makes them the exit code.
    policy_table: dict[str, Any] = dict(cfg.gate_policy)
    thresholds = collect_thresholds(cfg.gate, cfg.thresholds, defaults, cfg.config_file or "config", policy_table)
    policy = gate_policy(policy_table, strict=cfg.strict, source=cfg.config_file or "gate file")
    known_checks = ", ".join(selected) or "none"
    for t in thresholds:
        if t.check not in selected and t.source != "default":
            raise InputError(f"threshold {t.name!r} ({t.source}): no check {t.check!r} in this run (checks: {known_checks})")
    if cfg.gate is not None and not thresholds:
        raise InputError("--gate: no thresholds apply (the selected checks have no default thresholds and no "
                         "[thresholds] were found): pass --gate FILE")
    return Plan(selected, thresholds, policy)


def choose_prompts(prompts: PromptSet, model: ModelAdapter, dataset: AuditDataset) -> PromptSet:
    """--prompts when given (covering every class), else those a model folder ships when they
    cover the data's classes, else the generic medical templates."""
    if prompts.classes:
        missing = [c for c in dataset.classes if c not in prompts.phrasings]
        if missing:
            raise InputError(f"{prompts.source}: no prompts for class {missing[0]!r} (classes: {', '.join(dataset.classes)})")
    elif getattr(model, "default_prompts", None) is not None:
        shipped = load_prompts(model.default_prompts)
        if set(dataset.classes) <= set(shipped.phrasings):
            prompts = shipped
    return prompts


def build_context(cfg: RunConfig, manager: PluginManager, show: bool, cache=None,
                  shared: SharedData | None = None) -> AuditContext:
    """Load the model and data, run the shared forward pass, and give checks their context."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    device = local_device(resolve_device(cfg.device))
    world = init_from_env(device)
    model = load_model(manager, cfg, device)
    set_cpu_threads(cfg.threads, model, device)
    requested = load_prompts(Path(cfg.prompts) if cfg.prompts else None)
    open_dataset = dataset_opener(manager, cfg, model.image_size, requested.classes or None, model.pixel_transform, shared)
    dataset = open_dataset(cfg.data, "audit", tuple(cfg.groups))
    # A bad --ood is a usage error now, not a check error later; the check reuses this one.
    opened_ood = {cfg.ood: open_dataset(cfg.ood, "ood", ())} if cfg.ood else {}
    prompts = choose_prompts(requested, model, dataset)
    with torch.inference_mode():
        class_features = model.class_text_features(prompts.class_prompts(dataset.classes)).float()
    forward = run_forward(
        model, dataset, class_features,
        batch_size=cfg.batch_size, precision=cfg.precision, workers=cfg.workers,
        strict=cfg.strict, show_progress=show and world.is_main, world=world, cache=cache,
    )
    check_finite(forward, dataset, class_features)

    def load_other(spec: str, checkpoint: str | None = None) -> ModelAdapter:
        return load_model(manager, replace(cfg, model=spec, checkpoint=checkpoint), device,
                          ("--reference-model", "--reference-checkpoint"))

    return AuditContext(
        model=model, dataset=dataset, prompts=prompts, class_features=class_features,
        forward=forward, device=device, precision=cfg.precision, batch_size=cfg.batch_size,
        seed=cfg.seed, workers=cfg.workers, show_progress=show,
        options={"ood": cfg.ood, "reference_model": cfg.reference_model,
                 "reference_checkpoint": cfg.reference_checkpoint, "allow_network": cfg.allow_network},
        open_dataset=lambda spec: opened_ood.get(spec) or open_dataset(spec, "ood", ()),
        world=world, model_loader=load_other, strict=cfg.strict,
    )


def run_audit(cfg: RunConfig, manager: PluginManager, shared: SharedData | None = None) -> AuditRun:
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    show = not cfg.quiet
    plan = plan_run(cfg, manager)
    cache = cache_for_run(cfg, show)
    ctx = build_context(cfg, manager, show, cache, shared)
    entries, check_results = run_checks(ctx, plan.selected, show, store_for_run(cfg, ctx, cache))
    finished = dt.datetime.now(dt.timezone.utc)
    results = {
        "schema_version": SCHEMA_VERSION,
        "mcaudit_version": __version__,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 3),
        **describe_run(cfg, manager, ctx),
        "checks": entries,
    }
    apply_gate(results, plan.thresholds, gated=cfg.gate is not None, policy=plan.policy)
    results["environment"]["cpu_threads"] = torch.get_num_threads()
    if ctx.world.active:
        results["environment"]["world_size"] = ctx.world.size
    return AuditRun(results=results, check_results=check_results, context=ctx, world=ctx.world)
