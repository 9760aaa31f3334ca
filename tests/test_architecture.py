"""The layout docs/architecture.md describes, kept true: built-in plugins use only the host's
public API, every package is installed, and no module or function outgrows a reader."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"audit": "mcaudit", "plugins": "mcaudit.plugins", "reports": "mcaudit.reports"}

# What a third-party plugin may import, as docs/writing-plugins.md ("What a plugin may import")
# lists it; the built-ins are held to the same list.
PUBLIC_MODULES = (
    "mcaudit", "mcaudit.check_api", "mcaudit.hook_types", "mcaudit.hookimpl", "mcaudit.errors", "mcaudit.metrics",
    "mcaudit.batching", "mcaudit.devices", "mcaudit.models", "mcaudit.data", "mcaudit.demo", "mcaudit.reports",
    "mcaudit.plugins", "mcaudit.paired",
)

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:-1]]
    if path.stem != "__init__":
        parts.append(path.stem)
    return ".".join(parts)


def _is_public(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PUBLIC_MODULES if p != "mcaudit") or module == "mcaudit"


def _host_imports(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, module, name) of every import from mcaudit in a module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "mcaudit":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, "") for alias in node.names if alias.name.split(".")[0] == "mcaudit"]
    return found


def test_every_plugin_module_imports_and_uses_only_the_public_api():
    plugins = importlib.import_module("mcaudit.plugins")
    names = [m.name for m in pkgutil.walk_packages(plugins.__path__, "mcaudit.plugins.")]
    assert len(names) > 20
    for name in names:
        importlib.import_module(name)
    private = []
    for path in _python_files("plugins"):
        for line, module, name in _host_imports(ast.parse(path.read_text())):
            if not _is_public(module) or name.startswith("_"):
                private.append(f"{path.relative_to(ROOT)}:{line}: {module} {name}".strip())
    assert private == []


def test_the_public_api_check_sees_a_private_import(tmp_path):
    tree = ast.parse("from mcaudit.runner import run_audit\nfrom mcaudit.metrics import _z\nfrom mcaudit import Check\n")
    verdicts = [(m, n, _is_public(m) and not n.startswith("_")) for _, m, n in _host_imports(tree)]
    assert verdicts == [("mcaudit.runner", "run_audit", False), ("mcaudit.metrics", "_z", False), ("mcaudit", "Check", True)]


def test_every_package_is_listed_for_installation():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    packages = {_module_name(init) for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    assert packages - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - packages == set()


def _oversized() -> tuple[list[str], list[str]]:
    modules, functions = [], []
    for folder in FOLDERS:
        for path in _python_files(folder):
            text = path.read_text()
            rel = path.relative_to(ROOT)
            if len(text.splitlines()) > MAX_MODULE_LINES:
                modules.append(f"{rel}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        functions.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    return modules, functions


def test_no_module_or_function_outgrows_a_reader():
    modules, functions = _oversized()
    assert modules == [], f"modules over {MAX_MODULE_LINES} lines: split them along their jobs"
    assert functions == [], f"functions over {MAX_FUNCTION_LINES} lines"


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_module_names_follow_the_folders(folder):
    # every module is importable under the name the layout gives it
    for path in _python_files(folder):
        if "templates" not in path.parts:
            assert importlib.util.find_spec(_module_name(path)) is not None, path
