"""Class prompts: phrasings per class times shared templates, from TOML.

.. code-block:: toml

    templates = ["a chest x-ray showing {}.", "a radiograph with {}."]

    [classes]
    normal = ["no finding", "clear lungs"]       # phrasings
    pneumonia = { phrasings = ["pneumonia"], templates = ["{} in the lungs."] }

Classes keep the file's order, which is also the class order for integer labels (MedMNIST).
A class's own ``templates`` replace the shared ones for that class.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mcaudit.errors import InputError

DEFAULT_TEMPLATES = (
    "a photo of {}.",
    "a medical image of {}.",
    "an image showing {}.",
    "a scan with {}.",
)


@dataclass
class PromptSet:
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    phrasings: dict[str, list[str]] = field(default_factory=dict)
    class_templates: dict[str, list[str]] = field(default_factory=dict)
    source: str = "default"

    @property
    def classes(self) -> list[str]:
        return list(self.phrasings)

    def prompts_for(self, class_name: str, templates: tuple[str, ...] | None = None) -> list[str]:
        words = self.phrasings.get(class_name) or [class_name]
        temps = templates or tuple(self.class_templates.get(class_name) or self.templates)
        return [t.format(w) for w in words for t in temps]

    def class_prompts(self, classes: list[str]) -> list[list[str]]:
        return [self.prompts_for(c) for c in classes]

    def all_templates(self) -> list[str]:
        seen = dict.fromkeys(self.templates)
        for temps in self.class_templates.values():
            seen.update(dict.fromkeys(temps))
        return list(seen)


def load_prompts(path: Path | None) -> PromptSet:
    if path is None:
        return PromptSet()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"--prompts {path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: malformed TOML ({exc})") from exc
    templates = data.get("templates", list(DEFAULT_TEMPLATES))
    _check_templates(templates, path, "templates")
    classes = data.get("classes", {})
    if not isinstance(classes, dict):
        raise InputError(f"{path}: [classes] must be a table of class name = phrasings")
    phrasings: dict[str, list[str]] = {}
    class_templates: dict[str, list[str]] = {}
    for name, value in classes.items():
        if isinstance(value, str):
            value = [value]
        if isinstance(value, dict):
            words = value.get("phrasings", [name])
            if "templates" in value:
                _check_templates(value["templates"], path, f"classes.{name}.templates")
                class_templates[name] = list(value["templates"])
        else:
            words = value
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise InputError(f"{path}: classes.{name} needs a non-empty list of phrasings")
        phrasings[name] = list(words)
    return PromptSet(tuple(templates), phrasings, class_templates, source=str(path))


def _check_templates(templates, path: Path, key: str) -> None:
    if not isinstance(templates, list) or not templates:
        raise InputError(f"{path}: {key} must be a non-empty list of strings")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise InputError(f"{path}: {key} entry {t!r} must contain exactly one {{}}")
