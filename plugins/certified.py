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

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl
from mcaudit.batching import in_batches
from mcaudit.metrics import accuracy


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


def certified_accuracy(prediction: np.ndarray, radius: np.ndarray, labels: np.ndarray, r: float) -> float:
    """Share of images certified with the correct class at L2 radius ``r`` or more."""
    ok = (prediction == labels) & (np.nan_to_num(radius, nan=-1.0) >= r)
    return float(ok.mean()) if len(labels) else float("nan")


def _key(value: float) -> str:
    return f"{value:g}"


class CertifiedCheck(Check):
    name = "certified"
    description = (
        "Certified L2 robustness by randomized smoothing (Cohen et al. 2019): certified accuracy at a list of "
        "L2 radii and the abstention rate for each noise level sigma, on a stratified subsample. Defaults are "
        "sized for a quick audit; Cohen et al. use n0=100, n=100000, alpha=0.001 on 500 images."
    )
    params = {
        "sigmas": Param([0.12, 0.25, 0.5], "standard deviations of the Gaussian noise, in pixel units of [0, 1]"),
        "n0": Param(8, "noisy samples that select the top class"),
        "n": Param(32, "noisy samples that bound its probability (the largest radius grows with n)"),
        "alpha": Param(0.001, "failure probability of each certificate"),
        "radii": Param([0.0, 0.05, 0.1, 0.25, 0.5], "L2 radii at which certified accuracy is reported"),
        "n_images": Param(16, "images certified: a stratified, seeded subsample (0: all)"),
        "noise_batch": Param(256, "noisy images per forward batch"),
    }
    metrics = {
        "clean_accuracy": "accuracy of the plain classifier on the subsample",
        "certified_accuracy.sigma=<s>.r=<r>": "share of images certified with the correct class at L2 radius r or more",
        "certified_accuracy.best.r=<r>": "the best certified accuracy at radius r over the noise levels",
        "abstention_rate.sigma=<s>": "share of images where the smoothed classifier abstains (pA lower bound < 1/2)",
        "smoothed_accuracy.sigma=<s>": "accuracy of the smoothed classifier's majority vote over the n samples",
        "noisy_accuracy.sigma=<s>": "accuracy of the plain classifier on single noisy copies",
        "average_certified_radius.sigma=<s>": "mean certified radius, counting wrong or abstained images as 0",
        "n_images": "images certified",
    }
    default_thresholds: dict[str, str] = {}
    uses_model = True

    def run(self, ctx, params):
        sigmas = self._positive_list(params["sigmas"], "sigmas")
        radii = sorted(set(float(r) for r in self._number_list(params["radii"], "radii")))
        if any(r < 0 for r in radii):
            raise InputError("certified.radii: radii must be >= 0")
        for key in ("n0", "n", "noise_batch"):
            if params[key] < 1:
                raise InputError(f"certified.{key}: must be at least 1, got {params[key]}")
        if not 0 < params["alpha"] < 0.5:
            raise InputError(f"certified.alpha: must be between 0 and 0.5, got {params['alpha']}")
        if params["n_images"] < 0:
            raise InputError(f"certified.n_images: must be 0 (all) or positive, got {params['n_images']}")

        rows = ctx.stratified_rows(params["n_images"], "certified")
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

    @staticmethod
    def _number_list(values, option: str) -> list[float]:
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise InputError(f"certified.{option}: {v!r} is not a number")
            out.append(float(v))
        if not out:
            raise InputError(f"certified.{option}: give at least one value")
        return out

    @classmethod
    def _positive_list(cls, values, option: str) -> list[float]:
        out = cls._number_list(values, option)
        if any(v <= 0 for v in out):
            raise InputError(f"certified.{option}: values must be > 0")
        return sorted(set(out))

    def _result(self, ctx, rows, labels, clean_pred, outcome, sigmas, radii, params) -> CheckResult:
        n = len(rows)
        metrics: dict[str, float] = {"clean_accuracy": accuracy(labels, clean_pred), "n_images": float(n)}
        table_rows, per_image = [], {}
        for s in sigmas:
            o = outcome[s]
            pred, radius, counts = o["prediction"], o["radius"], o["counts"]
            abstain = float((pred < 0).mean()) if n else float("nan")
            smoothed = accuracy(labels, counts.argmax(axis=1))
            noisy = float(counts[np.arange(n), labels].sum() / max(1, counts.sum()))
            acr = float(np.where(pred == labels, np.nan_to_num(radius, nan=0.0), 0.0).mean()) if n else float("nan")
            metrics[f"abstention_rate.sigma={_key(s)}"] = abstain
            metrics[f"smoothed_accuracy.sigma={_key(s)}"] = smoothed
            metrics[f"noisy_accuracy.sigma={_key(s)}"] = noisy
            metrics[f"average_certified_radius.sigma={_key(s)}"] = acr
            row = [_key(s), noisy, smoothed, abstain, acr]
            for r in radii:
                ca = certified_accuracy(pred, radius, labels, r)
                metrics[f"certified_accuracy.sigma={_key(s)}.r={_key(r)}"] = ca
                row.append(ca)
            table_rows.append(row)
            col_r, col_ok = [None] * len(ctx.forward), [None] * len(ctx.forward)
            for i, rr in enumerate(rows):
                col_r[int(rr)] = None if pred[i] < 0 else float(radius[i])
                col_ok[int(rr)] = int(pred[i] == labels[i])
            per_image[f"certified_radius.sigma={_key(s)}"] = col_r
            per_image[f"certified_correct.sigma={_key(s)}"] = col_ok
        for r in radii:
            metrics[f"certified_accuracy.best.r={_key(r)}"] = max(
                metrics[f"certified_accuracy.sigma={_key(s)}.r={_key(r)}"] for s in sigmas)

        max_radius = {s: s * norm.ppf(float(clopper_pearson_lower(np.array([params["n"]]), params["n"], params["alpha"])[0]))
                      for s in sigmas}
        table = Table(
            "Certified accuracy by noise level and L2 radius",
            ["noise sigma", "accuracy on noisy copies", "smoothed accuracy", "abstention rate", "average certified radius"]
            + [f"certified at r={_key(r)}" for r in radii],
            table_rows,
            note=(f"{n} images; n0={params['n0']} selection and n={params['n']} estimation samples per image, "
                  f"each certificate holds with probability {1 - params['alpha']:.3g}. With n={params['n']} the largest "
                  "certifiable radius is " + ", ".join(f"{m:.3g} at sigma {_key(s)}" for s, m in max_radius.items())
                  + "; raise n for larger radii. Radii are L2 norms on the three-channel [0, 1] input."),
        )
        figures = [self._curve(outcome, labels, sigmas, radii, max_radius)]
        warnings = []
        best_r0 = metrics[f"certified_accuracy.best.r={_key(radii[0])}"]
        if n and metrics["clean_accuracy"] - best_r0 > 0.5:
            warnings.append(
                f"Noise destroys most predictions: certified accuracy at r={_key(radii[0])} is {best_r0:.1%} against "
                f"{metrics['clean_accuracy']:.1%} clean; the model is not robust to Gaussian noise at these sigmas.")
        mid = radii[len(radii) // 2]
        best_sigma = max(sigmas, key=lambda s: metrics[f"certified_accuracy.sigma={_key(s)}.r={_key(mid)}"])
        summary = (
            f"Certified accuracy (randomized smoothing, {n} images): "
            f"{metrics[f'certified_accuracy.best.r={_key(mid)}']:.1%} provably unchanged by any L2 perturbation "
            f"up to {_key(mid)} (best sigma {_key(best_sigma)}), against {metrics['clean_accuracy']:.1%} clean accuracy; "
            f"abstains on {metrics[f'abstention_rate.sigma={_key(best_sigma)}']:.1%}."
        )
        details = {
            "rows": [int(r) for r in rows],
            "sigmas": sigmas,
            "radii": radii,
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
        return CheckResult(metrics=metrics, summary=summary, tables=[table], figures=figures,
                           warnings=warnings, details=details, per_image=per_image)

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


@hookimpl
def mcaudit_register_checks(register: Callable) -> None:
    register(CertifiedCheck)
