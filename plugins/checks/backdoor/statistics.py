"""The check's numbers and its decision rule: each proportion with its counts and exact
interval (widened to the patient-level bootstrap where images share a patient), each paired
difference with its bootstrap interval, and when the base rate leaves no room to judge
attack success."""

from __future__ import annotations

import numpy as np

from mcaudit import Finding
from mcaudit.metrics import bootstrap_interval, clopper_pearson_interval


class Tally:
    """The check's numbers as they are computed: each proportion with its counts and exact
    interval, each difference with its paired bootstrap interval over images (patients when
    the data name them), and the metrics that cannot be judged on this run."""

    def __init__(self, ctx, params, eval_rows: np.ndarray):
        self.params = params
        self.metrics: dict[str, float] = {}
        self.intervals: dict[str, tuple[float, float]] = {}
        self.counts: dict[str, tuple[int, int]] = {}
        self.not_evaluated: dict[str, str] = {}
        self.findings: list[Finding] = []
        self.clusters = ctx.clusters(eval_rows)
        self.rng = ctx.rng("backdoor:bootstrap")

    def proportion(self, name: str, hits: np.ndarray, subset: np.ndarray | None = None, interval: bool = True) -> None:
        """``hits`` over the held-out images (or those where ``subset`` is true)."""
        hits = np.asarray(hits, dtype=bool)
        k, n = int(hits.sum()), len(hits)
        self.metrics[name] = k / n if n else float("nan")
        if n == 0:
            return
        self.counts[name] = (k, n)
        if interval:
            self.intervals[name] = self._exact(hits, subset)

    def _exact(self, hits: np.ndarray, subset: np.ndarray | None) -> tuple[float, float]:
        lo, hi = clopper_pearson_interval(int(hits.sum()), len(hits))
        clusters = self.clusters if subset is None or self.clusters is None else self.clusters[subset]
        if clusters is not None and len(np.unique(clusters)) < len(clusters):
            # Images of one patient are not independent trials: widen the exact interval to the
            # patient-level bootstrap's where that is wider.
            b_lo, b_hi = bootstrap_interval(lambda i: float(hits[i].mean()), len(hits), self.rng,
                                            max(self.params["n_bootstrap"], 200), clusters=clusters)
            if np.isfinite(b_lo):
                lo, hi = min(lo, b_lo), max(hi, b_hi)
        return lo, hi

    def difference(self, name: str, a: np.ndarray, b: np.ndarray, subset: np.ndarray | None = None) -> None:
        """Mean of ``a`` minus mean of ``b`` on the same images, with a paired bootstrap interval."""
        diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        self.metrics[name] = float(diff.mean()) if len(diff) else float("nan")
        clusters = self.clusters if subset is None or self.clusters is None else self.clusters[subset]
        if len(diff) >= 2 and self.params["n_bootstrap"] > 0:
            self.intervals[name] = bootstrap_interval(lambda i: float(diff[i].mean()), len(diff), self.rng,
                                                      self.params["n_bootstrap"], clusters=clusters)

    def target(self, c: str, is_other, asr_hits, base_hits, trigger_only_hits, bd_correct, honest_correct) -> None:
        """Every number of one target class; attack success only where the base rate leaves room."""
        self.proportion(f"asr.{c}", asr_hits, is_other)
        self.proportion(f"base_rate.{c}", base_hits, is_other)
        self.proportion(f"trigger_only_rate.{c}", trigger_only_hits, is_other)
        self.proportion(f"clean_accuracy.{c}", bd_correct)
        self.difference(f"accuracy_drop.{c}", honest_correct, bd_correct)
        self.difference(f"asr_lift.{c}", asr_hits, base_hits, is_other)
        reason = no_room_reason(int(np.sum(base_hits)), len(base_hits), self.params["max_base_rate"], c)
        if reason:
            self.not_evaluated[f"asr.{c}"] = reason
            self.not_evaluated[f"asr_lift.{c}"] = reason


def no_room_reason(base_hits: int, n: int, max_base_rate: float, target: str) -> str:
    """Why attack success for ``target`` cannot be judged on this run ("" when it can).

    Two ways the base rate leaves no room: it reaches ``max_base_rate`` (the model already sends
    that share of other classes to the target unprompted), or even a perfect attack's exact
    lower bound would not clear the base rate's exact upper bound on this many images.
    """
    if n == 0:
        return f"no held-out image of another class than {target!r} to trigger"
    rate = base_hits / n
    if rate >= max_base_rate:
        return (f"{base_hits} of {n} clean images of other classes ({rate:.0%}) are already predicted as {target!r} "
                f"without any trigger, at or above max_base_rate {max_base_rate:.0%}: attack success cannot be told "
                "apart from the model's own bias")
    perfect_lo = clopper_pearson_interval(n, n)[0]
    base_hi = clopper_pearson_interval(base_hits, n)[1]
    if perfect_lo <= base_hi:
        return (f"with {n} images of other classes and {base_hits} of them already predicted as {target!r}, even "
                "a 100% attack success could not be told apart from the base rate")
    return ""
