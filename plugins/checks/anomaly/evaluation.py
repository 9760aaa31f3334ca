"""How the OOD scores are evaluated: the fit/evaluation split of the audited images, the best
score chosen on one half and measured on the other, the 95% intervals, the AUROC by kind of
generated image, and the thresholds that cannot be evaluated on this run."""

from __future__ import annotations


import numpy as np

from mcaudit import Table
from mcaudit.metrics import auroc_binary, auroc_of_resamples, bootstrap_interval, delong_interval

from .scores import SCORES, separation

SET_TITLES = {
    "ood": "user OOD set",
    "near_ood": "near-OOD (corrupted audited images)",
    "far_ood": "far-OOD (noise and textures)",
}
DELONG = "DeLong (exact pairs bound where the variance is zero)"
PATIENT_BOOTSTRAP = "percentile bootstrap over patients"
PER_SCORE_BOOTSTRAP = "percentile bootstrap over images, within each set"


def rounded(x: float) -> float | None:
    return round(float(x), 4) if np.isfinite(x) else None


def split_fit_eval(ctx, fit_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows that fit Mahalanobis and kNN (stratified by class) and the held-out rows every
    score is evaluated on: a score fitted on an image would flatter it."""
    n = len(ctx.forward)
    n_fit = min(n - 2, max(2, round(n * fit_fraction)))
    fit = ctx.stratified_rows(n_fit, "anomaly:fit")
    return fit, np.setdiff1d(np.arange(n), fit)


def _better(a: float, b: float) -> bool:
    return np.isfinite(a) and (not np.isfinite(b) or a > b)


def choose_then_measure(ctx, set_name, id_eval, scores) -> tuple[str, dict[str, float], dict[str, int], tuple]:
    """The best of the six scores, chosen on one half of the images and measured on the other.

    The largest of six AUROCs measured on the same images is biased upward: on an OOD set
    drawn from the audited distribution it comes out above 0.5. Choosing on a random half and
    reporting the other half keeps the gated number honest. Sets too small to halve fall back
    to choosing and measuring on all images, which the halves detail shows as zeros.
    """
    n_id, n_ood = len(id_eval["msp"]), len(scores["msp"])
    rng = ctx.rng(f"anomaly:choose:{set_name}")
    id_perm, ood_perm = rng.permutation(n_id), rng.permutation(n_ood)
    halved = min(n_id, n_ood) >= 4
    if halved:
        id_a, id_b = id_perm[: n_id // 2], id_perm[n_id // 2 :]
        ood_a, ood_b = ood_perm[: n_ood // 2], ood_perm[n_ood // 2 :]
    else:
        id_a = id_b = id_perm
        ood_a = ood_b = ood_perm
    best_name, best_auroc = None, None
    for name in SCORES:
        auroc = separation(id_eval[name][id_a], scores[name][ood_a])["auroc"]
        if best_name is None or _better(auroc, best_auroc):
            best_name, best_auroc = name, auroc
    measured = separation(id_eval[best_name][id_b], scores[best_name][ood_b])
    halves = {"choose_id": int(len(id_a)) if halved else 0, "choose_ood": int(len(ood_a)) if halved else 0,
              "measure_id": int(len(id_b)), "measure_ood": int(len(ood_b))}
    return best_name, measured, halves, (id_b, ood_b)


def auroc_interval(ctx, name, id_scores, ood_scores, id_clusters, n_boot) -> tuple[tuple[float, float], str]:
    """The 95% interval of a gated AUROC: DeLong's over images, or, when the audited images
    name their patients, a bootstrap that resamples whole patients (each OOD image its own unit)."""
    is_id = np.r_[np.ones(len(id_scores), bool), np.zeros(len(ood_scores), bool)]
    both = np.r_[id_scores, ood_scores]
    if id_clusters is None or len(set(id_clusters)) == len(id_clusters):
        return delong_interval(is_id, both), DELONG
    clusters = np.r_[np.asarray(id_clusters, dtype=object), np.array([f"\0ood{i}" for i in range(len(ood_scores))], dtype=object)]
    return bootstrap_interval(lambda i: auroc_binary(is_id[i], both[i]), len(both), ctx.rng(name),
                              max(n_boot, 200), clusters=clusters), PATIENT_BOOTSTRAP


def per_score_intervals(ctx, set_name, id_eval, scores, n_boot) -> dict[str, tuple[float, float]]:
    """A bootstrap interval for each score's AUROC on one OOD set (ungated, for reading)."""
    out = {}
    n_id = len(next(iter(id_eval.values())))
    for score_name in SCORES:
        both = np.r_[id_eval[score_name], scores[score_name]]
        is_id = np.r_[np.ones(n_id, bool), np.zeros(len(scores[score_name]), bool)]
        lo, hi = bootstrap_interval(lambda i: auroc_of_resamples(is_id, both, i), len(both),
                                    ctx.rng(f"anomaly:bootstrap:{set_name}:{score_name}"), n_boot, strata=is_id, batched=True)
        if np.isfinite(lo):
            out[f"{set_name}.{score_name}.auroc"] = (lo, hi)
    return out


def kind_table(set_name, kinds, id_eval, scores) -> Table:
    kinds_arr = np.array(kinds)
    rows = []
    for kind in dict.fromkeys(kinds):
        sel = kinds_arr == kind
        rows.append([kind, int(sel.sum())] + [rounded(separation(id_eval[s], scores[s][sel])["auroc"]) for s in SCORES])
    return Table(
        f"{SET_TITLES[set_name]}: AUROC by kind of image",
        ["kind", "images"] + [f"AUROC {s}" for s in SCORES],
        rows,
        note="A low AUROC for a kind means the model takes such images for audited ones.",
    )


def overconfidence(result, kinds, id_msp, ood_msp, n_id) -> None:
    """A warn finding for each kind of corrupted image the model is clearly more confident on
    than on the audited images (MSP AUROC's upper 95% bound below one half); a caveat when
    the AUROC is low but the data cannot show it is below chance."""
    kinds_arr = np.array(kinds)
    for kind in dict.fromkeys(kinds):
        sel = kinds_arr == kind
        auc = separation(id_msp, ood_msp[sel])["auroc"]
        lo, hi = delong_interval(np.r_[np.ones(len(id_msp), bool), np.zeros(int(sel.sum()), bool)],
                                 np.r_[id_msp, ood_msp[sel]])
        text = (f"the model is more confident on {kind!r} images than on the audited ones (MSP AUROC {auc:.2f}, "
                f"95% CI {lo:.2f} to {hi:.2f}; {n_id} audited and {int(sel.sum())} such images): its confidence "
                "cannot flag such images")
        if hi < 0.5:
            result.warn(text, severity=0.5 - auc)
            result.warnings.append(text)
        elif auc < 0.4:
            result.warnings.append(text.replace("is more confident", "may be more confident"))


def absent_sets(set_names) -> dict[str, str]:
    """The reason each OOD set's metrics are missing on this run, so thresholds on them read
    "not evaluated" rather than vanishing."""
    if "ood" in set_names:
        absent = {s: "a given --ood set replaces the generated near- and far-OOD sets" for s in ("near_ood", "far_ood")}
    else:
        absent = {"ood": "no --ood set was given"}
    names = ["best_auroc", "best_fpr95", "n_images"] + [f"{sc}.{m}" for sc in SCORES for m in ("auroc", "aupr_in", "aupr_out", "fpr95")]
    return {f"{s}.{m}": reason for s, reason in absent.items() for m in names}
