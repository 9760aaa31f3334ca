"""What the loaded plugins offer: checks, model loaders and data formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from mcaudit.checks import Check
from mcaudit.errors import PluginError
from mcaudit.plugin_manager import PluginManager
from mcaudit.registry import FormatInfo, LoaderInfo, OutputFormat


@dataclass
class Catalog:
    checks: dict[str, type[Check]]
    check_plugins: dict[str, str]
    loaders: list[tuple[str, LoaderInfo]]
    formats: list[tuple[str, FormatInfo]]
    outputs: dict[str, tuple[str, OutputFormat]] = field(default_factory=dict)


def build_catalog(manager: PluginManager) -> Catalog:
    checks: dict[str, type[Check]] = {}
    owners: dict[str, str] = {}
    loaders: list[tuple[str, LoaderInfo]] = []
    formats: list[tuple[str, FormatInfo]] = []
    outputs: dict[str, tuple[str, OutputFormat]] = {}
    pm = manager.pm
    for plugin_name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked with -p no:NAME
            continue
        hooks = {hc.name for hc in pm.get_hookcallers(plugin) or []}

        def add_check(cls: type[Check], _owner=plugin_name) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Check)):
                raise PluginError(f"plugin {_owner!r} registered {cls!r}, which is not a mcaudit.Check subclass")
            if not cls.name:
                raise PluginError(f"plugin {_owner!r} registered check class {cls.__name__} without a name")
            if cls.name in checks:
                raise PluginError(
                    f"check {cls.name!r} is registered twice (by {owners[cls.name]!r} and {_owner!r})"
                )
            checks[cls.name] = cls
            owners[cls.name] = _owner

        if "mcaudit_register_checks" in hooks:
            _call_one(pm, plugin, "mcaudit_register_checks", register=add_check)
        if "mcaudit_register_model_loaders" in hooks:
            _call_one(pm, plugin, "mcaudit_register_model_loaders",
                      register=lambda info, _o=plugin_name: loaders.append((_o, info)))
        if "mcaudit_register_output_formats" in hooks:

            def add_output(fmt: OutputFormat, _owner=plugin_name) -> None:
                if not isinstance(fmt, OutputFormat):
                    raise PluginError(f"plugin {_owner!r} registered {fmt!r}, which is not a mcaudit.OutputFormat")
                if fmt.name in outputs:
                    raise PluginError(f"output format {fmt.name!r} is registered twice (by {outputs[fmt.name][0]!r} and {_owner!r})")
                outputs[fmt.name] = (_owner, fmt)

            _call_one(pm, plugin, "mcaudit_register_output_formats", register=add_output)
        if "mcaudit_register_data_formats" in hooks:
            _call_one(pm, plugin, "mcaudit_register_data_formats",
                      register=lambda info, _o=plugin_name: formats.append((_o, info)))
    return Catalog(checks, owners, loaders, formats, outputs)


def _call_one(pm, plugin, hook_name: str, **kwargs) -> None:
    # Calling per plugin (instead of the hook over all plugins) tells us who registered what.
    caller = getattr(pm.hook, hook_name)
    for impl in caller.get_hookimpls():
        if impl.plugin is plugin:
            impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
