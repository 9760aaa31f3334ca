"""The decision rules: which scanned classes look like backdoor targets (the reference rule and
Neural Cleanse's MAD anomaly index), and why no verdict can be given when none applies or a
trigger did not converge."""

from __future__ import annotations

import numpy as np

from mcaudit.metrics import wilson_interval

MAD_CONSISTENCY = 1.4826  # makes the MAD estimate the standard deviation of normal data
# Neural Cleanse reads an anomaly index above 2 as ">95% probability of an outlier", which
# assumes 1.4826 x MAD estimates the clean classes' standard deviation. Simulated with normal
# mask norms (10^6 draws per size), the share of clean classes indexed above 2 is 7.8% with 3
# classes, 5.2% with 4, 6.4% with 5, 5.0% with 6, 5.4% with 7, and stays below 5% from 8 on
# (4.7%, 4.9%, 4.3%, ...). With three classes the MAD is the smaller of two gaps, so any
# asymmetry reads as an outlier. The paper's own smallest task had 10 labels (MNIST).
MAD_MIN_CLASSES = 8


def anomaly_index(norms: np.ndarray) -> np.ndarray:
    """(median - norm) / (1.4826 * MAD): how far below the typical mask size each class lies."""
    norms = np.asarray(norms, dtype=float)
    median = np.median(norms)
    mad = MAD_CONSISTENCY * np.median(np.abs(norms - median))
    if mad == 0:
        diff = median - norms
        return np.where(diff > 0, np.inf, np.where(diff < 0, -np.inf, 0.0))
    return (median - norms) / mad


def decide(audited: dict, reference: dict | None, params: dict) -> dict:
    """Which classes each applicable rule flags, and why the verdict cannot be given if it cannot."""
    k = len(audited["norms"])
    flagged = np.zeros(k, dtype=bool)
    rules: list[str] = []
    index = ratio = None
    blocked: list[str] = []  # reasons no verdict can be given
    if k >= MAD_MIN_CLASSES:
        index = anomaly_index(audited["norms"])
        flagged |= index > params["anomaly_threshold"]
        rules.append("MAD anomaly index")
    reference_ok = reference is not None and reference_is_informative(reference)
    if reference is not None:
        ratio = audited["norms"] / np.maximum(reference["norms"], 1e-12)
        if reference_ok:
            flagged |= ratio <= params["reference_ratio"]
            rules.append("reference rule")
    if not rules:
        why = f"only {k} classes scanned, and the MAD anomaly rule needs at least {MAD_MIN_CLASSES} (with fewer, " \
              "the median absolute deviation comes from too few numbers for any class to stand out reliably)"
        if reference is None:
            why += "; no reference model was given (set backdoor_scan.reference_model to the checkpoint this " \
                   "model was fine-tuned from)"
        else:
            why += ("; the reference model classifies the scored images no better than naming the most frequent "
                    f"class ({reference['correct']} of {reference['scored']} right), so its stamp sizes are no yardstick")
        blocked.append(why)
    unconverged = ~audited["converged"]
    if reference_ok:
        unconverged |= ~reference["converged"]
    if unconverged.any() and rules:
        blocked.append("the reversed triggers did not converge within max_steps for some classes (they had not "
                       "reached target_asr, or their masks were still shrinking), so their sizes are not yet the "
                       "smallest: raise backdoor_scan.max_steps")
    return {"flagged": flagged, "rules": rules, "index": index, "ratio": ratio, "blocked": blocked,
            "unconverged": unconverged, "reference_ok": reference_ok}


def reference_is_informative(reference: dict) -> bool:
    """The reference beats always naming the most frequent class (lower Wilson bound of its accuracy)."""
    lower, _ = wilson_interval(reference["correct"], reference["scored"])
    return lower > reference["majority_share"]
