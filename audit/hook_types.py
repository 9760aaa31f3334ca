"""Small value types passed through the hooks in :mod:`mcaudit.hookspecs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class LoaderInfo:
    """A model loader as ``mcaudit plugins`` lists it."""

    name: str
    spec_forms: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class FormatInfo:
    """A data format as ``mcaudit plugins`` lists it."""

    name: str
    spec_forms: tuple[str, ...]
    description: str


@dataclass
class ModelRequest:
    """What a model loader is asked for besides the spec."""

    checkpoint: Path | None = None
    device: str = "cpu"
    precision: str = "fp32"
    allow_network: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataRequest:
    """What a data format is asked for besides the spec.

    ``image_size`` is the model's (height, width). A data format only decodes images; the host
    then gives each one to the model's own preprocessing (``ModelAdapter.pixel_transform``:
    open_clip's eval transform, the transformers image processor, or a loader plugin's own,
    stopped before normalisation), so checks work on [0, 1] pixels at the model's size and the
    normalisation stays inside the adapter. A loader that gives no transform gets a bicubic
    resize and centre crop in pixel space.
    """

    image_size: tuple[int, int] = (224, 224)
    split: str = "test"
    groups: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    role: str = "audit"  # "audit" for the audited set, "ood" for an out-of-distribution set


@dataclass(frozen=True)
class OutputFormat:
    """An extra output a run can write (``--output NAME=PATH``): JUnit, Markdown, SARIF, a
    model card. ``render`` turns the run's results (the content of results.json) into the
    file's text or bytes; the host writes it atomically."""

    name: str
    description: str
    render: Callable[[dict[str, Any]], str | bytes]


@dataclass
class ReportSection:
    """Extra content for the HTML report. ``html`` is inserted as is: escape user data."""

    title: str
    html: str
    anchor: str = ""
