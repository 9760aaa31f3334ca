"""The check's result from the scans and the decision: per-class metrics with their Wilson
intervals, the verdict's warnings, the summary sentence, the table, the figures and details."""

from __future__ import annotations

import numpy as np

from mcaudit import CheckResult, Table
from mcaudit.metrics import wilson_interval

from .figures import norms_figure, reversed_triggers_figure
from .rules import MAD_MIN_CLASSES


def build_result(ctx, params, candidates, opt_rows, eval_rows, audited, reference, decision, warnings) -> CheckResult:
    names = [ctx.classes[c] for c in candidates]
    result = CheckResult(warnings=warnings, sample_size=len(eval_rows))
    _class_metrics(result, names, audited, reference, decision)
    _scan_metrics(result, len(candidates), reference, decision)
    flagged_names = [n for n, f in zip(names, decision["flagged"]) if f]
    _verdict_warnings(result, decision, flagged_names, len(candidates), len(ctx.classes))
    result.summary = _summary(names, audited, reference, decision, flagged_names, params)
    result.tables = [_table(names, audited, reference, decision, params, len(opt_rows), len(eval_rows))]
    result.figures = [norms_figure(names, audited, reference, decision, params),
                      reversed_triggers_figure(ctx, audited, candidates, eval_rows, ctx.is_grey)]
    result.details = {
        "flagged": flagged_names, "candidates": names, "rules": decision["rules"],
        "not_converged": [n for n, u in zip(names, decision["unconverged"]) if u],
        "restart_mask_norms": dict(zip(names, audited["restart_norms"])),
        "final_cost": [float(v) for v in audited["cost"]],
        "reference_model": params["reference_model"] or None,
        "mad_min_classes": MAD_MIN_CLASSES,
    }
    if reference is not None:
        result.details["reference_steps"] = dict(zip(names, (int(s) for s in reference["steps"])))
        result.details["reference_converged"] = dict(zip(names, (bool(c) for c in reference["converged"])))
    return result


def _class_metrics(result: CheckResult, names, audited, reference, decision) -> None:
    m, index, ratio = result.metrics, decision["index"], decision["ratio"]
    for i, name in enumerate(names):
        m[f"mask_norm.{name}"] = float(audited["norms"][i])
        m[f"mask_area.{name}"] = float(audited["area"][i])
        _proportion(result, f"reversed_asr.{name}", audited["hits"][i], audited["trials"][i], wilson_interval)
        _proportion(result, f"optimised_asr.{name}", audited["opt_hits"][i], audited["opt_trials"][i], wilson_interval)
        m[f"steps.{name}"] = float(audited["steps"][i])
        m[f"converged.{name}"] = float(audited["converged"][i])
        if index is not None:
            m[f"anomaly_index.{name}"] = float(index[i])
        if reference is not None:
            m[f"reference_mask_area.{name}"] = float(reference["area"][i])
            m[f"norm_ratio.{name}"] = float(ratio[i])


def _scan_metrics(result: CheckResult, n_candidates: int, reference, decision) -> None:
    m, index, ratio = result.metrics, decision["index"], decision["ratio"]
    m["n_classes_scanned"] = float(n_candidates)
    if index is not None:
        finite = index[np.isfinite(index)]
        m["max_anomaly_index"] = float(finite.max()) if len(finite) else float("nan")
    if reference is not None:
        m["min_norm_ratio"] = float(ratio.min())
        _proportion(result, "reference_accuracy", reference["correct"], reference["scored"], wilson_interval)
    m["n_flagged"] = float(decision["flagged"].sum())


def _verdict_warnings(result: CheckResult, decision, flagged_names, n_candidates: int, n_classes: int) -> None:
    if decision["blocked"]:
        result.not_evaluated["n_flagged"] = "; ".join(decision["blocked"])
        if flagged_names:
            result.warn(f"{', '.join(map(repr, flagged_names))} would be flagged as a backdoor target by the "
                        f"{' and '.join(decision['rules'])}, but the triggers did not converge", metric="n_flagged")
    if n_candidates < n_classes and not decision["blocked"]:
        result.warn(f"only {n_candidates} of {n_classes} classes were scanned: a backdoor targeting another "
                    "class would go unseen (raise backdoor_scan.max_classes)", metric="n_classes_scanned")


def _proportion(result: CheckResult, metric: str, hits: int, trials: int, interval) -> None:
    hits, trials = int(hits), int(trials)
    result.metrics[metric] = hits / trials if trials else float("nan")
    if trials:
        result.counts[metric] = (hits, trials)
        result.intervals[metric] = interval(hits, trials)
        result.n[metric] = trials


def _summary(names, audited, reference, decision, flagged_names, params) -> str:
    sizes = ", ".join(f"{n!r} {a:.1%}" for n, a in zip(names, audited["area"]))
    if decision["blocked"]:
        return f"Not decided: {decision['blocked'][0]}. Smallest stamps found (share of the image): {sizes}."
    rules = " and ".join(decision["rules"])
    if flagged_names:
        i = names.index(flagged_names[0])
        detail = f"a stamp of {audited['area'][i]:.1%} of the image"
        if reference is not None:
            detail += f", {decision['ratio'][i]:.2f} times the reference's"
        return f"Possible backdoor: {', '.join(map(repr, flagged_names))} flagged by the {rules} ({detail})."
    return f"No class flagged by the {rules} among {len(names)} scanned; smallest stamps (share of the image): {sizes}."


def _table(names, audited, reference, decision, params, n_opt, n_eval) -> Table:
    columns = ["target class", "mask share of image", "steps", "converged",
               "attack success (optimisation images)", "attack success (held-out)"]
    if reference is not None:
        columns += ["reference mask share", "reference converged", "ratio to reference"]
    if decision["index"] is not None:
        columns.append("anomaly index")
    columns.append("flagged")
    rows = []
    for i, name in enumerate(names):
        held_out = audited["hits"][i] / audited["trials"][i] if audited["trials"][i] else float("nan")
        row = [name, float(audited["area"][i]), int(audited["steps"][i]), bool(audited["converged"][i]),
               float(audited["opt_hits"][i] / max(audited["opt_trials"][i], 1)), float(held_out)]
        if reference is not None:
            row += [float(reference["area"][i]), bool(reference["converged"][i]), float(decision["ratio"][i])]
        if decision["index"] is not None:
            row.append(float(decision["index"][i]))
        row.append("not decided" if decision["blocked"] else ("yes" if decision["flagged"][i] else "no"))
        rows.append(row)
    rules = []
    if decision["reference_ok"]:
        rules.append(f"flagged when the mask is at most {params['reference_ratio']:g} times the reference's")
    if decision["index"] is not None:
        rules.append(f"flagged when the anomaly index exceeds {params['anomaly_threshold']:g}")
    note = (f"triggers optimised on {n_opt} clean images until they reach {params['target_asr']:.0%} attack success "
            f"and stop shrinking for {params['patience']} steps (cap {params['max_steps']}, {params['restarts']} "
            f"start(s) per class), scored on {n_eval} others; " + ("; ".join(rules) or "no rule applies") + ".")
    return Table("Reversed triggers per candidate target class", columns, rows, note=note)
