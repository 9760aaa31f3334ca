"""Build a fresh plugin manager for each run.

Order of registration matters for first-result hooks: pluggy calls the most recently
registered implementation first, so built-ins go in first and third-party plugins after,
which lets a third-party loader claim a spec before the built-in one.

A broken plugin is reported and skipped: one that fails to import, and one whose hook raises
anything but :class:`~mcaudit.InputError` (the plugin is unregistered, so none of its hooks
runs again, and the next plugin is asked). An InputError is the user's to fix and stays one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import pluggy

from mcaudit import hookspecs
from mcaudit.errors import InputError, PluginError

ENTRY_POINT_GROUP = "mcaudit"
DISABLE_AUTOLOAD_ENV = "MCAUDIT_DISABLE_PLUGIN_AUTOLOAD"

# Short name -> module. Every built-in feature is registered through these, with the same
# hooks a third-party plugin uses.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("openclip", "mcaudit.plugins.loaders.openclip"),
    ("hf-clip", "mcaudit.plugins.loaders.hf_clip"),
    ("formats", "mcaudit.plugins.formats.image_sets"),
    ("outputs", "mcaudit.plugins.outputs"),
    ("performance", "mcaudit.plugins.checks.performance"),
    ("calibration", "mcaudit.plugins.checks.calibration"),
    ("fairness", "mcaudit.plugins.checks.fairness"),
    ("anomaly", "mcaudit.plugins.checks.anomaly"),
    ("abnormality", "mcaudit.plugins.checks.abnormality"),
    ("adversarial", "mcaudit.plugins.checks.adversarial"),
    ("prompt_robustness", "mcaudit.plugins.checks.prompt_robustness"),
    ("certified", "mcaudit.plugins.checks.certified"),
    ("shift", "mcaudit.plugins.checks.shift"),
    ("backdoor", "mcaudit.plugins.checks.backdoor"),
    ("backdoor_scan", "mcaudit.plugins.checks.backdoor_scan"),
    ("saliency", "mcaudit.plugins.checks.saliency"),
)


@dataclass
class FailedPlugin:
    name: str
    source: str
    error: str
    hook: str = ""  # the hook that raised; empty when the plugin failed to import


@dataclass
class PluginManager:
    """pluggy's manager plus what mcaudit needs to report about loading."""

    pm: pluggy.PluginManager
    failed: list[FailedPlugin] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # found while loading; the CLI prints them
    quiet: bool = False  # no warning on stderr when a hook fails during the run

    @property
    def hook(self):
        return self.pm.hook

    def plugin_names(self) -> list[str]:
        # blocked names stay in the registry with a None plugin
        return [name for name, plugin in self.pm.list_name_plugin() if plugin is not None]

    def skip(self, name: str, hook: str, exc: BaseException) -> None:
        """Report a plugin whose ``hook`` raised and unregister it for the rest of the run."""
        error = f"its {hook} hook raised {_one_line(exc)}"
        self.failed.append(FailedPlugin(name, self.sources.get(name, ""), error, hook))
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        if not self.quiet:
            print(f"mcaudit: warning: plugin {name} failed and was skipped: {error}", file=sys.stderr)

    def first_result(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a first-result hook as pluggy does (latest registered first, first non-None
        result wins), except that a plugin that raises is skipped and the next one asked."""
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        if any(getattr(i, "wrapper", False) or getattr(i, "hookwrapper", False) for i in impls):
            return caller(**kwargs)  # a wrapper needs pluggy's own call loop
        for impl in reversed(impls):  # pluggy's call order
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            except InputError:
                raise
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin must not end the run
                self.skip(impl.plugin_name, hook_name, exc)
                continue
            if result is not None:
                return result
        return None

    def skipped_from(self, hook: str) -> str:
        """For a message: which plugins ``hook`` skipped and why, or '' when none."""
        failed = [f"{f.name}: {f.error}" for f in self.failed if f.hook == hook]
        return f" (skipped after an error: {'; '.join(failed)})" if failed else ""


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
    load = list(load)
    entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    _block(manager, block, entry_points, load)
    for name, module_name in DEFAULT_PLUGINS:
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(module_name), name=name)
            manager.sources[name] = "builtin"
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        for ep in entry_points:
            if not (pm.is_blocked(ep.name) or pm.has_plugin(ep.name)):
                _register_entry_point(manager, ep)
    for spec in load:
        _register_loaded(manager, spec)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {_plugin_name(pm, exc)!r}: {_one_line(exc)}") from exc
    return manager


def _block(manager: PluginManager, block: Iterable[str], entry_points, load: list[str]) -> None:
    # -p no: takes a plugin's name, its module or its .py file; each known plugin is
    # (name, module) here, so that any of the three blocks it.
    known = list(DEFAULT_PLUGINS) + [(ep.name, ep.value.split(":")[0]) for ep in entry_points]
    known += [(_load_name(spec), _load_name(spec)) for spec in load]
    for wanted in block:
        key = _load_name(wanted)
        names = [name for name, module in known if key in (name, module)]
        if not names:
            manager.warnings.append(
                f"-p no:{wanted}: no plugin has this name or module, so nothing was blocked "
                f"(plugins: {', '.join(name for name, _ in known)})")
        for name in names or [key]:
            manager.pm.set_blocked(name)


def _register_entry_point(manager: PluginManager, ep) -> None:
    # One broken plugin must not take the others down with it.
    try:
        plugin = ep.load()
        manager.pm.register(plugin, name=ep.name)
        manager.sources[ep.name] = f"entry point {ep.value}"
        manager.warnings.extend(_unmarked_hooks(ep.name, plugin))
    except Exception as exc:  # noqa: BLE001 - any import failure is reported
        manager.failed.append(FailedPlugin(ep.name, f"entry point {ep.value}", _one_line(exc)))
        traceback.clear_frames(exc.__traceback__)


def _register_loaded(manager: PluginManager, spec: str) -> None:
    """A ``-p`` module: unlike an entry point, one the user named must load, or the run stops."""
    pm, name = manager.pm, _load_name(spec)
    if pm.is_blocked(name) or pm.has_plugin(name):
        return
    try:
        module = _import_plugin(spec)
    except PluginError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"-p {spec}: could not import plugin: {_one_line(exc)}") from exc
    if pm.is_registered(module):
        return  # e.g. -p mcaudit.plugins.checks.performance, already registered as a built-in
    try:
        pm.register(module, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"-p {spec}: {_one_line(exc)}") from exc
    manager.sources[name] = f"-p {spec}"
    manager.warnings.extend(_unmarked_hooks(name, module))


def _load_name(spec: str) -> str:
    """The name a ``-p`` plugin is registered under: its module, or a .py file's stem."""
    return Path(spec).stem if spec.endswith(".py") else spec


def _unmarked_hooks(name: str, plugin: Any) -> list[str]:
    """Functions named like hooks that pluggy will never call, for want of @hookimpl."""
    own = getattr(plugin, "__name__", None) if inspect.ismodule(plugin) else None
    found = []
    for attr in sorted(dir(plugin)):
        if not attr.startswith("mcaudit_"):
            continue
        obj = getattr(plugin, attr, None)
        if not (inspect.isfunction(obj) or inspect.ismethod(obj)) or hasattr(obj, "mcaudit_impl"):
            continue
        if own is not None and getattr(obj, "__module__", None) != own:
            continue  # imported from elsewhere, not this plugin's
        found.append(f"plugin {name}: {attr} is not decorated with @hookimpl, so mcaudit never calls it")
    return found


def _plugin_name(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> str:
    plugin = getattr(exc, "plugin", None)
    return pm.get_name(plugin) or str(plugin) if plugin is not None else "?"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
