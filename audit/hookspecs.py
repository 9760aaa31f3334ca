"""The mcaudit plugin API.

Every built-in feature (checks, model loaders, data formats, report sections) is a plugin
that implements these hooks, exactly as a third-party package would. A third-party plugin
is a module with functions decorated by :data:`mcaudit.hookimpl`, made known through the
``mcaudit`` entry-point group or loaded with ``mcaudit run -p MODULE``.

A hook implementation may take any subset of the arguments a spec lists, by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from mcaudit.check_api import Check
    from mcaudit.data.dataset import AuditDataset
    from mcaudit.models.adapter import ModelAdapter
    from mcaudit.hook_types import DataRequest, FormatInfo, LoaderInfo, ModelRequest, OutputFormat, ReportSection

hookspec = pluggy.HookspecMarker("mcaudit")


@hookspec
def mcaudit_register_checks(register: Callable[[type[Check]], None]) -> None:
    """Register audit checks.

    :param register: call ``register(CheckClass)`` once per :class:`mcaudit.Check` subclass.
        The class declares its ``name``, ``description``, ``params``, ``metrics`` and
        ``default_thresholds``; two checks with the same name are an error at start-up.
    """


@hookspec
def mcaudit_register_model_loaders(register: Callable[[LoaderInfo], None]) -> None:
    """Describe the model specs a plugin can load, for ``mcaudit plugins``.

    :param register: call ``register(LoaderInfo(name, spec_forms, description))``.
        Describing a loader does not load anything; :func:`mcaudit_load_model` does.
    """


@hookspec(firstresult=True)
def mcaudit_load_model(spec: str, request: ModelRequest) -> ModelAdapter | None:
    """Load the model named by ``spec`` and wrap it in a :class:`mcaudit.ModelAdapter`.

    :param spec: what the user typed after ``--model`` (``ViT-B-16``, ``hf-hub:org/name``,
        a folder, ``medclip:...``).
    :param request: checkpoint path, device, precision and whether the network may be used.
    :return: an adapter, or ``None`` when this plugin does not claim the spec. The first
        non-``None`` result wins; plugins registered later are asked first, so a third-party
        loader can claim a spec before the built-in open_clip loader sees it. Raise
        :class:`mcaudit.InputError` when the spec is yours but cannot be loaded.
    """


@hookspec
def mcaudit_register_data_formats(register: Callable[[FormatInfo], None]) -> None:
    """Describe the data formats a plugin can read, for ``mcaudit plugins``.

    :param register: call ``register(FormatInfo(name, spec_forms, description))``.
    """


@hookspec(firstresult=True)
def mcaudit_load_dataset(spec: str, request: DataRequest) -> AuditDataset | None:
    """Open the labelled image set named by ``spec``.

    :param spec: what the user typed after ``--data`` (a CSV manifest, a folder, an ``.npz``).
    :param request: the image size the model expects, the split, the subgroup columns asked
        for and the format options.
    :return: an :class:`mcaudit.AuditDataset`, or ``None`` when the spec is not in this
        plugin's format. The first non-``None`` result wins.
    """


@hookspec
def mcaudit_report_sections(results: dict[str, Any]) -> list[ReportSection] | None:
    """Add content to the HTML report.

    :param results: the parsed ``results.json`` of the run being rendered.
    :return: a list of :class:`mcaudit.ReportSection` (a title and trusted HTML that the
        plugin must escape itself), or ``None``. Sections appear after the checks.
    """


@hookspec
def mcaudit_register_output_formats(register: Callable[[OutputFormat], None]) -> None:
    """Add output formats a run can write besides results.json, samples.csv and the report.

    :param register: call ``register(OutputFormat(name, description, render))``; the user
        asks for one with ``--output NAME=PATH`` (JUnit and Markdown are registered this way,
        as ``junit`` and ``markdown``). ``render(results)`` gets the run's results (what
        results.json holds, verdict included) and returns the file's text or bytes.
    """
