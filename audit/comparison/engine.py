"""Several audit runs compared pair by pair on every gated metric, with the Holm adjustment
across all the comparisons and a ranking per audit dimension.

Paired methods (McNemar, DeLong, the paired bootstrap; :mod:`.statistics`) are used when the
runs scored the same images (:func:`~.runs.pairing_problems` is empty) and the metric can be
recomputed from samples.csv; anything else is compared, unpaired, from the two reported
intervals. One Holm family covers every pair and metric, so adding models or metrics makes
each "better" harder to earn rather than easier to find by chance.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Sequence

import numpy as np

from mcaudit.paired import PairedComparison, with_holm

from .runs import ComparedRun, check_param_mismatches, pairing_problems, unique_labels
from .statistics import WALD_METHOD, NoPairedMethod, NotPaired, clusters_of, paired_statistic, wald_difference

DIMENSIONS = {
    "performance": "performance", "abnormality": "performance", "calibration": "calibration",
    "fairness": "fairness", "anomaly": "OOD detection", "adversarial": "robustness", "certified": "robustness",
    "prompt_robustness": "robustness", "shift": "acquisition shift", "backdoor": "backdoor",
    "backdoor_scan": "backdoor", "saliency": "saliency",
}
HIGHER = {">": True, ">=": True, "<": False, "<=": False}
UNPAIRABLE = "; the runs cannot be paired (see problems), so no paired test is used"


def dimension_of(check: str) -> str:
    return DIMENSIONS.get(check, check)


def compared_metrics(runs: Sequence[ComparedRun]) -> list[tuple[str, str, str, bool]]:
    """(name, check, metric, higher is better) of performance.accuracy and every gated
    metric of any run, in the order first met; the direction from the gate's comparison."""
    found: dict[str, tuple[str, str, str, bool]] = {"performance.accuracy": ("performance.accuracy", "performance",
                                                                           "accuracy", True)}
    for run in runs:
        for result in (run.results.get("gate") or {}).get("results") or []:
            name, op = result.get("name"), result.get("op")
            if not name or name in found or op not in HIGHER:
                continue
            check = result.get("check") or name.split(".", 1)[0]
            metric = result.get("metric") or name[len(check) + 1:]
            found[name] = (name, check, metric, HIGHER[op])
    return list(found.values())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reported(run: ComparedRun, check: str, metric: str) -> tuple[float | None, tuple | None, str | None]:
    """The run's value and interval of the metric, or None and why."""
    entry = run.results["checks"].get(check)
    if entry is None:
        return None, None, f"{run.label} did not run {check}"
    value = (entry.get("metrics") or {}).get(metric)
    interval = (entry.get("intervals") or {}).get(metric)
    interval = tuple(interval) if interval and len(interval) == 2 and all(map(_finite, interval)) else None
    not_evaluated = (entry.get("not_evaluated") or {}).get(metric)
    if not_evaluated:  # a value the check itself says cannot be read as evidence ranks no model
        return None, interval, f"{run.label} does not evaluate {check}.{metric} ({not_evaluated})"
    if not _finite(value):
        why = entry.get("status_reason") or "no value"
        return None, interval, f"{run.label} reports no {check}.{metric} ({why})"
    return float(value), interval, None


def _pair_rng(seed: int, *names: str) -> np.random.Generator:
    # one stream per pair and metric: a comparison's draws do not depend on what else is compared
    return np.random.default_rng([seed, zlib.crc32("|".join(names).encode())])


def _one(a: ComparedRun, b: ComparedRun, spec: tuple, paired: bool, options: dict) -> tuple[dict, PairedComparison | None]:
    name, check, metric, higher = spec
    (va, ia, why_a), (vb, ib, why_b) = _reported(a, check, metric), _reported(b, check, metric)
    record = {"a": a.label, "b": b.label, "metric": name, "check": check, "dimension": dimension_of(check),
              "value_a": va, "value_b": vb, "n": None, "higher_is_better": higher, "method": None, "reason": None}
    if va is None or vb is None:
        record["reason"] = "; ".join(w for w in (why_a, why_b) if w)
        return record, None
    note = UNPAIRABLE
    if paired:
        ctx = {"level": options["level"], "n_boot": options["n_boot"], "clusters": clusters_of(a),
               "higher_is_better": higher, "rng": _pair_rng(options["seed"], a.label, b.label, name)}
        try:
            found = paired_statistic(a, b, check, metric, (va, vb), ctx)
            record.update(value_a=found.value_a, value_b=found.value_b, n=found.n, method=found.method)
            return record, found
        except NoPairedMethod:
            note = ""
        except NotPaired as exc:
            note = f"; paired test not used: {exc}"
    if ia is None or ib is None:
        missing = " and ".join(r.label for r, i in ((a, ia), (b, ib)) if i is None)
        record["reason"] = f"no interval reported for {name} by {missing}, so the difference cannot be judged"
        return record, None
    found = wald_difference(name, va, vb, ia, ib, options["level"], higher)
    record["method"] = WALD_METHOD + note
    return record, found


def _finish(record: dict, found: PairedComparison | None) -> dict:
    va, vb = record["value_a"], record["value_b"]
    out = dict(record, difference=None if va is None or vb is None else va - vb, interval=None, p_value=None,
               p_adjusted=None, better=None)
    if found is not None:
        winner = found.better
        out.update(difference=found.difference, interval=list(found.interval), p_value=found.p_value,
                   p_adjusted=found.p_adjusted, better={"a": record["a"], "b": record["b"]}.get(winner))
    order = ["a", "b", "metric", "check", "dimension", "value_a", "value_b", "difference", "interval", "p_value",
             "p_adjusted", "method", "n", "higher_is_better", "better", "reason"]
    return {k: out[k] for k in order}


def _ranking(labels: list[str], comparisons: list[dict]) -> list[dict]:
    """Per dimension: wins minus losses over its comparisons; ties share a rank, 1 is best;
    ``not_compared`` says why when no comparison of the dimension could be tested."""
    out = []
    for dimension in dict.fromkeys(c["dimension"] for c in comparisons):
        mine = [c for c in comparisons if c["dimension"] == dimension]
        wins = {label: sum(c["better"] == label for c in mine) for label in labels}
        losses = {label: sum(c["better"] is not None and c["better"] != label and label in (c["a"], c["b"])
                             for c in mine) for label in labels}
        score = {label: wins[label] - losses[label] for label in labels}
        models = [{"label": label, "wins": wins[label], "losses": losses[label],
                   "rank": 1 + sum(s > score[label] for s in score.values())} for label in labels]
        # "undecided" would read as "compared, no difference": say so when nothing was testable
        untested = None if any(c["interval"] is not None for c in mine) else next(
            (c["reason"] for c in mine if c["reason"]), "no metric could be compared")
        out.append({"dimension": dimension, "metrics": list(dict.fromkeys(c["metric"] for c in mine)),
                    "decided": any(c["better"] is not None for c in mine), "not_compared": untested,
                    "models": sorted(models, key=lambda m: (m["rank"], labels.index(m["label"])))})
    return out


def _model(run: ComparedRun) -> dict:
    model, verdict = run.results.get("model") or {}, run.results.get("verdict") or {}
    return {"label": run.label, "source": run.source, "spec": model.get("spec"), "checkpoint": model.get("checkpoint"),
            "weights_sha256": model.get("weights_sha256"), "verdict": verdict.get("status"),
            "headline": verdict.get("headline")}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def compare_runs(runs: Sequence[ComparedRun], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Every pair of runs (a before b, in the given order) on performance.accuracy and every
    gated metric, Holm-adjusted across all of them; JSON-safe (None for undefined numbers)."""
    runs = unique_labels(runs)
    problems = pairing_problems(runs)
    skipped = check_param_mismatches(runs)
    options = {"level": level, "n_boot": n_boot, "seed": seed}
    records, found = [], []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            for spec in compared_metrics(runs):
                if spec[1] in skipped:
                    continue
                record, comparison = _one(a, b, spec, not problems, options)
                records.append(record)
                found.append(comparison)
    tested = [c for c in found if c is not None]
    adjusted = iter(with_holm(tested))
    comparisons = [_finish(r, next(adjusted) if c is not None else None) for r, c in zip(records, found)]
    labels = [r.label for r in runs]
    statuses = {check: {r.label: r.results["checks"][check].get("status") for r in runs if check in r.results["checks"]}
                for check in dict.fromkeys(c for r in runs for c in r.results["checks"])}
    return _json_safe({
        "level": level, "paired": not problems, "problems": problems, "skipped_checks": skipped,
        "models": [_model(r) for r in runs], "comparisons": comparisons,
        "ranking": _ranking(labels, comparisons), "statuses": statuses,
    })
