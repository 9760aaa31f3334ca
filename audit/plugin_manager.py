"""Build a fresh plugin manager for each run.

Order of registration matters for first-result hooks: pluggy calls the most recently
registered implementation first, so built-ins go in first and third-party plugins after,
which lets a third-party loader claim a spec before the built-in one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterable

import pluggy

from mcaudit import hookspecs
from mcaudit.errors import PluginError

ENTRY_POINT_GROUP = "mcaudit"
DISABLE_AUTOLOAD_ENV = "MCAUDIT_DISABLE_PLUGIN_AUTOLOAD"

# Short name -> module. Every built-in feature is registered through these, with the same
# hooks a third-party plugin uses.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("openclip", "mcaudit.models.openclip_loader"),
    ("hf-clip", "mcaudit.models.hf_clip_loader"),
    ("formats", "mcaudit.data.formats"),
    ("outputs", "mcaudit.reports.outputs"),
    ("performance", "mcaudit.plugins.performance"),
    ("calibration", "mcaudit.plugins.calibration"),
    ("fairness", "mcaudit.plugins.fairness"),
    ("anomaly", "mcaudit.plugins.anomaly"),
    ("adversarial", "mcaudit.plugins.adversarial"),
    ("prompt_robustness", "mcaudit.plugins.prompt_robustness"),
    ("certified", "mcaudit.plugins.certified"),
    ("backdoor", "mcaudit.plugins.backdoor"),
    ("backdoor_scan", "mcaudit.plugins.backdoor_scan"),
    ("saliency", "mcaudit.plugins.saliency"),
)


@dataclass
class FailedPlugin:
    name: str
    source: str
    error: str


@dataclass
class PluginManager:
    """pluggy's manager plus what mcaudit needs to report about loading."""

    pm: pluggy.PluginManager
    failed: list[FailedPlugin] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def hook(self):
        return self.pm.hook

    def plugin_names(self) -> list[str]:
        # blocked names stay in the registry with a None plugin
        return [name for name, plugin in self.pm.list_name_plugin() if plugin is not None]


def _import_plugin(spec: str) -> ModuleType:
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise PluginError(f"-p {spec}: no such plugin file")
        mod_name = f"mcaudit_local_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def make_plugin_manager(
    load: Iterable[str] = (),
    block: Iterable[str] = (),
    autoload: bool | None = None,
) -> PluginManager:
    """Create a plugin manager with built-ins, entry-point plugins and ``-p`` modules.

    :param load: modules (dotted names or ``.py`` paths) given with ``-p``.
    :param block: plugin names given with ``-p no:NAME``; built-in names are the short names
        in :data:`DEFAULT_PLUGINS`, entry-point plugins are blocked by entry-point name.
    :param autoload: load ``mcaudit`` entry points; defaults to on unless
        ``MCAUDIT_DISABLE_PLUGIN_AUTOLOAD`` is set.
    """
    pm = pluggy.PluginManager("mcaudit")
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm)
    for name in block:
        pm.set_blocked(name)

    for name, module_name in DEFAULT_PLUGINS:
        if pm.is_blocked(name):
            continue
        pm.register(importlib.import_module(module_name), name=name)
        manager.sources[name] = "builtin"

    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            # One broken plugin must not take the others down with it.
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                manager.sources[ep.name] = f"entry point {ep.value}"
            except Exception as exc:  # noqa: BLE001 - any import failure is reported
                manager.failed.append(
                    FailedPlugin(ep.name, f"entry point {ep.value}", _one_line(exc))
                )
                traceback.clear_frames(exc.__traceback__)

    for spec in load:
        name = Path(spec).stem if spec.endswith(".py") else spec
        if pm.is_blocked(name) or pm.has_plugin(name):
            continue
        try:
            module = _import_plugin(spec)
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise PluginError(f"-p {spec}: could not import plugin: {_one_line(exc)}") from exc
        if pm.is_registered(module):
            continue  # e.g. -p mcaudit.plugins.performance, already registered as a built-in
        try:
            pm.register(module, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"-p {spec}: {_one_line(exc)}") from exc
        manager.sources[name] = f"-p {spec}"

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {_plugin_name(pm, exc)!r}: {_one_line(exc)}") from exc
    return manager


def _plugin_name(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> str:
    plugin = getattr(exc, "plugin", None)
    return pm.get_name(plugin) or str(plugin) if plugin is not None else "?"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
