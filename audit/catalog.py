"""What the loaded plugins offer: checks, model loaders and data formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from mcaudit.check_api import Check
from mcaudit.errors import InputError, PluginError
from mcaudit.plugin_manager import PluginManager
from mcaudit.hook_types import FormatInfo, LoaderInfo, OutputFormat


@dataclass
class Catalog:
    checks: dict[str, type[Check]]
    check_plugins: dict[str, str]
    loaders: list[tuple[str, LoaderInfo]]
    formats: list[tuple[str, FormatInfo]]
    outputs: dict[str, tuple[str, OutputFormat]] = field(default_factory=dict)


def build_catalog(manager: PluginManager) -> Catalog:
    """What each plugin registers. A plugin whose register hook raises is reported and skipped
    with nothing of it kept; a conflict between plugins (a check name taken twice, a class that
    is not a Check) is a PluginError, since which of the two to keep is the user's choice."""
    catalog = Catalog({}, {}, [], [])
    pm = manager.pm
    for plugin_name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked with -p no:NAME
            continue
        hooks = {hc.name for hc in pm.get_hookcallers(plugin) or []}
        own = Catalog({}, {}, [], [])

        def add_check(cls: type[Check], _owner=plugin_name, _own=own) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Check)):
                raise PluginError(f"plugin {_owner!r} registered {cls!r}, which is not a mcaudit.Check subclass")
            if not cls.name:
                raise PluginError(f"plugin {_owner!r} registered check class {cls.__name__} without a name")
            if cls.name in catalog.checks or cls.name in _own.checks:
                first = catalog.check_plugins.get(cls.name) or _own.check_plugins[cls.name]
                raise PluginError(f"check {cls.name!r} is registered twice (by {first!r} and {_owner!r})")
            _own.checks[cls.name] = cls
            _own.check_plugins[cls.name] = _owner

        def add_output(fmt: OutputFormat, _owner=plugin_name, _own=own) -> None:
            if not isinstance(fmt, OutputFormat):
                raise PluginError(f"plugin {_owner!r} registered {fmt!r}, which is not a mcaudit.OutputFormat")
            taken = catalog.outputs.get(fmt.name) or _own.outputs.get(fmt.name)
            if taken:
                raise PluginError(f"output format {fmt.name!r} is registered twice (by {taken[0]!r} and {_owner!r})")
            _own.outputs[fmt.name] = (_owner, fmt)

        registers = {
            "mcaudit_register_checks": add_check,
            "mcaudit_register_model_loaders": lambda info, _o=plugin_name, _own=own: _own.loaders.append((_o, info)),
            "mcaudit_register_output_formats": add_output,
            "mcaudit_register_data_formats": lambda info, _o=plugin_name, _own=own: _own.formats.append((_o, info)),
        }
        try:
            for hook_name, register in registers.items():
                if hook_name in hooks:
                    _call_one(pm, plugin, hook_name, register=register)
        except InputError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken plugin must not end the run
            manager.skip(plugin_name, hook_name, exc)
            continue
        catalog.checks.update(own.checks)
        catalog.check_plugins.update(own.check_plugins)
        catalog.loaders.extend(own.loaders)
        catalog.formats.extend(own.formats)
        catalog.outputs.update(own.outputs)
    return catalog


def _call_one(pm, plugin, hook_name: str, **kwargs) -> None:
    # Calling per plugin (instead of the hook over all plugins) tells us who registered what.
    caller = getattr(pm.hook, hook_name)
    for impl in caller.get_hookimpls():
        if impl.plugin is plugin:
            impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
