"""The glossary at the end of the report, and which of its terms each check uses.

Each check section links its terms to their entries (``#term-<slug>``), so an explanation is
one click from where the term appears rather than deep inside another section.
"""

from __future__ import annotations

import re

TERMS = {
    "accuracy": "Share of images whose predicted class is the true class.",
    "balanced accuracy": "Accuracy computed per class and then averaged, so a rare class counts as much as a common one.",
    "recall": "Of the images that truly belong to a class, the share the model assigns to it (also called sensitivity).",
    "precision": "Of the images the model assigns to a class, the share that truly belong to it.",
    "AUROC": ("Area under the ROC curve: the chance that a randomly chosen positive case gets a higher score than a "
              "randomly chosen negative one. 0.5 is a coin toss, 1 is perfect ranking."),
    "95% interval": ("The range that, by the stated method, holds the true value in 95% of repeated audits. An "
                     "interval that straddles a threshold means the data cannot decide yet: the status is inconclusive."),
    "ECE": ("Expected calibration error: how far, on average, the model's stated confidence is from how often it is "
            "actually right (0 is perfect; 0.1 means off by ten percentage points)."),
    "temperature scaling": "A one-number rescaling of the model's scores that often fixes over- or under-confidence.",
    "accuracy gap": "The difference in accuracy between the best and the worst group of a column (such as site or sex).",
    "equalized odds": ("A fairness criterion: every group should have the same true-positive and false-positive "
                       "rates. The difference reported is the largest gap in either."),
    "OOD": ("Out of distribution: images unlike those the model is meant for (another modality, a corrupted scan, "
            "noise). A safe model should flag them rather than answer confidently."),
    "MSP": "Maximum softmax probability: the model's confidence in its top class, used as a simple OOD warning score.",
    "FPR@95": ("False-positive rate at 95% true-positive rate: the share of OOD images still accepted when the "
               "threshold keeps 95% of the normal images."),
    "adversarial attack": ("A deliberately computed change to the pixels, usually invisible, that tries to change the "
                           "model's answer. The budget (epsilon) bounds how large the change may be."),
    "robust accuracy": "Accuracy that remains when every image is attacked within the given budget.",
    "certified accuracy": ("Share of images whose answer is mathematically guaranteed not to change for any noise "
                           "within the given radius (randomized smoothing)."),
    "backdoor": ("A hidden behaviour planted by poisoned training data: a small pattern (the trigger) makes the model "
                 "give the attacker's class."),
    "MAD anomaly index": ("How many median absolute deviations a class's reversed-trigger size lies below the other "
                          "classes'; an index above 2 marks a class a trigger may target."),
    "saliency map": "A heat map of the pixels that most influenced the model's answer.",
    "sanity test": ("Heat maps should change when the model's weights are randomised; a method whose maps stay the "
                    "same shows the image's edges, not what the model learned."),
    "deletion and insertion": ("Faithfulness tests for heat maps: removing the most highlighted pixels first should "
                               "drop the model's confidence fast; adding them first should raise it fast."),
    "zero-shot": "Classifying with text prompts alone, without training on labelled examples of the task.",
    "prompt": "The text description of a class (such as 'a chest X-ray showing opacity') the model compares images with.",
}

USES = {
    "performance": ["accuracy", "balanced accuracy", "recall", "precision", "AUROC", "95% interval"],
    "calibration": ["ECE", "temperature scaling", "95% interval"],
    "fairness": ["accuracy gap", "equalized odds", "95% interval"],
    "anomaly": ["OOD", "AUROC", "MSP", "FPR@95"],
    "abnormality": ["zero-shot", "AUROC", "prompt"],
    "adversarial": ["adversarial attack", "robust accuracy", "95% interval"],
    "prompt_robustness": ["prompt", "accuracy"],
    "certified": ["certified accuracy", "95% interval"],
    "backdoor": ["backdoor", "prompt"],
    "backdoor_scan": ["backdoor", "MAD anomaly index"],
    "saliency": ["saliency map", "sanity test", "deletion and insertion"],
}


def anchor(term: str) -> str:
    return "term-" + re.sub(r"[^a-z0-9]+", "-", term.lower()).strip("-")


def terms_for(check: str) -> list[tuple[str, str]]:
    """(term, anchor) pairs a check's section links to."""
    return [(t, anchor(t)) for t in USES.get(check, []) if t in TERMS]


def entries() -> list[tuple[str, str, str]]:
    """(term, anchor, definition), alphabetical, for the glossary section."""
    return [(t, anchor(t), TERMS[t]) for t in sorted(TERMS, key=str.lower)]
