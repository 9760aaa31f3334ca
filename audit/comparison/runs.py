"""Audit runs read back for comparison, and the reasons their images cannot be paired.

Paired statistics (:mod:`mcaudit.paired`) are only valid when every run scored the same
images with the same labels in the same order, under the same seed and profile (the seed and
profile pick the subsamples the checks attack or certify). :func:`pairing_problems` lists what
breaks that; the engine then falls back to unpaired comparisons of the reported intervals.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from mcaudit.errors import InputError


@dataclass
class ComparedRun:
    """One audit run: its results.json, its samples.csv rows (None when absent) and where it came from."""

    label: str
    results: dict
    samples: list[dict[str, str]] | None
    source: str


def _results_file(path: Path) -> Path:
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise InputError(f"{path}: no such file (give a results.json or the run folder that holds one)")
    return path


def _read_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not JSON ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    if not (isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("model", "dataset", "checks"))):
        raise InputError(f"{path}: not a mcaudit results.json (no model, dataset and checks sections)")
    return data


def _read_samples(path: Path) -> list[dict[str, str]] | None:
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot be read as CSV ({exc})") from None
    if header[:4] != ["path", "label", "prediction", "correct"]:
        raise InputError(f"{path}: not a mcaudit samples.csv (its header does not start with path,label,prediction,correct)")
    return rows


def load_run(path: str | Path, label: str | None = None) -> ComparedRun:
    """A run from its results.json or its folder; samples.csv beside it is read when present.
    The label defaults to the run folder's name."""
    results_path = _results_file(Path(path))
    results = _read_results(results_path)
    samples = _read_samples(results_path.parent / "samples.csv")
    folder = results_path.parent.resolve()
    return ComparedRun(label=label or folder.name or "run", results=results, samples=samples, source=str(results_path))


def load_run_or_set(path: str | Path, label: str | None = None) -> list[ComparedRun]:
    """The runs a path names: one run, or every model of a multi-model audit's folder (its
    top results.json has ``kind = "models"``), each read from ``models/<label>/`` and
    labelled as there (prefixed by ``label`` and a dot when one is given)."""
    results_path = _results_file(Path(path))
    try:
        top = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        top = None
    if not (isinstance(top, dict) and top.get("kind") == "models" and isinstance(top.get("models"), dict)):
        return [load_run(results_path, label)]
    runs = []
    for name in top["models"]:
        folder = results_path.parent / "models" / str(name)
        runs.append(load_run(folder, f"{label}.{name}" if label else str(name)))
    return runs


def unique_labels(runs: Sequence[ComparedRun]) -> list[ComparedRun]:
    """The runs with clashing labels made unique by -2, -3, ... (the first keeps its label):
    comparisons and rankings name models by label, so two may not share one."""
    seen: set[str] = set()
    out = []
    for run in runs:
        label, k = run.label, 2
        while label in seen:
            label, k = f"{run.label}-{k}", k + 1
        seen.add(label)
        out.append(run if label == run.label else replace(run, label=label))
    return out


def load_runs(paths: Sequence[str | Path], labels: Sequence[str | None] | None = None) -> list[ComparedRun]:
    """Several runs, in order, with unique labels."""
    labels = list(labels or [])
    return unique_labels([run for i, p in enumerate(paths)
                          for run in load_run_or_set(p, labels[i] if i < len(labels) else None)])


def _name(run: ComparedRun) -> str:
    return f"{run.label} ({run.source})"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] if isinstance(value, str) and len(value) == 64 else text


def _differing(runs: Sequence[ComparedRun], what: str, get) -> list[str]:
    values = [get(r) for r in runs]
    if all(v == values[0] for v in values[1:]):
        return []
    listed = ", ".join(f"{_name(r)} has {_short(v)}" for r, v in zip(runs, values))
    return [f"{what} differs: {listed}"]


def _row_keys(run: ComparedRun) -> list[tuple[str, str]]:
    return [(row.get("path", ""), row.get("label", "")) for row in run.samples or []]


def _rows_problem(first: ComparedRun, other: ComparedRun) -> str | None:
    a, b = _row_keys(first), _row_keys(other)
    if a == b:
        return None
    if len(a) != len(b):
        return (f"samples.csv rows differ: {_name(first)} has {len(a)} images, {_name(other)} has {len(b)}")
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return (f"samples.csv rows differ from row {i + 1}: {_name(first)} has {a[i][0]} ({a[i][1]}), "
            f"{_name(other)} has {b[i][0]} ({b[i][1]})")


def pairing_problems(runs: Sequence[ComparedRun]) -> list[str]:
    """Why the runs' images cannot be paired (empty when they can): a missing samples.csv,
    another dataset, other classes, seed or profile, or other rows in samples.csv."""
    problems = [f"{_name(r)} has no samples.csv beside its results.json" for r in runs if r.samples is None]
    problems += _differing(runs, "dataset sha256", lambda r: r.results["dataset"].get("sha256"))
    problems += _differing(runs, "classes", lambda r: r.results["dataset"].get("classes"))
    problems += _differing(runs, "seed", lambda r: (r.results.get("config") or {}).get("seed"))
    problems += _differing(runs, "profile", lambda r: (r.results.get("config") or {}).get("profile"))
    with_samples = [r for r in runs if r.samples is not None]
    for other in with_samples[1:]:
        found = _rows_problem(with_samples[0], other)
        if found:
            problems.append(found)
    return problems


def check_param_mismatches(runs: Sequence[ComparedRun]) -> dict[str, str]:
    """Checks run by several of the runs with different settings, each with the reason: their
    metrics measure different things, so they are not compared."""
    out: dict[str, str] = {}
    names = dict.fromkeys(name for r in runs for name in r.results["checks"])
    for name in names:
        having = [r for r in runs if name in r.results["checks"]]
        params = [r.results["checks"][name].get("params") or {} for r in having]
        if len(having) < 2 or all(p == params[0] for p in params[1:]):
            continue
        keys = sorted(k for k in set().union(*params) if len({json.dumps(p.get(k), sort_keys=True) for p in params}) > 1)
        shown = "; ".join(
            f"{r.label}: " + ", ".join(f"{k}={json.dumps(p.get(k))}" for k in keys) for r, p in zip(having, params))
        out[name] = f"settings differ ({shown}), so its metrics measure different things"
    return out
