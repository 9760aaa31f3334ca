"""Is the checkpoint we were handed already backdoored? (Neural Cleanse-style trigger inversion)

For each candidate target class we look for the smallest stamp, a mask and a pattern pasted
as ``(1 - mask) * image + mask * pattern``, that sends clean images of the other classes to
that class through the model's own zero-shot classifier. A backdoored class has a shortcut:
a tiny stamp (its trigger) suffices, while reaching an honest class takes a large change.
A class whose smallest mask is an outlier on the small side, by the median absolute deviation
anomaly index, is flagged (Wang et al., Neural Cleanse, IEEE S&P 2019).

All candidate classes are optimised together, one batch of stamped images per step, on the
run's device. Defaults are sized for a quick look; for a real audit use more images and steps
(``n_images`` 64 to 128, ``steps`` 300 to 1000) and scan every class.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl

MAD_CONSISTENCY = 1.4826  # makes the MAD estimate the standard deviation of normal data


class BackdoorScanCheck(Check):
    name = "backdoor_scan"
    description = (
        "Backdoor scan of the checkpoint (Neural Cleanse): per candidate target class, optimises "
        "the smallest mask and pattern that send clean images to that class, and flags a class "
        "whose mask is anomalously small by the median absolute deviation anomaly index."
    )
    params = {
        "max_classes": Param(10, "most candidate classes scanned (a seeded subsample when there are more)"),
        "n_images": Param(16, "clean images the triggers are optimised on, stratified by class"),
        "n_eval": Param(64, "other clean images the reversed triggers are scored on"),
        "steps": Param(30, "optimisation steps (raise to 300-1000 for a real audit)"),
        "lr": Param(0.1, "Adam learning rate of the mask and pattern"),
        "init_cost": Param(0.05, "starting weight of the mask-size penalty (adapted per class as in Neural Cleanse)"),
        "cost_patience": Param(5, "steps above or below target_asr before the mask-size weight is raised or lowered"),
        "target_asr": Param(0.95, "attack success a reversed trigger must reach for its mask to count as found"),
        "anomaly_threshold": Param(2.0, "anomaly index above which a class with a small mask is flagged"),
    }
    metrics = {
        "mask_norm.<class>": "L1 norm of the smallest mask found for the class (in pixels)",
        "mask_area.<class>": "the same as a share of the image area",
        "anomaly_index.<class>": "how many robust standard deviations (1.4826 x MAD) the class's mask norm lies "
                                 "below the median; large positive values are suspicious",
        "reversed_asr.<class>": "share of held-out clean images of other classes that the reversed trigger "
                                "sends to the class",
        "n_flagged": "classes flagged as backdoor targets",
        "max_anomaly_index": "largest anomaly index over the scanned classes",
        "n_classes_scanned": "candidate classes scanned",
    }
    default_thresholds = {"n_flagged": "<= 0"}
    uses_model = True

    def run(self, ctx, params):
        _validate(params)
        classes = ctx.classes
        labels = ctx.forward.labels
        if len(classes) < 2:
            return CheckResult.skipped("backdoor_scan: needs at least two classes")
        candidates = np.arange(len(classes))
        if len(candidates) > params["max_classes"]:
            candidates = np.sort(ctx.rng("backdoor_scan.classes").choice(candidates, params["max_classes"], replace=False))
        opt_rows = ctx.stratified_rows(params["n_images"], "backdoor_scan.images")
        rest = np.setdiff1d(np.arange(len(labels)), opt_rows)
        eval_rows = rest[_stratified_positions(labels[rest], params["n_eval"], ctx.rng("backdoor_scan.eval"))]
        warnings: list[str] = []
        if len(eval_rows) == 0:
            eval_rows = opt_rows
            warnings.append("no images left for scoring the reversed triggers: they are scored on the optimisation images")
        size = tuple(ctx.model.image_size)
        channels = 1 if ctx.is_grey else 3
        # A clone: class features made under inference_mode cannot take part in autograd.
        classifier = ctx.model.zero_shot_classifier(ctx.class_features.clone()).to(ctx.device).eval()
        trainable = [p.requires_grad for p in classifier.parameters()]
        classifier.requires_grad_(False)  # the model stays frozen: only masks and patterns learn
        try:
            inversion = invert_triggers(ctx, classifier, candidates, opt_rows, size, channels, params)
            asr = reversed_attack_success(ctx, classifier, inversion, candidates, eval_rows)
        finally:
            for p, flag in zip(classifier.parameters(), trainable):
                p.requires_grad_(flag)

        area = float(size[0] * size[1])
        norms = inversion["norms"]
        index = anomaly_index(norms)
        enough = len(candidates) >= 3
        flagged = (index > params["anomaly_threshold"]) if enough else np.zeros(len(candidates), bool)
        if not enough:
            warnings.append(f"only {len(candidates)} candidate classes: the MAD anomaly test needs at least 3, "
                            "so no class can be flagged; mask norms are still reported")
        not_reached = [classes[c] for c, ok in zip(candidates, inversion["reached"]) if not ok]
        if not_reached:
            warnings.append(f"no trigger reached {params['target_asr']:.0%} success for {', '.join(not_reached)} "
                            "within the steps; their norms are those of the final masks (raise steps)")
        metrics: dict[str, float] = {}
        rows = []
        for k, c in enumerate(candidates):
            name = classes[c]
            metrics[f"mask_norm.{name}"] = float(norms[k])
            metrics[f"mask_area.{name}"] = float(norms[k] / area)
            metrics[f"anomaly_index.{name}"] = float(index[k])
            metrics[f"reversed_asr.{name}"] = float(asr[k])
            rows.append([name, float(norms[k]), float(norms[k] / area), float(index[k]), float(asr[k]),
                         bool(inversion["reached"][k]), "yes" if flagged[k] else "no"])
        metrics["n_flagged"] = float(flagged.sum())
        finite = index[np.isfinite(index)]
        metrics["max_anomaly_index"] = float(finite.max()) if len(finite) else float("nan")
        metrics["n_classes_scanned"] = float(len(candidates))
        table = Table(
            "Reversed triggers per candidate target class",
            ["target class", "mask L1 norm (pixels)", "mask share of image", "anomaly index",
             "attack success of reversed trigger", f"reached {params['target_asr']:.0%} in optimisation", "flagged"],
            rows,
            note=(f"triggers optimised on {len(opt_rows)} clean images for {params['steps']} steps and scored on "
                  f"{len(eval_rows)} others; a class is flagged when its anomaly index exceeds "
                  f"{params['anomaly_threshold']:g} (its mask is that many robust standard deviations below the median)."),
        )
        figures = [norms_figure(rows, params["anomaly_threshold"], enough),
                   reversed_triggers_figure(ctx, inversion, candidates, eval_rows, ctx.is_grey)]
        flagged_names = [classes[c] for c, f in zip(candidates, flagged) if f]
        if flagged_names:
            summary = (f"Possible backdoor: {', '.join(repr(n) for n in flagged_names)} can be reached with an "
                       f"anomalously small stamp (anomaly index {max(index[flagged]):.1f} > {params['anomaly_threshold']:g}).")
        else:
            smallest = int(np.argmin(norms))
            summary = (f"No class flagged among {len(candidates)} scanned; the smallest stamp "
                       f"({norms[smallest] / area:.1%} of the image) targets {classes[candidates[smallest]]!r}.")
        return CheckResult(
            metrics=metrics, summary=summary, tables=[table], figures=figures, warnings=warnings,
            details={"flagged": flagged_names, "candidates": [classes[c] for c in candidates],
                     "final_cost": [float(v) for v in inversion["cost"]]},
        )


def invert_triggers(ctx, classifier: nn.Module, candidates: np.ndarray, rows: np.ndarray,
                    size: tuple[int, int], channels: int, params: dict) -> dict:
    """Smallest (mask, pattern) per candidate class, all classes optimised in one batch."""
    device = ctx.device
    k = len(candidates)
    h, w = size
    gen = ctx.torch_generator("backdoor_scan.init")
    # Masks start small and everywhere, patterns at random; tanh keeps both in [0, 1].
    mask_param = nn.Parameter(torch.full((k, 1, h, w), float(np.arctanh(2 * 0.1 - 1))).to(device))
    pattern_param = nn.Parameter((torch.randn(k, channels, h, w, generator=gen) * 0.5).to(device))
    opt = torch.optim.Adam([mask_param, pattern_param], lr=params["lr"], betas=(0.5, 0.9))
    pixels = ctx.load_pixels(rows)
    labels = ctx.forward.labels[rows]
    # Only images of other classes are stamped: those of the candidate class teach nothing.
    pair_class, pair_image = np.nonzero(labels[None, :] != candidates[:, None])
    pair_class_t = torch.as_tensor(pair_class, device=device)
    pair_image_t = torch.as_tensor(pair_image, device=device)
    pair_target = torch.as_tensor(candidates[pair_class], device=device)
    n_valid = torch.bincount(pair_class_t, minlength=k).float().clamp_min(1)
    chunk = max(1, ctx.batch_size)
    cost = torch.full((k,), params["init_cost"], device=device)
    above = torch.zeros(k, dtype=torch.long, device=device)
    below = torch.zeros(k, dtype=torch.long, device=device)
    best_norm = torch.full((k,), float("inf"), device=device)
    best_mask = torch.zeros(k, 1, h, w, device=device)
    best_pattern = torch.zeros(k, channels, h, w, device=device)
    up, down = 1.5, 1.5**1.5  # Neural Cleanse's cost multipliers
    for _ in range(params["steps"]):
        opt.zero_grad(set_to_none=True)
        hits = torch.zeros(k, device=device)
        for start in range(0, len(pair_class), chunk):
            pk, pi, tgt = (t[start : start + chunk] for t in (pair_class_t, pair_image_t, pair_target))
            mask, pattern = _squash(mask_param), _squash(pattern_param)
            stamped = (1 - mask[pk]) * pixels[pi] + (mask * pattern)[pk]
            with ctx.autocast():
                logits = classifier(stamped).float()
            ce = nn.functional.cross_entropy(logits, tgt, reduction="none")
            (ce / n_valid[pk]).sum().backward()
            hits.index_add_(0, pk, (logits.argmax(dim=-1) == tgt).float().detach())
        mask = _squash(mask_param)
        area = mask.flatten(1).mean(dim=1)
        (cost * area).sum().backward()
        with torch.no_grad():
            asr = hits / n_valid
            norm = mask.detach().flatten(1).sum(dim=1)
            better = (asr >= params["target_asr"]) & (norm < best_norm)
            best_norm = torch.where(better, norm, best_norm)
            best_mask[better] = mask.detach()[better]
            best_pattern[better] = _squash(pattern_param).detach()[better]
            # Neural Cleanse's schedule: a class that keeps succeeding pays more for its mask.
            ok = asr >= params["target_asr"]
            above = torch.where(ok, above + 1, torch.zeros_like(above))
            below = torch.where(ok, torch.zeros_like(below), below + 1)
            raise_cost = above >= params["cost_patience"]
            lower_cost = below >= params["cost_patience"]
            cost = torch.where(raise_cost, cost * up, torch.where(lower_cost, cost / down, cost))
            above = torch.where(raise_cost, torch.zeros_like(above), above)
            below = torch.where(lower_cost, torch.zeros_like(below), below)
        opt.step()
    reached = torch.isfinite(best_norm)
    final_mask, final_pattern = _squash(mask_param).detach(), _squash(pattern_param).detach()
    masks = torch.where(reached[:, None, None, None], best_mask, final_mask)
    patterns = torch.where(reached[:, None, None, None], best_pattern, final_pattern)
    return {
        "masks": masks, "patterns": patterns,
        "norms": masks.flatten(1).sum(dim=1).cpu().numpy().astype(float),
        "reached": reached.cpu().numpy(), "cost": cost.cpu().numpy(),
    }


def _squash(param: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(param) + 1) / 2


def reversed_attack_success(ctx, classifier, inversion: dict, candidates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Share of the rows of other classes that each reversed trigger sends to its class."""
    k = len(candidates)
    hits, counts = np.zeros(k), np.zeros(k)
    stamps = inversion["masks"] * inversion["patterns"]
    keep = 1 - inversion["masks"]
    with torch.no_grad():
        for _, x, y in ctx.iter_batches(rows, desc="backdoor_scan: reversed triggers"):
            y = y.cpu().numpy()
            for i, c in enumerate(candidates):
                other = np.flatnonzero(y != c)
                if len(other) == 0:
                    continue
                with ctx.autocast():
                    preds = classifier(keep[i] * x[other] + stamps[i]).float().argmax(dim=-1).cpu().numpy()
                hits[i] += (preds == c).sum()
                counts[i] += len(other)
    return np.divide(hits, counts, out=np.full(k, np.nan), where=counts > 0)


def anomaly_index(norms: np.ndarray) -> np.ndarray:
    """(median - norm) / (1.4826 * MAD): how far below the typical mask size each class lies."""
    norms = np.asarray(norms, dtype=float)
    median = np.median(norms)
    mad = MAD_CONSISTENCY * np.median(np.abs(norms - median))
    if mad == 0:
        diff = median - norms
        return np.where(diff > 0, np.inf, np.where(diff < 0, -np.inf, 0.0))
    return (median - norms) / mad


def _stratified_positions(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.maximum(1, np.floor(counts / counts.sum() * n).astype(int))
    chosen = [rng.choice(np.flatnonzero(labels == c), size=min(q, cnt), replace=False)
              for c, q, cnt in zip(classes, quotas, counts)]
    return np.sort(np.concatenate(chosen))


def _validate(params: dict) -> None:
    for key in ("max_classes", "n_images", "steps", "cost_patience"):
        if params[key] < 1:
            raise InputError(f"backdoor_scan.{key} must be at least 1")
    if params["n_eval"] < 0:
        raise InputError("backdoor_scan.n_eval must be 0 (all other images) or positive")
    if params["lr"] <= 0 or params["init_cost"] <= 0:
        raise InputError("backdoor_scan.lr and backdoor_scan.init_cost must be positive")
    if not 0 < params["target_asr"] <= 1:
        raise InputError("backdoor_scan.target_asr must be in (0, 1]")
    if params["anomaly_threshold"] <= 0:
        raise InputError("backdoor_scan.anomaly_threshold must be positive")


def norms_figure(rows: list[list], threshold: float, enough: bool):
    from mcaudit.reports.plots import new_figure, to_figure

    names = [str(r[0]) for r in rows]
    areas = np.array([r[2] for r in rows], dtype=float)
    flagged = [r[6] == "yes" for r in rows]
    fig, ax = new_figure(max(4.5, 0.55 * len(names) + 2.5), 3.4)
    x = np.arange(len(names))
    ax.bar(x, areas * 100, color=["#c0392b" if f else "#4c72b0" for f in flagged])
    median = float(np.median(areas))
    ax.axhline(median * 100, color="grey", linestyle="--", linewidth=1, label="median")
    mad = MAD_CONSISTENCY * float(np.median(np.abs(areas - median)))
    if enough and mad > 0 and median - threshold * mad > 0:
        ax.axhline((median - threshold * mad) * 100, color="#c0392b", linestyle=":", linewidth=1,
                   label=f"flag below (anomaly index {threshold:g})")
    ax.set_xticks(x, [n if len(n) <= 14 else n[:12] + "…" for n in names], rotation=30 if len(names) > 3 else 0)
    ax.set_ylabel("smallest mask, % of image")
    ax.set_xlabel("candidate target class")
    ax.legend(fontsize=7)
    return to_figure(fig, "Smallest trigger mask per class",
                     "a backdoored class needs a much smaller stamp than the others; red bars are flagged")


def reversed_triggers_figure(ctx, inversion: dict, candidates: np.ndarray, rows: np.ndarray, grey: bool):
    from mcaudit.reports.plots import image_grid, to_figure

    classes = ctx.classes
    images, titles = [], []
    example_rows = rows[:1] if len(rows) else np.array([0])
    example = ctx.load_pixels(example_rows)[0]
    for k, c in enumerate(candidates):
        mask, pattern = inversion["masks"][k], inversion["patterns"][k]
        shown_mask = mask / mask.max().clamp_min(1e-8)
        stamp = (mask * pattern).expand(3, -1, -1)
        stamped = (1 - mask) * example + mask * pattern
        name = classes[c] if len(classes[c]) <= 14 else classes[c][:12] + "…"
        for img, title in ((shown_mask.expand(3, -1, -1), f"mask → {name}"), (stamp, "mask × pattern"), (stamped, "stamped image")):
            arr = img.permute(1, 2, 0).float().cpu().numpy()
            images.append(arr[..., 0] if grey else np.clip(arr, 0, 1))
            titles.append(title)
    fig = image_grid(images, titles, cols=3, cell=1.8, cmap="gray" if grey else None)
    return to_figure(fig, "Reversed triggers",
                     "one row per candidate class: the mask (scaled to its maximum; white = pasted), the stamp "
                     "it pastes, and a held-out clean image with the stamp")


@hookimpl
def mcaudit_register_checks(register):
    register(BackdoorScanCheck)
