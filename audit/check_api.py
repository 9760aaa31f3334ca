"""The shape every audit check has, built-in or third-party.

A check is a class with declarative metadata (what it measures, its parameters with their
defaults, the metrics it reports and its default gate thresholds) and one method,
:meth:`Check.run`, that turns an :class:`mcaudit.AuditContext` into a :class:`CheckResult`.
"""

from __future__ import annotations

import abc
import base64
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from mcaudit.verdict import Finding

if TYPE_CHECKING:
    from mcaudit.context import AuditContext


PROFILES = {
    "quick": "small subsamples and few steps: a smoke test that fits a CI runner without a GPU; "
             "robustness numbers come with wide intervals and are often inconclusive",
    "standard": "sized for a real audit on a GPU: the main robustness numbers have 95% interval "
                "half-widths of about 0.05",
    "thorough": "larger samples, more steps and restarts, for a release decision",
}


@dataclass(frozen=True)
class Param:
    """A check parameter: its default value (which also fixes its type) and what it means.

    Declarative bounds are checked for every selected check before the model loads, so a bad
    value is a usage error (exit 2) rather than a check error after the forward pass:
    ``choices`` (allowed values; for a list, allowed elements), ``min`` and ``max`` (inclusive;
    for a list, each element), ``above`` and ``below`` (exclusive: ``above=0`` for a learning
    rate, ``above=0, below=1`` for a fraction), ``nonempty`` (a list needs at least one
    element), and ``validate`` (a function that raises ``InputError`` or ``ValueError`` for
    anything the bounds cannot say).
    """

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    nonempty: bool = False
    validate: Callable[[Any], Any] | None = None
    split_commas: bool | None = None  # None: split "a,b" for a list whose default has elements

    def coerce(self, value: Any, where: str) -> Any:
        from mcaudit.errors import InputError

        default = self.default
        if isinstance(default, (list, tuple)):
            split = self.split_commas if self.split_commas is not None else bool(default)
            if isinstance(value, str) and "," in value and split:
                value = [_literal(v) for v in value.split(",") if v.strip()]  # --set x.sigmas=0.1,0.2
            elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise InputError(f"{where}: expected a list like {default!r}, got {value!r}")
            value = list(value)
            if self.nonempty and not value:
                raise InputError(f"{where}: give at least one value")
            # Numeric lists are typed by their default's elements; a list of strings may also
            # hold numbers (budgets are written "4/255" or 0.0157).
            if default and isinstance(default[0], (int, float)):
                value = [_coerce_scalar(default[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
            for i, v in enumerate(value):
                self._check_bounds(v, f"{where}[{i}]")
        else:
            value = _coerce_scalar(default, value, where)
            self._check_bounds(value, where)
        if self.validate is not None:
            try:
                result = self.validate(value)
            except ValueError as exc:
                raise InputError(f"{where}: {exc}") from None
            if result is not None:
                value = result
        return value

    def _check_bounds(self, value: Any, where: str) -> None:
        from mcaudit.errors import InputError

        if self.choices is not None and value not in self.choices:
            raise InputError(f"{where}: {value!r} is not one of {list(self.choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.min is not None and value < self.min:
                raise InputError(f"{where}: {value!r} is below the minimum {self.min:g}")
            if self.max is not None and value > self.max:
                raise InputError(f"{where}: {value!r} is above the maximum {self.max:g}")
            if self.above is not None and not value > self.above:
                raise InputError(f"{where}: {value!r} must be above {self.above:g}")
            if self.below is not None and not value < self.below:
                raise InputError(f"{where}: {value!r} must be below {self.below:g}")


def _literal(text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def _coerce_scalar(default: Any, value: Any, where: str) -> Any:
    from mcaudit.errors import InputError

    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    if not ok:
        raise InputError(f"{where}: expected a {type(default).__name__} like {default!r}, got {value!r}")
    return value


@dataclass
class Table:
    """A table for the report; cells are plain values that the renderer escapes."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Figure:
    """An image for the report: PNG bytes, embedded as a data URI so the report stays one file."""

    title: str
    png: bytes
    caption: str = ""

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class GalleryItem:
    """One case in a check's drill-down: small pictures of it, each ``(caption, bytes)`` with
    the bytes a JPEG, WebP or PNG (``mcaudit.reports.plots.thumbnail`` makes one from pixels),
    its true label, the model's prediction and confidence, and further lines a reader needs
    ("after the attack: pneumonia, 97%")."""

    pictures: list[tuple[str, bytes]]
    label: str
    prediction: str
    confidence: float | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Gallery:
    """Cases a reader should look at, shown as thumbnails in the check's section of the report.
    Each picture becomes a file under the run's ``figures/thumbs/``, so keep galleries to a
    handful of items with thumbnails of about 100 px."""

    title: str
    items: list[GalleryItem]
    note: str = ""


@dataclass
class CheckResult:
    """What a check returns.

    ``metrics`` is a flat map from metric name to number; it is what gates read and what
    results.json stores. ``intervals`` maps some of those names to (low, high) 95% confidence
    bounds, which thresholds decide on (see :mod:`mcaudit.gating`); ``interval_methods`` names
    how each was made ("Wilson", "bootstrap over patients", ...), shown beside it. ``sample_size`` is the
    number of images behind the metrics, ``n`` overrides it per metric, and ``counts`` gives a
    proportion's (successes, trials), shown as "5 of 390". ``not_evaluated`` maps a metric
    that cannot be computed on this run to the reason, so a threshold on it reads "not
    evaluated" with that reason rather than passing or vanishing. ``findings`` are the check's
    own conclusions that no threshold captures (:class:`mcaudit.Finding`, warn or fail).
    ``details`` holds any further JSON-serialisable data. ``per_image`` adds columns to
    samples.csv (named ``check.column``): one value per row of the shared forward pass, with
    ``None`` for images the check did not look at.
    ``galleries`` are the images behind the numbers (:class:`Gallery`), shown as thumbnails.

    A check never sets its own pass/fail status: the host derives it from the thresholds and
    findings. ``status`` is only "ok" (it ran) or "skipped" (it does not apply to this data,
    which makes every threshold on it not evaluated).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    summary: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    per_image: dict[str, Any] = field(default_factory=dict)  # column -> values per forward row
    status: str = "ok"  # "ok", or "skipped" when the check does not apply to this data
    findings: list[Finding] = field(default_factory=list)
    sample_size: int | None = None
    n: dict[str, int] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    not_evaluated: dict[str, str] = field(default_factory=dict)
    interval_methods: dict[str, str] = field(default_factory=dict)  # metric -> how its interval was made
    galleries: list[Gallery] = field(default_factory=list)  # the cases behind the numbers, as thumbnails

    def warn(self, message: str, metric: str | None = None, severity: float = 1.0) -> None:
        """Raise a warning finding (and list it among the check's caveats)."""
        self.findings.append(Finding("warn", message, metric, severity))

    def fail(self, message: str, metric: str | None = None, severity: float = 1.0) -> None:
        """Raise a failing finding."""
        self.findings.append(Finding("fail", message, metric, severity))

    @classmethod
    def skipped(cls, reason: str) -> "CheckResult":
        return cls(status="skipped", summary=reason)

    def clean_metrics(self) -> dict[str, float | None]:
        # JSON has no NaN/inf: an undefined metric is stored as null.
        out: dict[str, float | None] = {}
        for key, value in self.metrics.items():
            value = float(value)
            out[key] = value if math.isfinite(value) else None
        return out


class Check(abc.ABC):
    """Base class for audit checks.

    Subclasses set the class attributes and implement :meth:`run`.

    ``default_thresholds`` maps a metric (``*`` allowed) to a rule string (">= 0.5") or a table
    (``{"rule": "> chance_level", "on": "lower"}``; see :mod:`mcaudit.gating`). They decide the
    check's status on every run and gate it under ``--gate``; ``threshold_reasons`` says, per
    threshold, why that bound was chosen (shown by ``mcaudit plugins``).

    ``profiles`` maps a profile name (``quick``, ``standard``, ``thorough``; see
    :data:`PROFILES`) to the parameter values it sets, so one ``--profile`` sizes every
    check's subsamples, steps and restarts together. ``standard`` is what the plain
    parameter defaults should be; ``--set`` overrides any profile value.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    metrics: ClassVar[dict[str, str]] = {}
    default_thresholds: ClassVar[dict[str, Any]] = {}
    threshold_reasons: ClassVar[dict[str, str]] = {}
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}

    @abc.abstractmethod
    def run(self, ctx: AuditContext, params: dict[str, Any]) -> CheckResult:
        """Run the check on one audit; ``params`` are resolved against :attr:`params`."""

    @classmethod
    def profile_params(cls, profile: str) -> dict[str, Any]:
        """The parameter values ``profile`` sets for this check (empty for an unknown name)."""
        return dict(cls.profiles.get(profile, {}))

    @classmethod
    def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        from mcaudit.errors import InputError

        unknown = sorted(set(given) - set(cls.params))
        if unknown:
            known = ", ".join(sorted(cls.params)) or "none"
            raise InputError(
                f"check {cls.name!r} has no parameter {unknown[0]!r} (its parameters: {known})"
            )
        resolved = {}
        for key, param in cls.params.items():
            value = given.get(key, param.default)
            resolved[key] = param.coerce(value, f"{cls.name}.{key}")
        return resolved

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "description": cls.description,
            "params": {
                k: {"default": p.default, "help": p.help}
                | ({"choices": list(p.choices)} if p.choices else {})
                for k, p in cls.params.items()
            },
            "metrics": dict(cls.metrics),
            "default_thresholds": dict(cls.default_thresholds),
            "threshold_reasons": dict(cls.threshold_reasons),
            "profiles": {k: dict(v) for k, v in cls.profiles.items()},
        }
