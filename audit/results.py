"""What results.json holds about a run: each check's entry (made JSON-safe: numpy and torch
values become plain numbers, non-finite numbers become null, intervals that are not finite
are left out) and the account of the model, data, prompts, settings, environment and
plugins behind the numbers."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mcaudit import __version__
from mcaudit.check_api import CheckResult

if TYPE_CHECKING:
    from mcaudit.config import RunConfig
    from mcaudit.context import AuditContext
    from mcaudit.plugin_manager import PluginManager


def result_entry(result: CheckResult) -> dict[str, Any]:
    if result.status not in ("ok", "skipped"):
        raise ValueError(f"CheckResult.status must be 'ok' or 'skipped', not {result.status!r}: "
                         "the host derives pass/fail from thresholds and findings")
    intervals = {k: [float(a), float(b)] for k, (a, b) in result.intervals.items()
                 if np.isfinite(float(a)) and np.isfinite(float(b))}
    return {
        "execution": "completed" if result.status == "ok" else "skipped",
        "summary": result.summary,
        "metrics": result.clean_metrics(),
        "intervals": intervals,
        "sample_size": None if result.sample_size is None else int(result.sample_size),
        "n": {k: int(v) for k, v in result.n.items()},
        "counts": {k: [int(a), int(b)] for k, (a, b) in result.counts.items()},
        "not_evaluated": {k: str(v) for k, v in result.not_evaluated.items()},
        "interval_methods": {k: str(v) for k, v in result.interval_methods.items()}
        | {k: str(v) for k, v in (result.details.get("interval_methods") or {}).items() if k not in result.interval_methods},
        "findings": [{"status": f.status, "message": f.message, "metric": f.metric, "severity": float(f.severity)}
                     for f in result.findings],
        "warnings": list(result.warnings),
        "tables": [{"title": t.title, "columns": t.columns, "rows": _jsonable(t.rows), "note": t.note} for t in result.tables],
        "figures": [{"title": f.title, "caption": f.caption, "data_uri": f.data_uri} for f in result.figures],
        "details": _jsonable(result.details),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def environment(device: torch.device, precision: str) -> dict[str, Any]:
    import open_clip

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "numpy": np.__version__,
        "mcaudit": __version__,
        "device": str(device),
        "precision": precision,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def describe_run(cfg: RunConfig, manager: PluginManager, ctx: AuditContext) -> dict[str, Any]:
    """results.json's account of what was audited, with what, where."""
    model, dataset, forward = ctx.model, ctx.dataset, ctx.forward
    return {
        "model": {
            "spec": cfg.model,
            "checkpoint": cfg.checkpoint,
            "loader": model.loader,
            "weights_sha256": model.weights_sha256,
            "image_size": list(model.image_size),
            "logit_scale": model.logit_scale,
        },
        "dataset": {
            "spec": cfg.data,
            "format": dataset.format_name,
            "sha256": dataset.fingerprint,
            "images": len(forward),
            "listed": len(dataset),
            "skipped": len(forward.failures),
            "skipped_images": [
                {"source": dataset.records[i].source, "error": err} for i, err in forward.failures[:1000]
            ],
            "classes": dataset.classes,
            "class_counts": {c: int((forward.labels == k).sum()) for k, c in enumerate(dataset.classes)},
            "group_columns": list(dataset.group_columns),
            "grey": ctx.is_grey,
            "warnings": dataset.warnings,
        },
        "prompts": {
            "source": ctx.prompts.source,
            "classes": {c: p for c, p in zip(dataset.classes, ctx.prompts.class_prompts(dataset.classes))},
        },
        "config": _jsonable(cfg.public()),
        "environment": environment(ctx.device, cfg.precision),
        "plugins": {
            "loaded": [{"name": n, "source": manager.sources.get(n, "")} for n in manager.plugin_names()],
            "failed": [{"name": f.name, "source": f.source, "error": f.error} for f in manager.failed],
        },
    }
