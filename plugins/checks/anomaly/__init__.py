"""Out-of-distribution detection: does the model notice an image that is not the kind it was
validated on (another modality, a broken acquisition, a screenshot)?

The audited images are the in-distribution (ID) set and are never encoded again: their
features and logits come from the shared forward pass. The out-of-distribution (OOD) set is
the user's ``--ood`` data, encoded once, or, without it, two generated sets
(``generated_sets``). Six scores (``scores``) rank each image by how much it looks like the
audited data; ``evaluation`` holds how they are measured and ``figures`` how they are drawn.
Zero-shot normal/abnormal detection is the separate ``abnormality`` check.
"""

from __future__ import annotations

import numpy as np
import torch

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl

from .evaluation import (
    PER_SCORE_BOOTSTRAP,
    SET_TITLES,
    absent_sets,
    auroc_interval,
    choose_then_measure,
    kind_table,
    overconfidence,
    per_score_intervals,
    rounded,
    split_fit_eval,
)
from .generated_sets import GeneratedSets
from .scores import SCORES, Encoded, Scorers, separation


class AnomalyCheck(Check):
    name = "anomaly"
    description = (
        "Out-of-distribution detection: MSP, MCM, energy, max logit, Mahalanobis and kNN scores "
        "of the audited images against the --ood set, or generated near- and far-OOD sets. The "
        "audited images are not encoded again."
    )
    params = {
        "n_generated": Param(400, "images in each generated OOD set when --ood is not given (near-OOD: corrupted audited images; far-OOD: noise and textures)", min=1),
        "mcm_temperature": Param(1.0, "temperature dividing the cosine similarities in the MCM score", above=0),
        "fit_fraction": Param(0.5, "share of the audited images (stratified by class) used to fit Mahalanobis and kNN; every score is evaluated on the rest", above=0, below=1),
        "knn_k": Param(5, "k of the kNN score", min=1),
        "n_bootstrap": Param(1000, "bootstrap resamples for the per-score AUROC intervals (0 turns them off; the gated AUROCs always get a DeLong interval, or a patient bootstrap when the data name patients)", min=0),
    }
    metrics = {
        "<set>.<score>.auroc": "AUROC of telling audited (ID) from OOD images by the score; <set> is ood (the --ood data), near_ood or far_ood (generated); <score> is msp, mcm, energy, max_logit, mahalanobis or knn",
        "<set>.<score>.aupr_in": "average precision with the audited images as the positive class",
        "<set>.<score>.aupr_out": "average precision with the OOD images as the positive class (score negated)",
        "<set>.<score>.fpr95": "share of OOD images accepted when the threshold accepts 95% of the audited images (lower is better)",
        "<set>.best_auroc": "AUROC of the score that separated best on a random half of the ID and OOD images, measured on the other half (choosing and measuring on the same images would flatter it); its 95% interval is DeLong's on that half",
        "<set>.best_fpr95": "FPR at 95% TPR of that score, on the same held-out half",
        "<set>.n_images": "OOD images scored",
        "n_id_eval": "held-out audited images every OOD score is evaluated on",
    }
    default_thresholds = {
        "ood.best_auroc": ">= 0.90",
        "far_ood.best_auroc": ">= 0.95",
        "near_ood.best_auroc": ">= 0.80",
    }
    threshold_reasons = {
        "ood.best_auroc": "the --ood set is by construction data the model must not be used on; a detector that "
                          "misranks more than one pair in ten of audited and such images cannot guard a deployment",
        "far_ood.best_auroc": "noise and texture images are nothing like a scan; the OpenOOD benchmarks (Yang et al., "
                              "2022) find far-OOD AUROCs of 0.95 and above for working detectors, and one that cannot "
                              "flag these will not flag subtler shifts",
        "near_ood.best_auroc": "heavily corrupted acquisitions (noise, blur, contrast collapse, pixelation) are the "
                               "near-OOD images a scanner fault produces; near-OOD AUROCs of 0.8 to 0.9 are typical of "
                               "working detectors in OpenOOD",
    }
    # standard: 400 generated images per set put the held-out half's AUROC interval at about
    # +-0.05 near 0.8; quick keeps the demo fast.
    profiles = {
        "quick": {"n_generated": 64, "n_bootstrap": 200},
        "standard": {"n_generated": 400, "n_bootstrap": 1000},
        "thorough": {"n_generated": 1000, "n_bootstrap": 2000},
    }

    def run(self, ctx, params):
        fwd = ctx.forward
        if len(fwd) < 4:
            return CheckResult.skipped(f"only {len(fwd)} audited images: too few to split into a fit and an evaluation set")
        fit_rows, eval_rows = split_fit_eval(ctx, params["fit_fraction"])
        features = fwd.image_features.double().numpy()
        scorers = Scorers(ctx.class_features, features[fit_rows], fwd.labels[fit_rows],
                          params["mcm_temperature"], params["knn_k"])
        id_all = scorers.logit_based(fwd.logits, fwd.image_features)
        id_eval = {k: v[eval_rows] for k, v in id_all.items()} | scorers.feature_based(features[eval_rows])
        ood_sets, examples, surest = _ood_sets(ctx, params["n_generated"])

        result = CheckResult(sample_size=len(eval_rows))
        if surest:
            result.details["ood.most_confident"] = surest
        evaluated = [_evaluate_set(ctx, result, name, enc, id_eval, scorers(enc), eval_rows, params["n_bootstrap"])
                     for name, enc in ood_sets.items()]
        result.metrics["n_id_eval"] = float(len(eval_rows))
        result.tables.insert(0, _overview_table(evaluated, len(eval_rows), len(fit_rows)))
        if examples is not None:
            result.figures.append(examples)
        result.details["mahalanobis_shrinkage"] = scorers.mahalanobis.shrinkage
        result.details["scores"] = SCORES
        result.per_image = _per_image(ctx, fit_rows, eval_rows, id_all, id_eval)
        _shrinkage_caveat(result, scorers.mahalanobis.shrinkage, len(fit_rows), features.shape[1])
        result.not_evaluated.update(absent_sets(ood_sets))
        result.summary = "OOD detection: " + "; ".join(e["summary"] for e in evaluated) + "."
        return result


# -- pieces of run -------------------------------------------------------------------------


def _ood_sets(ctx, n_generated: int) -> tuple[dict[str, Encoded], object, list]:
    """The OOD sets; for generated ones, a figure of examples; for --ood, the images the
    model was surest about (the report shows them)."""
    if ctx.ood:
        if ctx.open_dataset is None:
            raise InputError("--ood: this run cannot open data sets")
        dataset = ctx.open_dataset(ctx.ood)
        out = ctx.encode(dataset)
        return {"ood": Encoded(out.image_features, out.logits)}, None, surest_ood(dataset, out, ctx.classes)
    generated = GeneratedSets(ctx, n_generated)
    sets = generated.encode()
    from .figures import generated_examples

    return sets, generated_examples(generated.original_example(), generated.near_examples, generated.far_examples), []


def surest_ood(dataset, out, classes, k: int = 8) -> list[dict]:
    """The ``k`` OOD images with the highest maximum softmax probability, surest first."""
    probs = torch.softmax(out.logits.double(), dim=1).numpy()
    order = sorted(range(len(probs)), key=lambda r: (-float(probs[r].max()), r))[:k]
    return [{"index": int(out.indices[r]), "source": dataset.records[int(out.indices[r])].source,
             "prediction": classes[int(probs[r].argmax())], "confidence": float(probs[r].max())} for r in order]


def _evaluate_set(ctx, result, set_name, encoded, id_eval, scores, eval_rows, n_boot) -> dict:
    """Every score's separation on one OOD set, the best score chosen on one half and measured
    on the other with its interval, and the set's figures; returns its overview rows and summary."""
    from .figures import roc_curves, score_histogram

    rows = []
    for score_name in SCORES:
        sep = separation(id_eval[score_name], scores[score_name])
        result.metrics.update({f"{set_name}.{score_name}.{m}": v for m, v in sep.items()})
        rows.append([SET_TITLES[set_name], score_name] + [rounded(sep[m]) for m in ("auroc", "aupr_in", "aupr_out", "fpr95")])
    best_name, best, halves, (id_b, ood_b) = choose_then_measure(ctx, set_name, id_eval, scores)
    result.details[f"{set_name}.best_score_halves"] = halves
    result.metrics[f"{set_name}.best_auroc"] = best["auroc"]
    result.n[f"{set_name}.best_auroc"] = len(id_b) + len(ood_b)
    interval, method = auroc_interval(ctx, f"anomaly:best-bootstrap:{set_name}", id_eval[best_name][id_b],
                                      scores[best_name][ood_b], ctx.clusters(eval_rows[id_b]), n_boot)
    if np.isfinite(interval[0]):
        result.intervals[f"{set_name}.best_auroc"] = interval
        result.interval_methods[f"{set_name}.best_auroc"] = method
    result.metrics[f"{set_name}.best_fpr95"] = best["fpr95"]
    result.metrics[f"{set_name}.n_images"] = float(len(encoded.logits))
    result.details[f"{set_name}.best_score"] = best_name
    per_score = per_score_intervals(ctx, set_name, id_eval, scores, n_boot)
    result.intervals.update(per_score)
    result.interval_methods.update({k: PER_SCORE_BOOTSTRAP for k in per_score})
    result.figures.append(roc_curves(set_name, id_eval, scores, len(ctx.classes)))
    result.figures.append(score_histogram(set_name, best_name, id_eval[best_name], scores[best_name]))
    if encoded.kinds:
        result.tables.append(kind_table(set_name, encoded.kinds, id_eval, scores))
        overconfidence(result, encoded.kinds, id_eval["msp"], scores["msp"], len(eval_rows))
    ci = result.intervals.get(f"{set_name}.best_auroc")
    summary = (f"{SET_TITLES[set_name].split(' (')[0]} AUROC {best['auroc']:.3f}"
               + (f" (95% CI {ci[0]:.3f} to {ci[1]:.3f}" if ci else " (no interval")
               + f", {best_name}, FPR@95 {best['fpr95']:.0%}, {len(id_b)} audited and {len(ood_b)} OOD images)")
    return {"rows": rows, "summary": summary}


def _overview_table(evaluated, n_eval, n_fit) -> Table:
    return Table(
        "OOD detection: audited images (in-distribution) against each OOD set",
        ["OOD set", "score", "AUROC", "AUPR (ID positive)", "AUPR (OOD positive)", "FPR at 95% TPR"],
        [row for e in evaluated for row in e["rows"]],
        note=(f"Scores evaluated on {n_eval} held-out audited images; Mahalanobis and kNN "
              f"were fitted on the other {n_fit}. AUROC 0.5 is chance, 1 is perfect separation. "
              "FPR at 95% TPR: share of OOD images let through when 95% of audited images are accepted. "
              + "; ".join(f"{k}: {v}" for k, v in SCORES.items())),
    )


def _per_image(ctx, fit_rows, eval_rows, id_all, id_eval) -> dict[str, list]:
    """samples.csv columns: the logit scores of every audited image, the fitted scores of the
    held-out ones (a fitted image's own score would flatter it), and which split each is in."""
    out: dict[str, list] = {name: [float(v) for v in values] for name, values in id_all.items()}
    for name in ("mahalanobis", "knn"):
        out[name] = ctx.per_image(eval_rows, [float(v) for v in id_eval[name]])
    out["ood_split"] = ctx.per_image(fit_rows, ["fit"] * len(fit_rows), fill="evaluation")
    return out


def _shrinkage_caveat(result, shrinkage: float, n_fit: int, dim: int) -> None:
    if shrinkage > 0.5:
        result.warnings.append(
            f"the Mahalanobis covariance was shrunk by {shrinkage:.2f} toward the identity: the fit split "
            f"({n_fit} images) is small for {dim}-d features, so that score is less reliable"
        )


@hookimpl
def mcaudit_register_checks(register):
    register(AnomalyCheck)
