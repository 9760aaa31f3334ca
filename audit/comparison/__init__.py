"""Several audit runs of models on the same data, compared pair by pair on every gated metric
with paired statistics (:mod:`mcaudit.paired`) where the runs scored the same images, Holm's
adjustment across all comparisons, and a ranking per audit dimension."""

from mcaudit.comparison.engine import compare_runs, compared_metrics, dimension_of
from mcaudit.comparison.runs import ComparedRun, check_param_mismatches, load_run, load_runs, pairing_problems
from mcaudit.comparison.text import comparison_text

__all__ = [
    "ComparedRun", "load_run", "load_runs", "pairing_problems", "check_param_mismatches", "compare_runs",
    "compared_metrics", "dimension_of", "comparison_text",
]
