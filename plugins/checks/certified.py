"""Certified L2 robustness by randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019).

The smoothed classifier answers, for an image x, the class the zero-shot classifier picks most
often for x plus Gaussian noise of standard deviation sigma (in pixel units of [0, 1]). Its
answer provably cannot change under any perturbation of L2 norm below ``sigma * Phi^-1(pA)``,
where pA is the probability of that top class under noise. CERTIFY estimates this from
samples: N0 noisy copies select the top class, N fresh copies give a one-sided Clopper-Pearson
lower bound on pA at level 1 - alpha; below one half the smoothed classifier abstains.

The guarantee holds for the three-channel input the model sees, with probability at least
1 - alpha per image. Noise is added to every channel even for grey images: the certificate
then covers any perturbation, coloured or not.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.stats import beta, norm
from torch import nn

from mcaudit import Check, CheckResult, Param, Table, hookimpl
from mcaudit.batching import in_batches
from mcaudit.metrics import accuracy, clopper_pearson_interval


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) lower confidence bound of a binomial proportion."""
    successes = np.asarray(successes)
    with np.errstate(invalid="ignore"):
        lower = beta.ppf(alpha, successes, trials - successes + 1)
    return np.where(successes > 0, lower, 0.0)


@torch.no_grad()
def noisy_class_counts(
    model: nn.Module, images: torch.Tensor, num: int, sigma: float, n_classes: int,
    batch_size: int, generator: torch.Generator,
) -> np.ndarray:
    """How often the model picks each class for ``num`` Gaussian-noised copies of each image.

    Copies of several images share a batch, so small ``num`` still fills the device.
    """
    owner = torch.arange(len(images), device=images.device).repeat_interleave(num)
    counts = torch.zeros(len(images), n_classes, dtype=torch.long, device=images.device)
    for start in range(0, len(owner), batch_size):
        idx = owner[start : start + batch_size]
        clean = images[idx]
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        preds = model(clean + sigma * noise).argmax(dim=1)
        counts.index_put_((idx, preds), torch.ones_like(preds), accumulate=True)
    return counts.cpu().numpy()


def certify(
    model: nn.Module, images: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, n_classes: int,
    batch_size: int, generator: torch.Generator,
) -> dict[str, np.ndarray]:
    """Cohen et al.'s CERTIFY for a batch of images.

    Returns the predicted class (-1 where the smoothed classifier abstains), the certified L2
    radius (NaN where it abstains), the lower bound on pA, and the estimation counts.
    """
    selection = noisy_class_counts(model, images, n0, sigma, n_classes, batch_size, generator)
    top = selection.argmax(axis=1)
    counts = noisy_class_counts(model, images, n, sigma, n_classes, batch_size, generator)
    p_lower = clopper_pearson_lower(counts[np.arange(len(top)), top], n, alpha)
    certified = p_lower >= 0.5
    with np.errstate(divide="ignore"):
        radius = np.where(certified, sigma * norm.ppf(np.clip(p_lower, 0.5, 1.0)), np.nan)
    return {
        "prediction": np.where(certified, top, -1),
        "radius": radius,
        "p_lower": p_lower,
        "counts": counts,
    }


def certified_count(prediction: np.ndarray, radius: np.ndarray, labels: np.ndarray, r: float) -> int:
    """Images certified with the correct class at L2 radius ``r`` or more."""
    return int(((prediction == labels) & (np.nan_to_num(radius, nan=-1.0) >= r)).sum())


def certified_accuracy(prediction: np.ndarray, radius: np.ndarray, labels: np.ndarray, r: float) -> float:
    """Share of images certified with the correct class at L2 radius ``r`` or more."""
    return certified_count(prediction, radius, labels, r) / len(labels) if len(labels) else float("nan")


def best_of_interval(counts: list[tuple[int, int]], level: float = 0.95) -> tuple[float, float]:
    """A 95% interval for the largest of several proportions measured on the same images.

    Each proportion gets a Bonferroni-adjusted exact interval, so with probability at least
    ``level`` all of them cover their true values at once, and then the largest true value
    lies between the largest lower and the largest upper bound. Picking the best noise level
    and quoting its plain interval would overstate it.
    """
    each = 1 - (1 - level) / len(counts)
    bounds = [clopper_pearson_interval(k, n, each) for k, n in counts]
    return max(lo for lo, _ in bounds), max(hi for _, hi in bounds)


def _share(k: int, n: int, interval) -> str:
    if not n:
        return "undefined (0 images)"
    ci = f", 95% CI {interval[0]:.1%} to {interval[1]:.1%}" if interval else ""
    return f"{k / n:.1%} ({k} of {n}{ci})"


def _key(value: float) -> str:
    return f"{value:g}"


class CertifiedCheck(Check):
    name = "certified"
    description = (
        "Certified L2 robustness by randomized smoothing (Cohen et al. 2019): certified accuracy at a list of "
        "L2 radii and the abstention rate for each noise level sigma, on a stratified subsample, with exact "
        "(Clopper-Pearson) 95% intervals. The standard profile certifies 400 images with n=1000 noise samples; "
        "Cohen et al. use n0=100, n=100000, alpha=0.001 on 500 images."
    )
    params = {
        "sigmas": Param([0.12, 0.25, 0.5], "standard deviations of the Gaussian noise, in pixel units of [0, 1]",
                        above=0, nonempty=True),
        "n0": Param(64, "noisy samples that select the top class", min=1),
        "n": Param(1000, "noisy samples that bound its probability (the largest radius grows with n)", min=1),
        "alpha": Param(0.001, "failure probability of each certificate",
                       above=0, below=0.5),
        "radii": Param([0.0, 0.05, 0.1, 0.25, 0.5], "L2 radii at which certified accuracy is reported", min=0,
                       nonempty=True),
        "gate_radius": Param(0.25, "L2 radius of the gated certified accuracy (certified_accuracy_at_radius)", min=0),
        "n_images": Param(400, "images certified: a stratified, seeded subsample (0: all)", min=0),
        "noise_batch": Param(256, "noisy images per forward batch", min=1),
    }
    # standard: 400 images give a proportion near 0.5 a Clopper-Pearson half-width of about
    # 0.05, and n = 1000 samples certify radii up to 2.5 sigma. A certificate is a lower bound
    # that grows with n: quick's n = 64 certifies at most 1.27 sigma, so radius 0.25 is within
    # reach of sigma 0.25 (with n = 32 only sigma 0.5 could reach it, which understates a model).
    # Quick keeps one sigma: three cost a ViT-B-32 70 s on two CPU cores.
    profiles = {
        "quick": {"sigmas": [0.25], "n_images": 8, "n0": 8, "n": 64},
        "standard": {"n_images": 400, "n0": 64, "n": 1000},
        "thorough": {"n_images": 1000, "n0": 100, "n": 10000},
    }
    metrics = {
        "clean_accuracy": "accuracy of the plain classifier on the subsample",
        "chance_level": "accuracy of always answering the subsample's most common class (a constant classifier "
                        "is certified at every radius)",
        "certified_accuracy.sigma=<s>.r=<r>": "share of images certified with the correct class at L2 radius r or more",
        "certified_accuracy.best.r=<r>": "the best certified accuracy at radius r over the noise levels (its interval "
                                         "covers all noise levels at once)",
        "certified_accuracy_at_radius": "certified_accuracy.best at gate_radius: the gated number",
        "abstention_rate.sigma=<s>": "share of images where the smoothed classifier abstains (pA lower bound < 1/2)",
        "smoothed_accuracy.sigma=<s>": "accuracy of the smoothed classifier's majority vote over the n samples",
        "noisy_accuracy.sigma=<s>": "accuracy of the plain classifier on single noisy copies",
        "average_certified_radius.sigma=<s>": "mean certified radius, counting wrong or abstained images as 0",
        "n_images": "images certified",
    }
    default_thresholds = {"certified_accuracy_at_radius": "> chance_level"}
    threshold_reasons = {
        "certified_accuracy_at_radius":
            "a constant classifier is certified at every radius and scores the most common class's share, so a "
            "certified accuracy that cannot be shown above it certifies nothing useful; 0.25 is the smallest L2 "
            "radius reported by Cohen et al. (2019) and Salman et al. (2019) on [0, 1] pixels",
    }

    def run(self, ctx, params):
        # The parameters' bounds were checked when they were resolved (before the model loaded).
        sigmas = sorted(set(float(s) for s in params["sigmas"]))
        radii = sorted(set(float(r) for r in params["radii"]) | {float(params["gate_radius"])})

        rows = ctx.stratified_rows(params["n_images"], "certified:rows")
        local = ctx.shard_rows(rows)  # under torchrun each rank certifies its share of the rows
        labels = ctx.forward.labels[rows]
        n_classes = len(ctx.classes)
        model = ctx.classifier()
        generator = torch.Generator(device=ctx.device)
        generator.manual_seed(int(ctx.rng(f"certified:noise:{ctx.world.rank}").integers(0, 2**62)))
        with torch.no_grad(), ctx.autocast():
            images = ctx.load_pixels(local)
            clean_pred = in_batches(lambda rows: model(images[rows]).argmax(dim=1), len(images), ctx.batch_size).cpu().numpy()
            outcome = {
                s: certify(model, images, s, params["n0"], params["n"], params["alpha"], n_classes,
                           params["noise_batch"], generator)
                for s in sigmas
            }
        per_row = {"clean_pred": clean_pred}
        for i, s in enumerate(sigmas):
            per_row.update({f"{key}{i}": outcome[s][key] for key in ("prediction", "radius", "p_lower", "counts")})
        _, merged = ctx.gather_rows(local, per_row)
        outcome = {s: {key: merged[f"{key}{i}"] for key in ("prediction", "radius", "p_lower", "counts")}
                   for i, s in enumerate(sigmas)}
        return self._result(ctx, rows, labels, merged["clean_pred"], outcome, sigmas, radii, params)

    def _result(self, ctx, rows, labels, clean_pred, outcome, sigmas, radii, params) -> CheckResult:
        n = len(rows)
        n_clean = int((clean_pred == labels).sum())
        metrics: dict[str, float] = {"clean_accuracy": accuracy(labels, clean_pred), "n_images": float(n),
                                     "chance_level": float(np.bincount(labels).max() / n) if n else float("nan")}
        counts: dict[str, tuple[int, int]] = {"clean_accuracy": (n_clean, n)}
        table_rows, per_image = [], {}
        for s in sigmas:
            table_rows.append(_sigma_numbers(metrics, counts, outcome[s], labels, s, radii))
            per_image.update(_per_image_columns(ctx, rows, outcome[s], labels, s))
        intervals = {k: clopper_pearson_interval(*kn) for k, kn in counts.items() if kn[1] > 0}
        best_sigma = _best_over_sigmas(metrics, counts, intervals, sigmas, radii, n)
        max_radius = {s: s * norm.ppf(float(clopper_pearson_lower(np.array([params["n"]]), params["n"], params["alpha"])[0]))
                      for s in sigmas}
        gate_r = float(params["gate_radius"])
        not_evaluated = _gate(metrics, counts, intervals, gate_r, max_radius, params)
        paired = _gate_column(ctx, rows, outcome, labels, sigmas, best_sigma[gate_r], gate_r, per_image, not_evaluated)
        table = _table(table_rows, sigmas, radii, max_radius, params, n)
        figures = [self._curve(outcome, labels, sigmas, radii, max_radius)]
        warnings = []
        best_r0 = metrics[f"certified_accuracy.best.r={_key(radii[0])}"]
        if n and metrics["clean_accuracy"] - best_r0 > 0.5:
            warnings.append(
                f"Noise destroys most predictions: certified accuracy at r={_key(radii[0])} is {best_r0:.1%} against "
                f"{metrics['clean_accuracy']:.1%} clean; the model is not robust to Gaussian noise at these sigmas.")
        summary = self._summary(metrics, counts, intervals, gate_r, best_sigma[gate_r], not_evaluated, n)
        details = _details(rows, outcome, sigmas, radii, gate_r, best_sigma[gate_r], max_radius, params)
        details["paired_columns"] = paired
        methods = {k: ("Bonferroni-adjusted exact (Clopper-Pearson), best of the noise levels"
                       if k.startswith("certified_accuracy.best") or k == "certified_accuracy_at_radius"
                       else "exact (Clopper-Pearson)") for k in intervals}
        return CheckResult(metrics=metrics, intervals=intervals, counts=counts, sample_size=n,
                           interval_methods=methods, not_evaluated=not_evaluated, summary=summary, tables=[table], figures=figures,
                           warnings=warnings, details=details, per_image=per_image)

    @staticmethod
    def _summary(metrics, counts, intervals, gate_r, sigma, not_evaluated, n) -> str:
        k_clean = counts["clean_accuracy"][0]
        head = f"Randomized smoothing on {n} images (clean accuracy {_share(k_clean, n, intervals.get('clean_accuracy'))})"
        if "certified_accuracy_at_radius" in not_evaluated:
            r0 = f"certified_accuracy.best.r={_key(0.0)}"
            tail = (f"; radius {_key(gate_r)} is beyond what this many noise samples can certify"
                    + (f", and {_share(counts[r0][0], n, intervals.get(r0))} are certified correct at radius 0"
                       if r0 in counts else "") + ".")
            return head + tail
        k = counts["certified_accuracy_at_radius"][0]
        abstain = metrics[f"abstention_rate.sigma={_key(sigma)}"]
        return (head + f": certified accuracy at L2 radius {_key(gate_r)} is "
                f"{_share(k, n, intervals.get('certified_accuracy_at_radius'))} with the best noise level "
                f"(sigma {_key(sigma)}), which abstains on {abstain:.1%} of the images.")

    @staticmethod
    def _curve(outcome, labels, sigmas, radii, max_radius):
        from mcaudit.reports import plots

        fig, ax = plots.new_figure(5.4, 3.6)
        top = max(max(radii), max(max_radius.values())) * 1.05 or 1.0
        grid = np.linspace(0, top, 200)
        for s in sigmas:
            o = outcome[s]
            ax.plot(grid, [certified_accuracy(o["prediction"], o["radius"], labels, r) for r in grid], label=f"sigma {_key(s)}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return plots.to_figure(
            fig, "Certified accuracy against the L2 radius",
            "Share of images whose smoothed prediction is correct and provably unchanged by any perturbation of at "
            "most this L2 norm, per noise level. Larger sigma certifies larger radii at the cost of accuracy.")


def _sigma_numbers(metrics: dict, counts: dict, o: dict, labels: np.ndarray, s: float, radii: list[float]) -> list:
    """One noise level's metrics and counts; returns its table row."""
    n = len(labels)
    pred, radius, votes = o["prediction"], o["radius"], o["counts"]
    abstained = int((pred < 0).sum())
    smoothed = int((votes.argmax(axis=1) == labels).sum())
    acr = float(np.where(pred == labels, np.nan_to_num(radius, nan=0.0), 0.0).mean()) if n else float("nan")
    metrics[f"abstention_rate.sigma={_key(s)}"] = abstained / n if n else float("nan")
    metrics[f"smoothed_accuracy.sigma={_key(s)}"] = accuracy(labels, votes.argmax(axis=1))
    # noisy copies of one image are not independent, so this one has no binomial count
    metrics[f"noisy_accuracy.sigma={_key(s)}"] = float(votes[np.arange(n), labels].sum() / max(1, votes.sum()))
    metrics[f"average_certified_radius.sigma={_key(s)}"] = acr
    counts[f"abstention_rate.sigma={_key(s)}"] = (abstained, n)
    counts[f"smoothed_accuracy.sigma={_key(s)}"] = (smoothed, n)
    row = [_key(s), metrics[f"noisy_accuracy.sigma={_key(s)}"], smoothed / n if n else None,
           abstained / n if n else None, acr]
    for r in radii:
        k = certified_count(pred, radius, labels, r)
        metrics[f"certified_accuracy.sigma={_key(s)}.r={_key(r)}"] = k / n if n else float("nan")
        counts[f"certified_accuracy.sigma={_key(s)}.r={_key(r)}"] = (k, n)
        row.append(k / n if n else None)
    return row


def _per_image_columns(ctx, rows, o: dict, labels: np.ndarray, s: float) -> dict[str, list]:
    pred, radius = o["prediction"], o["radius"]
    # an abstention has no radius: an empty cell
    return {f"certified_radius.sigma={_key(s)}": ctx.per_image(rows, [
                None if p < 0 else float(r) for p, r in zip(pred, radius)]),
            f"certified_correct.sigma={_key(s)}": ctx.per_image(rows, (pred == labels).astype(int))}


def _gate_column(ctx, rows, outcome: dict, labels: np.ndarray, sigmas, sigma: float, gate_r: float, per_image: dict,
                 not_evaluated: dict) -> dict[str, str]:
    """Adds the per-image column of the gated number (1: certified correct at the gate radius)
    to ``per_image``; returns {metric: column} for image-by-image comparisons of runs
    (mcaudit.comparison), only with one noise level: with several, the gated number is the best
    of them, a choice made after seeing the data that a paired test of the column would ignore."""
    if "certified_accuracy_at_radius" in not_evaluated:
        return {}
    o = outcome[sigma]
    column = f"certified_at_gate_radius.sigma={_key(sigma)}"
    certified = (o["prediction"] == labels) & (np.nan_to_num(o["radius"], nan=-1.0) >= gate_r)
    per_image[column] = ctx.per_image(rows, certified.astype(int))
    return {"certified_accuracy_at_radius": column} if len(sigmas) == 1 else {}


def _best_over_sigmas(metrics: dict, counts: dict, intervals: dict, sigmas, radii, n: int) -> dict[float, float]:
    """Per radius, the noise level certifying most; its interval covers all noise levels at once."""
    best_sigma: dict[float, float] = {}
    for r in radii:
        best_sigma[r] = max(sigmas, key=lambda s: metrics[f"certified_accuracy.sigma={_key(s)}.r={_key(r)}"])
        key = f"certified_accuracy.best.r={_key(r)}"
        metrics[key] = metrics[f"certified_accuracy.sigma={_key(best_sigma[r])}.r={_key(r)}"]
        counts[key] = counts[f"certified_accuracy.sigma={_key(best_sigma[r])}.r={_key(r)}"]
        if n:
            intervals[key] = best_of_interval([counts[f"certified_accuracy.sigma={_key(s)}.r={_key(r)}"] for s in sigmas])
    return best_sigma


def _gate(metrics: dict, counts: dict, intervals: dict, gate_r: float, max_radius: dict, params: dict) -> dict[str, str]:
    """The gated number, or why it is not evaluated (the radius is out of reach of n samples)."""
    not_evaluated = {}
    if gate_r > max(max_radius.values()):
        not_evaluated["certified_accuracy_at_radius"] = (
            f"with n={params['n']} noise samples no certificate can reach radius {_key(gate_r)} (the largest "
            f"certifiable radius is {max(max_radius.values()):.3g}); raise certified.n or the largest sigma")
    else:
        src = f"certified_accuracy.best.r={_key(gate_r)}"
        metrics["certified_accuracy_at_radius"] = metrics[src]
        counts["certified_accuracy_at_radius"] = counts[src]
        if src in intervals:
            intervals["certified_accuracy_at_radius"] = intervals[src]
    return not_evaluated


def _table(table_rows: list[list], sigmas, radii, max_radius: dict, params: dict, n: int) -> Table:
    return Table(
        "Certified accuracy by noise level and L2 radius",
        ["noise sigma", "accuracy on noisy copies", "smoothed accuracy", "abstention rate", "average certified radius"]
        + [f"certified at r={_key(r)}" for r in radii],
        table_rows,
        note=(f"{n} images; n0={params['n0']} selection and n={params['n']} estimation samples per image, "
              f"each certificate holds with probability {1 - params['alpha']:.3g}. With n={params['n']} the largest "
              "certifiable radius is " + ", ".join(f"{m:.3g} at sigma {_key(s)}" for s, m in max_radius.items())
              + "; raise n for larger radii. Radii are L2 norms on the three-channel [0, 1] input. Intervals in "
              "results.json are exact (Clopper-Pearson) 95% intervals over the images; the best over the noise "
              f"levels uses a level of {1 - 0.05 / len(sigmas):.4g} per noise level so that it covers all at once."),
    )


def _details(rows, outcome: dict, sigmas, radii, gate_r: float, gate_sigma: float, max_radius: dict, params: dict) -> dict:
    return {
        "rows": [int(r) for r in rows],
        "sigmas": sigmas,
        "radii": radii,
        "gate_radius": gate_r,
        "gate_sigma": gate_sigma,
        "n0": params["n0"],
        "n": params["n"],
        "alpha": params["alpha"],
        "max_certifiable_radius": {_key(s): m for s, m in max_radius.items()},
        "per_sigma": {
            _key(s): {"prediction": outcome[s]["prediction"], "radius": outcome[s]["radius"],
                      "p_lower": outcome[s]["p_lower"]}
            for s in sigmas
        },
    }


@hookimpl
def mcaudit_register_checks(register: Callable) -> None:
    register(CertifiedCheck)
