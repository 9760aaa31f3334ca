"""mcaudit: audit medical CLIP models for robustness and trustworthiness.

The public API for plugin authors is importable from here; importing it loads no plugin.
"""

__version__ = "0.1.0"

from mcaudit.check_api import Check, CheckResult, Figure, Gallery, GalleryItem, Param, Table  # noqa: E402
from mcaudit.errors import ExitCode, InputError  # noqa: E402
from mcaudit.verdict import Finding  # noqa: E402
from mcaudit.hookimpl import hookimpl  # noqa: E402
from mcaudit.hook_types import DataRequest, FormatInfo, LoaderInfo, ModelRequest, OutputFormat, ReportSection  # noqa: E402


def __getattr__(name: str):
    # Heavy imports (torch) only when a plugin asks for these names.
    if name == "AuditContext":
        from mcaudit.context import AuditContext

        return AuditContext
    if name in ("ModelAdapter", "ZeroShotClassifier"):
        from mcaudit.models import adapter

        return getattr(adapter, name)
    if name in ("AuditDataset", "Record"):
        from mcaudit.data import dataset

        return getattr(dataset, name)
    raise AttributeError(name)


__all__ = [
    "__version__", "hookimpl", "Check", "CheckResult", "Finding", "ExitCode", "Param", "Table", "Figure", "Gallery",
    "GalleryItem", "InputError",
    "LoaderInfo", "FormatInfo", "ModelRequest", "DataRequest", "ReportSection", "OutputFormat",
    "AuditContext", "ModelAdapter", "ZeroShotClassifier", "AuditDataset", "Record",
]
