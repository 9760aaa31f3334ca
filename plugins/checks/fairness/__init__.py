"""Subgroup fairness: is the model as good for every group of patients?

For every subgroup column the user names (``--group``) and every intersection of two, the
check measures each group from the shared forward pass (no image is encoded again), the gaps
between groups, how sure those gaps are and whether the largest could be chance (a
permutation test that shuffles the group labels, by subject when the data name subjects).

Intervals: per-group proportions get Wilson intervals; everything else comes from one
bootstrap over images (whole subjects when the data name them), shared by all columns and
not stratified by group or class, since holding the mix fixed makes intervals too narrow. A
gap's interval is the max-|t| band over all pairwise group differences, which covers the
largest true difference; its simulated coverage is in tests/test_coverage_fairness_calibration.py.
Groups smaller than ``min_group_size`` are shown with their n and interval, marked "too
small to decide", and not compared.

Metric names (flat, so that gates can read them):

* ``<column>.<metric>_gap``: largest minus smallest group value, and ``<column>.<metric>_ratio``:
  smallest over largest, for accuracy, balanced_accuracy, auroc, tpr, fpr, selection_rate, ece.
* ``<column>.dp_difference``, ``.eo_difference``, ``.eop_difference``: demographic parity,
  equalized odds and equal opportunity differences (fairlearn's definitions).
* ``<column>.worst_group_accuracy``, ``<column>.es_auroc``, ``<column>.largest_gap``,
  ``<column>.p_value`` (permutation p-value of the largest gap), ``<column>.p_value_holm``.
* Across columns: ``worst_group_accuracy``, ``max_accuracy_gap``, ``max_dp_difference``,
  ``max_eo_difference``, ``min_p_value_holm``.

An intersection column is named ``a&b`` and its groups ``x&y``. Per-group values (with
their intervals) are in the tables and in ``details``.

Positive class: two classes -> the ``positive_class`` parameter (default the second class),
and TPR, FPR and selection rate are those of that class. More classes -> the named class
against the rest, or, when none is named, TPR and FPR are averaged over the classes and the
disparity differences take the worst class (selection rate averaged over all classes is
always 1/K, so it is not reported then).

Layout: ``settings`` (parameters, their bounds, the run's Settings), ``grouping`` (group
columns, numeric binning, intersections), ``engine`` (the vectorised per-group metrics and
the three AUROC variants), ``columns`` (one column measured, small groups marked),
``inference`` (bootstrap, simultaneous bands, permutation test, Holm), ``flat_metrics`` (the
names gates read), ``presentation`` (tables, figure, summary, details) and ``digest`` (what a
page with many groups shows first: columns of most concern, the lowest groups across columns,
one caveat per kind). Random streams:
``fairness:bootstrap`` (one bootstrap shared by all columns) and
``fairness:permutation:<column>`` (each column's shuffles, independent of the other columns).
"""

from __future__ import annotations

import numpy as np

from mcaudit import AuditContext, Check, CheckResult, hookimpl

from .columns import ColumnResult, measure_column
from .digest import caveats, column_order, has_gaps, worst_groups_table
from .engine import Outcomes
from .flat_metrics import flat_metrics
from .grouping import Grouping, group_column, intersect
from .inference import Replicates, bootstrap_columns, gap_intervals, holm_adjust, permutation_test, value_intervals
from .presentation import (
    INTERVAL_NOTE,
    column_details,
    gap_table,
    group_figure,
    group_table,
    overview_table,
    small_group_findings,
    summarise,
)
from .settings import PARAMS, Settings


class FairnessCheck(Check):
    name = "fairness"
    description = (
        "Per-subgroup performance (each --group column and each pair of them): accuracy, balanced "
        "accuracy, AUROC, true/false positive rates, selection rate and calibration per group; the gaps "
        "between groups with bootstrap intervals, and a permutation test of whether the largest gap "
        "could be chance."
    )
    params = PARAMS
    metrics = {
        "<column>.<metric>_gap": "largest minus smallest group value of <metric> (accuracy, balanced_accuracy, auroc, tpr, fpr, selection_rate, ece) among groups large enough",
        "<column>.<metric>_ratio": "smallest over largest group value of <metric> (1 is parity; 0.8 is the 'four-fifths rule')",
        "<column>.dp_difference": "demographic parity difference: largest gap in the share predicted positive",
        "<column>.eo_difference": "equalized odds difference: the larger of the TPR gap and the FPR gap",
        "<column>.eop_difference": "equal opportunity difference: the TPR gap",
        "<column>.worst_group_accuracy": "accuracy of the worst group in the column",
        "<column>.es_auroc": "equity-scaled AUROC: overall AUROC / (1 + sum over groups of |group AUROC - overall AUROC|) (FairCLIP)",
        "<column>.largest_gap": "the largest of the <metric>_gap values",
        "<column>.p_value": "permutation p-value of the largest gap (the maximum over metrics is the test statistic, so picking the largest is accounted for)",
        "<column>.p_value_holm": "p_value adjusted (Holm) for the number of columns tested",
        "<column>.n_groups": "groups large enough to enter the gaps",
        "worst_group_accuracy": "lowest accuracy of any compared group (large enough) in any column; the summary names smaller groups that are lower",
        "max_accuracy_gap": "largest accuracy gap over the columns",
        "max_dp_difference": "largest demographic parity difference over the columns",
        "max_eo_difference": "largest equalized odds difference over the columns",
        "min_p_value_holm": "smallest Holm-adjusted p-value over the columns",
    }
    default_thresholds = {"max_accuracy_gap": "<= 0.1", "max_eo_difference": "<= 0.2"}
    threshold_reasons = {
        "max_accuracy_gap": "a model right 10 points less often for one group of patients than for another serves that "
                            "group materially worse; there is no consensus bound (underdiagnosis gaps of this order were "
                            "reported for chest X-ray classifiers by Seyyed-Kalantari et al., Nat Med 2021), so set your "
                            "own in the gate file. Decided on the interval, which holds for every pair of compared groups",
        "max_eo_difference": "equalized odds (Hardt et al. 2016) asks for equal true and false positive rates across "
                             "groups; 0.2 is a tolerance for the larger of the two gaps, loose enough for the sampling "
                             "noise of groups of a few dozen images, and a convention rather than a clinical standard",
    }
    # The bootstrap resamples every image once per replicate for all columns; a few hundred
    # replicates settle the 95% band. The permutation p-value needs about 1000 shuffles to
    # resolve p near 0.01.
    profiles = {
        "quick": {"n_bootstrap": 100, "n_permutations": 200},
        "standard": {"n_bootstrap": 400, "n_permutations": 1000},
        "thorough": {"n_bootstrap": 2000, "n_permutations": 5000},
    }

    def run(self, ctx: AuditContext, params: dict) -> CheckResult:
        columns = list(ctx.group_columns)
        if not columns:
            return CheckResult.skipped("no subgroup columns: name them with --group (e.g. --group sex --group age)")
        if len(ctx.classes) < 2:
            return CheckResult.skipped("fairness needs at least two classes")
        settings = Settings.from_params(params, ctx.classes, columns)
        forward = ctx.forward
        outcomes = Outcomes(forward.labels, forward.preds, forward.probs, settings.positives, len(ctx.classes),
                            settings.n_bins)
        measured = [measure_column(outcomes, name, grouping, settings)
                    for name, grouping in compared_groupings(ctx, columns, settings)]
        clusters = ctx.clusters()
        boots = bootstrap_columns(outcomes, measured, settings, ctx.rng("fairness:bootstrap"), clusters)
        for i, column in enumerate(measured):
            add_inference(ctx, outcomes, column, boots[i] if boots else None, settings, clusters)
        for column, p in zip(measured, holm_adjust([c.p_value for c in measured])):
            column.p_value_holm = p
        return build_result(measured, boots, outcomes, settings, resampling_unit="subject" if clusters is not None else "image")


def compared_groupings(ctx: AuditContext, columns: list[str], settings: Settings) -> list[tuple[str, Grouping]]:
    """Each --group column, then (with intersections) each pair of them as ``a&b``."""
    base = {c: group_column(ctx.group_values(c), c, settings.quantile_bins, settings.edges.get(c)) for c in columns}
    compared = list(base.items())
    if settings.intersections:
        compared += [(f"{a}&{b}", intersect(base[a], base[b])) for i, a in enumerate(columns) for b in columns[i + 1:]]
    return compared


def add_inference(ctx: AuditContext, outcomes: Outcomes, column: ColumnResult, boot: Replicates | None, settings: Settings,
                  clusters: np.ndarray | None) -> None:
    """The column's intervals and permutation p-values; each column has its own permutation
    stream, so its p-value does not depend on which other columns are audited."""
    column.value_ci = value_intervals(column, boot)
    column.gap_ci = gap_intervals(column, boot)
    column.gap_p, column.p_value = permutation_test(outcomes, column.grouping.codes, column.in_gaps, settings,
                                                    ctx.rng(f"fairness:permutation:{column.name}"), column.gaps, clusters)


def build_result(measured: list[ColumnResult], boots: list[Replicates], outcomes: Outcomes, settings: Settings,
                 resampling_unit: str) -> CheckResult:
    flat = flat_metrics(measured, boots, settings)
    result = CheckResult(
        metrics=flat.metrics, intervals=flat.intervals, n=flat.n, not_evaluated=flat.not_evaluated,
        sample_size=len(outcomes.labels),
        summary=summarise(measured, flat.metrics, flat.intervals, settings),
        tables=[overview_table(column_order(measured), settings), worst_groups_table(measured, settings)],
        warnings=caveats(measured, settings),
        details={
            "positive_class": settings.positive_label,
            "min_group_size": settings.min_group_size,
            "interval_method": INTERVAL_NOTE,
            "resampling_unit": resampling_unit,
            "columns": {c.name: column_details(c) for c in measured},
        },
    )
    for column in column_order(measured):  # the columns of most concern first; the page folds the rest
        result.tables += [group_table(column, settings)] + ([gap_table(column)] if has_gaps(column) else [])
        result.figures.append(group_figure(column, settings))
    for message, severity in small_group_findings(measured, float(np.mean(outcomes.correct)), settings):
        result.warn(message, metric="worst_group_accuracy", severity=severity)
    return result


@hookimpl
def mcaudit_register_checks(register):
    register(FairnessCheck)
