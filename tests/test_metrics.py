"""Shared metric helpers: the batched forms equal the plain ones."""

from __future__ import annotations

import numpy as np
import pytest


def test_batched_bootstrap_gives_the_unbatched_interval():
    from sklearn.metrics import roc_auc_score

    from mcaudit.metrics import auroc_binary, auroc_of_resamples, bootstrap_interval

    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.3
    scores = np.round(rng.normal(positive * 0.8, 1.0), 1)  # rounded: many ties
    one = bootstrap_interval(lambda i: auroc_binary(positive[i], scores[i]), 300, np.random.default_rng(5), 150, strata=positive)
    rows = bootstrap_interval(lambda i: auroc_of_resamples(positive, scores, i), 300, np.random.default_rng(5), 150,
                              strata=positive, batched=True)
    assert rows == pytest.approx(one, abs=1e-12) and one[0] < one[1]
    idx = np.random.default_rng(1).integers(0, 300, (4, 300))
    np.testing.assert_allclose(auroc_of_resamples(positive, scores, idx),
                               [roc_auc_score(positive[i], scores[i]) for i in idx], atol=1e-12)
    one_class = np.flatnonzero(~positive)[None, :50]  # a resample with no positives: undefined
    assert np.isnan(auroc_of_resamples(positive, scores, one_class)).all()
