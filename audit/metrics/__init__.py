"""Classification metrics and their intervals, shared by the checks; a public module that
third-party checks use too (``from mcaudit.metrics import wilson_interval``).

Point metrics come from scikit-learn and exact proportion intervals from scipy.stats
(:mod:`~mcaudit.metrics.classification`, :mod:`~mcaudit.metrics.proportions`). Written by hand
only what those libraries cannot do, each module saying why: bootstraps of thousands of
replicates at once (:mod:`~mcaudit.metrics.resampling`), AUROC intervals
(:mod:`~mcaudit.metrics.auroc_intervals`), the Jeffreys posterior of balanced accuracy and
Wilson intervals on effective (non-integer) sample sizes (:mod:`~mcaudit.metrics.proportions`),
calibration bins shared with the fairness engine and the log-likelihood from logits
(:mod:`~mcaudit.metrics.calibration`). How each
interval was chosen and the coverage the tests measured: docs/statistics.md.
"""

from mcaudit.metrics.classification import (  # noqa: F401
    confusion,
    accuracy,
    per_class_recall,
    per_class_precision,
    balanced_accuracy,
    auroc_binary,
    auroc_ovr,
    roc_points,
    average_precision,
    fpr_at_tpr,
)
from mcaudit.metrics.proportions import (  # noqa: F401
    wilson_interval,
    clopper_pearson_interval,
    cluster_wilson_interval,
    balanced_accuracy_interval,
)
from mcaudit.metrics.resampling import (  # noqa: F401
    bootstrap_interval,
    confusion_resamples,
    accuracy_of,
    balanced_accuracy_of,
    percentile_interval,
    auroc_of_resamples,
)
from mcaudit.metrics.auroc_intervals import (  # noqa: F401
    auroc_influence,
    hanley_mcneil_variance,
    AUROC_METHOD,
    AUROC_CLUSTER_METHOD,
    auroc_interval,
    delong_interval,
)
from mcaudit.metrics.calibration import (  # noqa: F401
    equal_width_edges,
    equal_mass_edges,
    calibration_bin_index,
    calibration_bins,
    expected_calibration_error,
    max_calibration_error,
    top_label,
    classwise_ece,
    brier_score,
    negative_log_likelihood,
)
