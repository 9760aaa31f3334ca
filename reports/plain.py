"""Plain words for each check: a title and one opening sentence a clinician can act on.

The built-in checks are known here by name; a check from another plugin supplies its own
through its result's ``details``: ``details["title"]`` (a few words) and
``details["plain_summary"]`` (one sentence), else it is shown under its name with its own
summary. Sentences are built from the metrics in results.json, so a re-rendered report reads
the same; a metric that is missing or undefined leaves the sentence out rather than guessing.
"""

from __future__ import annotations

from typing import Any, Callable

TITLES = {
    "performance": "How often the model is right",
    "calibration": "Whether its confidence can be trusted",
    "fairness": "Whether it works equally well for every group",
    "anomaly": "Whether it notices images it was not made for",
    "abnormality": "Whether it tells normal from abnormal without training",
    "adversarial": "Whether tiny pixel changes fool it",
    "prompt_robustness": "Whether rewording the class prompts changes its answers",
    "certified": "Guaranteed stability against small noise",
    "backdoor": "Whether a few poisoned images can plant a hidden trigger",
    "backdoor_scan": "Whether a hidden trigger is already planted",
    "saliency": "Whether its heat maps show what it looks at",
    "shift": "How it copes with poorer image quality",
}


def title(name: str, entry: dict[str, Any]) -> str:
    given = (entry.get("details") or {}).get("title")
    return str(given) if given else TITLES.get(name, name.replace("_", " ").capitalize())


def sentence(name: str, entry: dict[str, Any]) -> str:
    """One plain sentence for the check, or "" when it has none (skipped, errored, unknown)."""
    given = (entry.get("details") or {}).get("plain_summary")
    if given:
        return str(given)
    if entry.get("execution") != "completed":
        return ""
    maker = SENTENCES.get(name)
    try:
        return maker(entry.get("metrics") or {}) if maker else ""
    except (KeyError, TypeError, ValueError):
        return ""


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _performance(m: dict) -> str:
    worst = min((v, k[len("recall."):]) for k, v in m.items() if k.startswith("recall.") and v is not None)
    return (f"The model names the right class for {_pct(m['accuracy'])} of the images; it does worst on "
            f"'{worst[1]}', finding {_pct(worst[0])} of them.")


def _calibration(m: dict) -> str:
    return (f"On average the model says it is {_pct(m['confidence'])} sure and it is right {_pct(m['accuracy'])} "
            f"of the time; its stated confidence is off by about {100 * m['ece']:.0f} percentage points (ECE).")


def _fairness(m: dict) -> str:
    gaps = [(v, k.split(".")[0]) for k, v in m.items() if k.endswith(".accuracy_gap") and v is not None]
    if not gaps:
        return ""
    gap, column = max(gaps)
    return (f"Accuracy differs by up to {100 * gap:.0f} percentage points between groups of '{column}'; "
            f"the galleries below show the worst group's mistakes.")


def _anomaly(m: dict) -> str:
    parts = []
    for key, words in (("ood.best_auroc", "your out-of-distribution images"), ("near_ood.best_auroc", "badly corrupted scans"),
                       ("far_ood.best_auroc", "noise and texture images")):
        if m.get(key) is not None:
            parts.append(f"{words} {_pct(m[key])}")
    return ("Chance that the model's best warning score ranks an unusual image above a normal audited one "
            "(AUROC): " + ", ".join(parts) + ".") if parts else ""


def _saliency(m: dict) -> str:
    passed = [k.split(".")[0].replace("_", "-") for k, v in m.items() if k.endswith(".sanity_passed") and v]
    if not passed:
        return "None of the heat-map methods passed the sanity test: do not read the maps as what the model looks at."
    return f"Heat maps from {', '.join(passed)} pass the sanity test; the others show the image more than the model."


SENTENCES: dict[str, Callable[[dict], str]] = {
    "performance": _performance,
    "calibration": _calibration,
    "fairness": _fairness,
    "anomaly": _anomaly,
    "abnormality": lambda m: (f"Asked only 'normal or abnormal?', the model ranks an abnormal image above a normal "
                              f"one {_pct(m['auroc'])} of the time (AUROC)."),
    "adversarial": lambda m: (f"Changes to the pixels too small to see bring accuracy from {_pct(m['clean_accuracy'])} "
                              f"down to {_pct(m['robust_accuracy_at_smallest_eps'])} at the smallest budget tried."),
    "prompt_robustness": lambda m: (f"With every template accuracy is {_pct(m['ensemble_accuracy'])}; the worst single "
                                    f"template gives {_pct(m['template_accuracy.worst'])}."),
    "certified": lambda m: (f"For {_pct(m['certified_accuracy_at_radius'])} of the images the answer is guaranteed "
                            f"not to change under small noise."),
    "backdoor": lambda m: (f"Tuning the prompts on a few poisoned images sent {_pct(m['asr_max'])} of triggered "
                           f"images to the attacker's class."),
    "saliency": _saliency,
}
