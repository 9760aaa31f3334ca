"""Out-of-distribution and zero-shot anomaly detection.

Two questions a clinician asks of a deployed model:

* Does it notice when an image is not the kind it was validated on (another modality, a
  broken acquisition, a screenshot)? The audited images are the in-distribution (ID) set and
  are never encoded again: their features and logits come from the shared forward pass. The
  out-of-distribution (OOD) set is the user's ``--ood`` data, encoded once, or, without it,
  two generated sets: *near-OOD* (audited images wrecked by heavy noise, blur, contrast loss
  or pixelation) and *far-OOD* (noise and texture images of another kind altogether).
  Every OOD score below is an "ID-ness": higher means more like the audited data.
* Can normal/abnormal prompts alone tell the abnormal images apart (zero-shot anomaly
  detection), given which classes count as normal?
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl
from mcaudit.devices import full_precision
from mcaudit.metrics import (
    auroc_binary,
    auroc_of_resamples,
    average_precision,
    bootstrap_interval,
    clopper_pearson_interval,
    fpr_at_tpr,
    roc_points,
)

SCORES = {
    "msp": "MSP: the top class probability (softmax of the model's logits)",
    "mcm": "MCM: the top class probability of a softmax over cosine similarities / temperature",
    "energy": "energy: log-sum-exp of the logits (the negative free energy)",
    "max_logit": "max logit: the top class logit",
    "mahalanobis": "Mahalanobis: minus the smallest class-conditional Mahalanobis distance of the image features",
    "knn": "kNN: minus the distance to the k-th nearest fitted image feature",
}
SET_TITLES = {
    "ood": "user OOD set",
    "near_ood": "near-OOD (corrupted audited images)",
    "far_ood": "far-OOD (noise and textures)",
}
CORRUPTIONS = ("heavy noise", "heavy blur", "contrast collapse", "pixelation")
FAR_KINDS = ("uniform noise", "1/f noise", "stripes and checkers")
AUTO_NORMAL_NAMES = ("normal", "healthy", "no finding", "no findings", "no dementia", "no disease", "negative")
NORMAL_STATES = ["no abnormality", "no lesion", "normal findings", "healthy tissue", "no disease"]
ABNORMAL_STATES = ["an abnormality", "a lesion", "abnormal findings", "diseased tissue", "disease"]
STATE_TEMPLATES = ["a medical image showing {}.", "a radiology image with {}.", "a clinical image of {}."]


# -- OOD scores ------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Image features (L2-normalised) and logits of a set of images, on the CPU."""

    features: torch.Tensor
    logits: torch.Tensor
    kinds: list[str] = field(default_factory=list)  # how each generated image was made


def logit_scores(logits: torch.Tensor, features: torch.Tensor, class_features: torch.Tensor, temperature: float) -> dict[str, np.ndarray]:
    logits = logits.double()
    cos = features.double() @ class_features.double().T
    return {
        "msp": torch.softmax(logits, dim=1).max(dim=1).values.numpy(),
        "mcm": torch.softmax(cos / temperature, dim=1).max(dim=1).values.numpy(),
        "energy": torch.logsumexp(logits, dim=1).numpy(),
        "max_logit": logits.max(dim=1).values.numpy(),
    }


def ledoit_wolf(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance of already-centred rows and the shrinkage (Ledoit & Wolf, 2004).

    Shrinking toward a scaled identity keeps the covariance invertible when the fit split has
    fewer images than feature dimensions, as it has for a 512-d CLIP model on a small audit.
    """
    n, p = centred.shape
    emp = centred.T @ centred / n
    mu = np.trace(emp) / p
    delta = (np.sum(emp**2) - 2 * mu * np.trace(emp) + p * mu**2) / p
    # Mean squared distance of the one-image covariances x x^T from emp, scaled by 1/n.
    fourth = np.sum(np.sum(centred**2, axis=1) ** 2) / n
    beta = (fourth - np.sum(emp**2)) / (p * n)
    beta = min(beta, delta)
    shrinkage = 0.0 if delta == 0 else beta / delta
    return (1 - shrinkage) * emp + shrinkage * mu * np.eye(p), float(shrinkage)


class MahalanobisScorer:
    """Class means and one shared covariance of the fit split's features (Lee et al., 2018)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.classes = np.unique(labels)
        self.means = np.stack([features[labels == c].mean(axis=0) for c in self.classes])
        centred = features - self.means[np.searchsorted(self.classes, labels)]
        cov, self.shrinkage = ledoit_wolf(centred)
        self.precision = np.linalg.inv(cov)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        dists = []
        for mean in self.means:
            d = features - mean
            dists.append(np.einsum("ij,jk,ik->i", d, self.precision, d))
        return -np.min(np.stack(dists, axis=1), axis=1)


class KnnScorer:
    """Distance to the k-th nearest fit feature on the unit sphere (Sun et al., 2022)."""

    def __init__(self, features: np.ndarray, k: int):
        self.bank = features / np.linalg.norm(features, axis=1, keepdims=True)
        self.k = min(k, len(self.bank))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        f = features / np.linalg.norm(features, axis=1, keepdims=True)
        out = []
        for start in range(0, len(f), 1024):  # bounded memory on large sets
            d2 = np.maximum(2.0 - 2.0 * f[start : start + 1024] @ self.bank.T, 0.0)
            out.append(np.sqrt(np.partition(d2, self.k - 1, axis=1)[:, self.k - 1]))
        return -np.concatenate(out)


def separation(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR with ID and with OOD as positive, and FPR at 95% TPR (ID positive)."""
    scores = np.r_[id_scores, ood_scores]
    is_id = np.r_[np.ones(len(id_scores), bool), np.zeros(len(ood_scores), bool)]
    return {
        "auroc": auroc_binary(is_id, scores),
        "aupr_in": average_precision(is_id, scores),
        "aupr_out": average_precision(~is_id, -scores),
        "fpr95": fpr_at_tpr(is_id, scores, 0.95),
    }


# -- generated OOD sets ------------------------------------------------------------------


def corrupt(pixels: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A strong corruption of (N, 3, H, W) pixels in [0, 1]: the anatomy is still there, the
    acquisition is not one a model should trust."""
    h, w = pixels.shape[-2:]
    if kind == "heavy noise":
        grey = bool((pixels[:, :1] == pixels).all())
        # Grey images get grey noise: coloured speckle would be an easier cue than the noise.
        shape = (pixels.shape[0], 1, h, w) if grey else pixels.shape
        noise = torch.randn(shape, generator=generator).to(pixels.device)
        return (pixels + 0.5 * noise).clamp(0, 1)
    if kind == "heavy blur":
        sigma = max(h, w) / 12
        size = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(h, w) // 2) - 1)
        return TF.gaussian_blur(pixels, [size, size], [sigma, sigma])
    if kind == "contrast collapse":
        return (0.5 + 0.08 * (pixels - pixels.mean(dim=(1, 2, 3), keepdim=True))).clamp(0, 1)
    if kind == "pixelation":
        small = torch.nn.functional.interpolate(pixels, size=(max(2, h // 10), max(2, w // 10)), mode="area")
        return torch.nn.functional.interpolate(small, size=(h, w), mode="nearest")
    raise ValueError(kind)


def far_image(kind: str, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """One (3, H, W) image of another kind than any medical scan."""
    h, w = size
    if kind == "uniform noise":
        return torch.rand((3, h, w), generator=generator)
    if kind == "1/f noise":
        # Random phases under a 1/f amplitude spectrum: the statistics of natural photographs.
        fy = torch.fft.fftfreq(h).view(-1, 1)
        fx = torch.fft.rfftfreq(w).view(1, -1)
        amp = 1.0 / torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / max(h, w))
        phase = torch.rand((3, h, w // 2 + 1), generator=generator) * 2 * math.pi
        img = torch.fft.irfft2(amp * torch.exp(1j * phase), s=(h, w))
        lo = img.amin(dim=(1, 2), keepdim=True)
        hi = img.amax(dim=(1, 2), keepdim=True)
        return (img - lo) / (hi - lo).clamp_min(1e-8)
    if kind == "stripes and checkers":
        u = torch.rand(6, generator=generator)
        yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
        angle, freq = u[0] * math.pi, 3 + 9 * u[1]
        wave = torch.sin(2 * math.pi * freq * (xx * torch.cos(angle) + yy * torch.sin(angle)))
        if u[2] < 0.5:
            wave = wave * torch.sin(2 * math.pi * freq * (-xx * torch.sin(angle) + yy * torch.cos(angle)))
        colours = torch.rand((2, 3, 1, 1), generator=generator)
        t = (wave > 0).float()
        return colours[0] * t + colours[1] * (1 - t)
    raise ValueError(kind)


# -- the check ---------------------------------------------------------------------------


class AnomalyCheck(Check):
    name = "anomaly"
    description = (
        "Out-of-distribution detection (MSP, MCM, energy, max logit, Mahalanobis and kNN scores "
        "of the audited images against the --ood set, or generated near- and far-OOD sets) and "
        "zero-shot anomaly detection with normal/abnormal prompts. The audited images are not "
        "encoded again."
    )
    params = {
        "n_generated": Param(400, "images in each generated OOD set when --ood is not given (near-OOD: corrupted audited images; far-OOD: noise and textures)"),
        "mcm_temperature": Param(1.0, "temperature dividing the cosine similarities in the MCM score"),
        "fit_fraction": Param(0.5, "share of the audited images (stratified by class) used to fit Mahalanobis and kNN; every score is evaluated on the rest"),
        "knn_k": Param(5, "k of the kNN score"),
        "n_bootstrap": Param(1000, "bootstrap resamples for the per-score AUROC intervals (0 turns them off; the gated AUROCs always get a DeLong interval, or a patient bootstrap when the data name patients)"),
        "normal_classes": Param([], "classes that count as normal for zero-shot anomaly detection; the others are abnormal. Empty: a class named normal, healthy, no finding, no dementia, no disease or negative, if exactly one is"),
        "zero_shot": Param(True, "run zero-shot anomaly detection when normal classes are known"),
        "normal_states": Param(list(NORMAL_STATES), "state phrases for a normal image"),
        "abnormal_states": Param(list(ABNORMAL_STATES), "state phrases for an abnormal image"),
        "state_templates": Param(list(STATE_TEMPLATES), "templates with one {} for the state phrases; the prompt file's templates are added"),
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
        "zero_shot.auroc": "AUROC of the abnormal-prompt probability against the normal/abnormal class mapping",
        "zero_shot.aupr": "average precision of the same, abnormal images positive",
        "zero_shot.sensitivity": "share of abnormal images with abnormal-prompt probability >= 0.5",
        "zero_shot.specificity": "share of normal images with abnormal-prompt probability < 0.5",
        "zero_shot.class_prompt_auroc": "for comparison, AUROC of the summed class-prompt probabilities of the abnormal classes",
    }
    default_thresholds = {
        "ood.best_auroc": ">= 0.90",
        "far_ood.best_auroc": ">= 0.95",
        "near_ood.best_auroc": ">= 0.80",
        "zero_shot.auroc": ">= 0.70",
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
        "zero_shot.auroc": "an AUROC of 0.7 is the usual floor of acceptable discrimination for a diagnostic test "
                           "(Hosmer and Lemeshow, Applied Logistic Regression; Mandrekar, J Thorac Oncol 2010)",
    }
    # standard: 400 generated images per set put the held-out half's AUROC interval at about
    # +-0.05 near 0.8; quick keeps the demo fast.
    profiles = {
        "quick": {"n_generated": 120, "n_bootstrap": 200},
        "standard": {"n_generated": 400, "n_bootstrap": 1000},
        "thorough": {"n_generated": 1000, "n_bootstrap": 2000},
    }

    def run(self, ctx, params):
        _validate(params)
        normal = _normal_classes(ctx, params) if params["zero_shot"] else None  # fail fast on bad names
        fwd = ctx.forward
        if len(fwd) < 4:
            return CheckResult.skipped(f"only {len(fwd)} audited images: too few to split into a fit and an evaluation set")
        result = CheckResult()
        fit_rows, eval_rows = _split(ctx, params["fit_fraction"])
        features = fwd.image_features.double().numpy()
        id_all = logit_scores(fwd.logits, fwd.image_features, ctx.class_features, params["mcm_temperature"])
        maha = MahalanobisScorer(features[fit_rows], fwd.labels[fit_rows])
        knn = KnnScorer(features[fit_rows], params["knn_k"])

        def all_scores(enc: Encoded) -> dict[str, np.ndarray]:
            s = logit_scores(enc.logits, enc.features, ctx.class_features, params["mcm_temperature"])
            f = enc.features.double().numpy()
            return s | {"mahalanobis": maha(f), "knn": knn(f)}

        id_eval = {k: v[eval_rows] for k, v in id_all.items()}
        id_eval |= {"mahalanobis": maha(features[eval_rows]), "knn": knn(features[eval_rows])}
        ood_sets, examples = _ood_sets(ctx, params)
        ood_scores = {name: all_scores(enc) for name, enc in ood_sets.items()}

        rows, figures, summaries = [], [], []
        for set_name, scores in ood_scores.items():
            for score_name in SCORES:
                sep = separation(id_eval[score_name], scores[score_name])
                for m, v in sep.items():
                    result.metrics[f"{set_name}.{score_name}.{m}"] = v
                rows.append([SET_TITLES[set_name], score_name, _r(sep["auroc"]), _r(sep["aupr_in"]), _r(sep["aupr_out"]), _r(sep["fpr95"])])
            best_name, best, halves, (id_b, ood_b) = _choose_then_measure(ctx, set_name, id_eval, scores)
            result.details[f"{set_name}.best_score_halves"] = halves
            result.metrics[f"{set_name}.best_auroc"] = best["auroc"]
            result.n[f"{set_name}.best_auroc"] = len(id_b) + len(ood_b)
            interval, method = auroc_interval(ctx, f"anomaly.best.{set_name}", id_eval[best_name][id_b],
                                              scores[best_name][ood_b], ctx.clusters(eval_rows[id_b]), params["n_bootstrap"])
            if np.isfinite(interval[0]):
                result.intervals[f"{set_name}.best_auroc"] = interval
                result.interval_methods[f"{set_name}.best_auroc"] = method
            result.metrics[f"{set_name}.best_fpr95"] = best["fpr95"]
            result.metrics[f"{set_name}.n_images"] = float(len(ood_sets[set_name].logits))
            result.details[f"{set_name}.best_score"] = best_name
            per_score = _auroc_intervals(ctx, set_name, id_eval, scores, params["n_bootstrap"])
            result.intervals.update(per_score)
            result.interval_methods.update({k: "percentile bootstrap over images, within each set" for k in per_score})
            ci = result.intervals.get(f"{set_name}.best_auroc")
            summaries.append(f"{SET_TITLES[set_name].split(' (')[0]} AUROC {best['auroc']:.3f}"
                             + (f" (95% CI {ci[0]:.3f} to {ci[1]:.3f}" if ci else " (no interval")
                             + f", {best_name}, FPR@95 {best['fpr95']:.0%}, {len(id_b)} audited and {len(ood_b)} OOD images)")
            figures.append(_roc_figure(set_name, id_eval, scores, len(ctx.classes)))
            figures.append(_histogram_figure(set_name, best_name, id_eval[best_name], scores[best_name]))
            if ood_sets[set_name].kinds:
                table = _kind_table(set_name, ood_sets[set_name].kinds, id_eval, scores)
                result.tables.append(table)
                _overconfidence(result, ood_sets[set_name].kinds, id_eval["msp"], scores["msp"], len(eval_rows))
        result.metrics["n_id_eval"] = float(len(eval_rows))
        result.tables.insert(0, Table(
            "OOD detection: audited images (in-distribution) against each OOD set",
            ["OOD set", "score", "AUROC", "AUPR (ID positive)", "AUPR (OOD positive)", "FPR at 95% TPR"],
            rows,
            note=(f"Scores evaluated on {len(eval_rows)} held-out audited images; Mahalanobis and kNN "
                  f"were fitted on the other {len(fit_rows)}. AUROC 0.5 is chance, 1 is perfect separation. "
                  "FPR at 95% TPR: share of OOD images let through when 95% of audited images are accepted. "
                  + "; ".join(f"{k}: {v}" for k, v in SCORES.items())),
        ))
        if examples:
            figures.append(examples)
        result.figures.extend(figures)
        result.details["mahalanobis_shrinkage"] = maha.shrinkage
        result.details["scores"] = SCORES
        result.per_image = _per_image(len(fwd), fit_rows, eval_rows, id_all, id_eval)
        if maha.shrinkage > 0.5:
            result.warnings.append(
                f"the Mahalanobis covariance was shrunk by {maha.shrinkage:.2f} toward the identity: the fit split "
                f"({len(fit_rows)} images) is small for {features.shape[1]}-d features, so that score is less reliable"
            )
        zs_summary = _zero_shot(ctx, params, normal, result)
        result.not_evaluated.update(_absent_sets(ood_scores))
        result.sample_size = len(eval_rows)
        result.summary = "OOD detection: " + "; ".join(summaries) + "." + (f" {zs_summary}" if zs_summary else "")
        return result


# -- pieces of run -------------------------------------------------------------------------


def _validate(params: dict[str, Any]) -> None:
    if params["n_generated"] < 1:
        raise InputError(f"anomaly.n_generated = {params['n_generated']}: must be at least 1")
    if not params["mcm_temperature"] > 0:
        raise InputError(f"anomaly.mcm_temperature = {params['mcm_temperature']}: must be positive")
    if not 0 < params["fit_fraction"] < 1:
        raise InputError(f"anomaly.fit_fraction = {params['fit_fraction']}: must be between 0 and 1 (exclusive)")
    if params["knn_k"] < 1:
        raise InputError(f"anomaly.knn_k = {params['knn_k']}: must be at least 1")
    for key in ("normal_states", "abnormal_states", "state_templates"):
        values = params[key]
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise InputError(f"anomaly.{key}: needs a non-empty list of non-empty strings")
    for t in params["state_templates"]:
        if t.count("{}") != 1:
            raise InputError(f"anomaly.state_templates: {t!r} must contain exactly one {{}}")


def _choose_then_measure(ctx, set_name, id_eval, scores) -> tuple[str, dict[str, float], dict[str, int], tuple]:
    """The best of the six scores, chosen on one half of the images and measured on the other.

    The largest of six AUROCs measured on the same images is biased upward: on an OOD set
    drawn from the audited distribution it comes out above 0.5. Choosing on a random half and
    reporting the other half keeps the gated number honest. Sets too small to halve fall back
    to choosing and measuring on all images, which the halves detail shows as zeros.
    """
    n_id, n_ood = len(id_eval["msp"]), len(scores["msp"])
    rng = ctx.rng(f"anomaly.choose.{set_name}")
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


def _absent_sets(ood_scores) -> dict[str, str]:
    """The reason each OOD set's metrics are missing on this run, so thresholds on them read
    "not evaluated" rather than vanishing."""
    if "ood" in ood_scores:
        absent = {s: "a given --ood set replaces the generated near- and far-OOD sets" for s in ("near_ood", "far_ood")}
    else:
        absent = {"ood": "no --ood set was given"}
    names = ["best_auroc", "best_fpr95", "n_images"] + [f"{sc}.{m}" for sc in SCORES for m in ("auroc", "aupr_in", "aupr_out", "fpr95")]
    return {f"{s}.{m}": reason for s, reason in absent.items() for m in names}


def _overconfidence(result, kinds, id_msp, ood_msp, n_id) -> None:
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


def delong_interval(positive: np.ndarray, scores: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """DeLong's 95% interval for the AUROC of ``scores`` with ``positive`` the positive class.

    The variance comes from the structural components (each positive's share of negatives
    below it, each negative's share of positives above it; DeLong, DeLong and
    Clarke-Pearson, 1988). Where that variance is zero (perfect separation, all scores tied)
    the normal interval would collapse to a point, so the exact Clopper-Pearson interval of
    min(n_pos, n_neg) independent positive-negative pairs stands in: a perfect separation of
    20 pairs is then 0.84 to 1, not 1 to 1.
    """
    from scipy.stats import norm

    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    x, y = scores[positive], scores[~positive]
    m, k = len(x), len(y)
    if m < 2 or k < 2:
        return float("nan"), float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[x, y])
    below = (ranks[:m] - rankdata(x)) / k  # per positive: share of negatives below it
    above = 1.0 - (ranks[m:] - rankdata(y)) / m  # per negative: share of positives above it
    auc = float(below.mean())
    var = below.var(ddof=1) / m + above.var(ddof=1) / k
    if not var > 0:
        pairs = min(m, k)
        return clopper_pearson_interval(int(round(auc * pairs)), pairs, level)
    half = float(norm.ppf(0.5 + level / 2)) * math.sqrt(var)
    return max(0.0, auc - half), min(1.0, auc + half)


DELONG = "DeLong (exact pairs bound where the variance is zero)"
PATIENT_BOOTSTRAP = "percentile bootstrap over patients"


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


def _split(ctx, fit_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n = len(ctx.forward)
    n_fit = min(n - 2, max(2, round(n * fit_fraction)))
    fit = ctx.stratified_rows(n_fit, "anomaly.fit")
    return fit, np.setdiff1d(np.arange(n), fit)


def _encode(ctx, batches) -> Encoded:
    feats, logits = [], []
    text = ctx.class_features.to(ctx.device).float()
    scale = ctx.model.logit_scale
    with torch.inference_mode(), ctx.autocast():
        for pixels in batches:
            f = ctx.model.encode_image(pixels.to(ctx.device)).float()
            feats.append(f.cpu())
            with full_precision(ctx.device):
                logits.append((scale * f @ text.T).cpu())
    return Encoded(torch.cat(feats), torch.cat(logits))


def _ood_sets(ctx, params) -> tuple[dict[str, Encoded], Any]:
    spec = (ctx.options or {}).get("ood")
    if spec:
        from mcaudit.forward import run_forward

        if ctx.open_dataset is None:
            raise InputError("--ood: this run cannot open data sets")
        dataset = ctx.open_dataset(spec)
        out = run_forward(ctx.model, dataset, ctx.class_features, batch_size=ctx.batch_size, precision=ctx.precision)
        return {"ood": Encoded(out.image_features, out.logits)}, None
    n = params["n_generated"]
    bs = ctx.batch_size
    rows = ctx.stratified_rows(n, "anomaly.near_ood")
    near_kinds = [CORRUPTIONS[i % len(CORRUPTIONS)] for i in range(len(rows))]
    gen = ctx.torch_generator("anomaly.near_ood.noise")
    near_examples: dict[str, torch.Tensor] = {}

    def near_batches():
        for start in range(0, len(rows), bs):
            pixels = ctx.load_pixels(rows[start : start + bs])
            kinds = near_kinds[start : start + bs]
            out = pixels.clone()
            for kind in CORRUPTIONS:
                sel = [i for i, k in enumerate(kinds) if k == kind]
                if sel:
                    out[sel] = corrupt(pixels[sel], kind, gen)
                    near_examples.setdefault(kind, out[sel[0]].cpu())
            yield out

    far_kinds = [FAR_KINDS[i % len(FAR_KINDS)] for i in range(n)]
    far_gen = ctx.torch_generator("anomaly.far_ood")
    far_examples: dict[str, torch.Tensor] = {}

    def far_batches():
        for start in range(0, n, bs):
            imgs = [far_image(k, ctx.model.image_size, far_gen) for k in far_kinds[start : start + bs]]
            for k, img in zip(far_kinds[start : start + bs], imgs):
                far_examples.setdefault(k, img)
            yield torch.stack(imgs)

    near = _encode(ctx, near_batches())
    near.kinds = near_kinds
    far = _encode(ctx, far_batches())
    far.kinds = far_kinds
    examples = _examples_figure(ctx, rows[0], near_examples, far_examples)
    return {"near_ood": near, "far_ood": far}, examples


def _better(a: float, b: float) -> bool:
    return np.isfinite(a) and (not np.isfinite(b) or a > b)


def _r(x: float) -> float | None:
    return round(float(x), 4) if np.isfinite(x) else None


def _auroc_intervals(ctx, set_name, id_eval, scores, n_boot) -> dict[str, tuple[float, float]]:
    out = {}
    n_id = len(next(iter(id_eval.values())))
    for score_name in SCORES:
        both = np.r_[id_eval[score_name], scores[score_name]]
        is_id = np.r_[np.ones(n_id, bool), np.zeros(len(scores[score_name]), bool)]
        lo, hi = bootstrap_interval(lambda i: auroc_of_resamples(is_id, both, i), len(both),
                                    ctx.rng(f"anomaly.boot.{set_name}.{score_name}"), n_boot, strata=is_id, batched=True)
        if np.isfinite(lo):
            out[f"{set_name}.{score_name}.auroc"] = (lo, hi)
    return out


def _kind_table(set_name, kinds, id_eval, scores) -> Table:
    kinds_arr = np.array(kinds)
    rows = []
    for kind in dict.fromkeys(kinds):
        sel = kinds_arr == kind
        rows.append([kind, int(sel.sum())] + [_r(separation(id_eval[s], scores[s][sel])["auroc"]) for s in SCORES])
    return Table(
        f"{SET_TITLES[set_name]}: AUROC by kind of image",
        ["kind", "images"] + [f"AUROC {s}" for s in SCORES],
        rows,
        note="A low AUROC for a kind means the model takes such images for audited ones.",
    )


def _per_image(n, fit_rows, eval_rows, id_all, id_eval) -> dict[str, list]:
    out: dict[str, list] = {name: [float(v) for v in values] for name, values in id_all.items()}
    for name in ("mahalanobis", "knn"):
        col: list = [None] * n
        for r, v in zip(eval_rows, id_eval[name]):
            col[int(r)] = float(v)
        out[name] = col
    split = ["evaluation"] * n
    for r in fit_rows:
        split[int(r)] = "fit"
    out["ood_split"] = split
    return out


# -- figures -------------------------------------------------------------------------------


def _roc_figure(set_name, id_eval, scores, n_classes):
    from mcaudit.reports.plots import new_figure, to_figure

    fig, ax = new_figure(5.2, 4.0)
    for s in SCORES:
        is_id = np.r_[np.ones(len(id_eval[s]), bool), np.zeros(len(scores[s]), bool)]
        both = np.r_[id_eval[s], scores[s]]
        fpr, tpr, _ = roc_points(is_id, both)
        ax.plot(fpr, tpr, label=f"{s} ({auroc_binary(is_id, both):.3f})", lw=1.4)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.axhline(0.95, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("OOD images accepted as in-distribution (FPR)")
    ax.set_ylabel("audited images accepted (TPR)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right", title="score (AUROC)", title_fontsize=7)
    caption = "One curve per score; the dashed line is 95% TPR, where FPR@95 is read. The dotted diagonal is chance."
    if n_classes == 2:
        caption += " With two classes MSP and MCM rank images identically, so their curves coincide."
    return to_figure(fig, f"ROC curves: audited images vs {SET_TITLES[set_name]}", caption)


def _histogram_figure(set_name, score_name, id_scores, ood_scores):
    from mcaudit.reports.plots import new_figure, to_figure

    fig, ax = new_figure(5.2, 3.2)
    both = np.r_[id_scores, ood_scores]
    # A few extreme OOD scores would squash the plot; they are drawn in the leftmost bin.
    lo = min(float(np.quantile(both, 0.02)), float(id_scores.min()))
    bins = np.linspace(lo, both.max() + 1e-12, 31)
    ax.hist(np.maximum(id_scores, lo), bins=bins, alpha=0.6, label="audited (held-out)", density=True)
    ax.hist(np.maximum(ood_scores, lo), bins=bins, alpha=0.6, label=SET_TITLES[set_name], density=True)
    threshold = np.sort(id_scores)[::-1][max(1, math.ceil(0.95 * len(id_scores) - 1e-9)) - 1]
    ax.axvline(threshold, color="black", ls="--", lw=1, label="accepts 95% of audited")
    ax.set_xlabel(f"{score_name} score (higher = more like the audited images)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return to_figure(fig, f"Score distributions, {SET_TITLES[set_name]} ({score_name}, the best score)",
                     "Images right of the dashed line would be accepted as in-distribution; "
                     "scores below the axis start are counted in the leftmost bin.")


def _examples_figure(ctx, first_row, near_examples, far_examples):
    from mcaudit.reports.plots import image_grid, to_figure

    original = ctx.load_pixels([first_row])[0].cpu()
    items = [("audited image", original)] + [(f"near: {k}", v) for k, v in near_examples.items()] + [(f"far: {k}", v) for k, v in far_examples.items()]
    images = [img.permute(1, 2, 0).clamp(0, 1).numpy() for _, img in items]
    fig = image_grid(images, [t for t, _ in items], cols=4)
    return to_figure(fig, "Examples of the generated OOD images",
                     "Near-OOD images are audited images under one strong corruption each; far-OOD images are not medical images at all.")


# -- zero-shot anomaly detection -----------------------------------------------------------


def _normal_classes(ctx, params) -> list[str] | None:
    given = params["normal_classes"]
    classes = ctx.classes
    if given:
        unknown = [c for c in given if c not in classes]
        if unknown:
            raise InputError(f"anomaly.normal_classes: {unknown[0]!r} is not a class (classes: {', '.join(classes)})")
        if set(given) == set(classes):
            raise InputError("anomaly.normal_classes: every class is normal, so nothing is abnormal")
        return list(given)
    found = [c for c in classes if c.strip().lower() in AUTO_NORMAL_NAMES]
    return found if len(found) == 1 else None


def state_prompts(params, extra_templates) -> tuple[list[str], list[str]]:
    templates = list(dict.fromkeys(list(params["state_templates"]) + list(extra_templates)))
    normal = [t.format(s) for s in params["normal_states"] for t in templates]
    abnormal = [t.format(s) for s in params["abnormal_states"] for t in templates]
    return normal, abnormal


def _zero_shot(ctx, params, normal: list[str] | None, result: CheckResult) -> str:
    if not params["zero_shot"]:
        _zero_shot_not_run(result, "zero-shot anomaly detection was turned off (anomaly.zero_shot = false)")
        return ""
    if normal is None:
        _zero_shot_not_run(result, "no class is known to be normal: set anomaly.normal_classes to the classes that "
                                   "count as normal")
        result.warnings.append(
            "zero-shot anomaly detection not run: set anomaly.normal_classes to the classes that count as normal"
        )
        return ""
    fwd = ctx.forward
    normal_idx = [ctx.classes.index(c) for c in normal]
    abnormal = ~np.isin(fwd.labels, normal_idx)
    if abnormal.all() or not abnormal.any():
        _zero_shot_not_run(result, "the audited images are all normal or all abnormal")
        result.warnings.append("zero-shot anomaly detection not run: the audited images are all normal or all abnormal")
        return ""
    normal_prompts, abnormal_prompts = state_prompts(params, ctx.prompts.all_templates())
    with torch.inference_mode():
        text = ctx.model.class_text_features([normal_prompts, abnormal_prompts]).float().cpu()
    logits = ctx.model.logit_scale * fwd.image_features.double() @ text.double().T
    p_abnormal = torch.softmax(logits, dim=1)[:, 1].numpy()
    class_prompt = fwd.probs[:, [k for k in range(len(ctx.classes)) if k not in normal_idx]].sum(axis=1)
    m = {
        "auroc": auroc_binary(abnormal, p_abnormal),
        "aupr": average_precision(abnormal, p_abnormal),
        "sensitivity": float(np.mean(p_abnormal[abnormal] >= 0.5)),
        "specificity": float(np.mean(p_abnormal[~abnormal] < 0.5)),
        "class_prompt_auroc": auroc_binary(abnormal, class_prompt),
    }
    for k, v in m.items():
        result.metrics[f"zero_shot.{k}"] = v
    clusters = ctx.clusters()
    if clusters is None or len(set(clusters)) == len(clusters):
        (lo, hi), method = delong_interval(abnormal, p_abnormal), DELONG
    else:  # slices of one patient resampled together
        lo, hi = bootstrap_interval(lambda i: auroc_binary(abnormal[i], p_abnormal[i]), len(abnormal),
                                    ctx.rng("anomaly.boot.zero_shot"), max(params["n_bootstrap"], 200), clusters=clusters)
        method = PATIENT_BOOTSTRAP
    if np.isfinite(lo):
        result.intervals["zero_shot.auroc"] = (lo, hi)
        result.interval_methods["zero_shot.auroc"] = method
    result.n["zero_shot.auroc"] = len(abnormal)
    result.per_image["p_abnormal"] = [float(v) for v in p_abnormal]
    result.tables.append(Table(
        "Zero-shot anomaly detection with normal/abnormal prompts",
        ["measure", "value"],
        [["normal classes", ", ".join(normal)],
         ["abnormal classes", ", ".join(c for c in ctx.classes if c not in normal)],
         ["images (normal / abnormal)", f"{int((~abnormal).sum())} / {int(abnormal.sum())}"],
         ["AUROC", _r(m["auroc"])], ["AUPR (abnormal positive)", _r(m["aupr"])],
         ["sensitivity at p(abnormal) >= 0.5", _r(m["sensitivity"])],
         ["specificity at p(abnormal) >= 0.5", _r(m["specificity"])],
         ["AUROC of the class prompts (for comparison)", _r(m["class_prompt_auroc"])]],
        note=(f"Each image is scored by the softmax of its similarity to {len(normal_prompts)} normal and "
              f"{len(abnormal_prompts)} abnormal prompts (state phrases x templates), e.g. "
              f"{normal_prompts[0]!r} vs {abnormal_prompts[0]!r}."),
    ))
    result.details["zero_shot"] = {"normal_classes": normal, "normal_prompts": normal_prompts, "abnormal_prompts": abnormal_prompts}
    result.figures.append(_zero_shot_figure(abnormal, p_abnormal, class_prompt))
    ci = f", 95% CI {lo:.3f} to {hi:.3f}" if np.isfinite(lo) else ""
    return (f"Zero-shot anomaly AUROC {m['auroc']:.3f} ({int((~abnormal).sum())} normal and {int(abnormal.sum())} "
            f"abnormal images{ci}; class prompts {m['class_prompt_auroc']:.3f}).")


def _zero_shot_not_run(result: CheckResult, reason: str) -> None:
    for k in ("auroc", "aupr", "sensitivity", "specificity", "class_prompt_auroc"):
        result.not_evaluated[f"zero_shot.{k}"] = reason


def _zero_shot_figure(abnormal, p_abnormal, class_prompt):
    from mcaudit.reports.plots import new_figure, to_figure

    fig, ax = new_figure(4.6, 4.0)
    for name, s in (("normal/abnormal prompts", p_abnormal), ("class prompts", class_prompt)):
        fpr, tpr, _ = roc_points(abnormal, s)
        ax.plot(fpr, tpr, label=f"{name} ({auroc_binary(abnormal, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("normal images flagged (1 - specificity)")
    ax.set_ylabel("abnormal images flagged (sensitivity)")
    ax.legend(fontsize=7, loc="lower right", title="scored by (AUROC)", title_fontsize=7)
    return to_figure(fig, "ROC curve: zero-shot anomaly detection", "The dotted diagonal is chance.")


@hookimpl
def mcaudit_register_checks(register):
    register(AnomalyCheck)
