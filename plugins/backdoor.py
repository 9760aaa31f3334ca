"""Susceptibility to a prompt-learning backdoor (BAPLe, MICCAI 2024).

The question: someone tunes the prompts of our frozen model on a few labelled images. How
easily can they plant a backdoor, a trigger that sends any image to a class of their choice
while the prompts still look as accurate as honestly tuned ones?

The attack, as in BAPLe: the model stays frozen. CoOp context vectors (free token embeddings
in place of a hand-written template) are learned together with an image-agnostic trigger,
additive noise bounded in L-inf plus an optional small patch in the bottom-right corner (a
fixed random pattern unless ``learn_patch``), on
a few-shot split where a small share of images of the other classes carry the trigger and
the target label. The same optimisation without poison gives the honest prompts the
backdoored ones are compared with. Everything is scored on the held-out images.

Defaults are sized for a quick look (the demo runs in seconds). For a real audit raise
``steps`` (CoOp and BAPLe train for tens of epochs: 300 to 1000 full-batch steps) and use
the data set's own few-shot size in ``shots``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl
from mcaudit.metrics import accuracy, bootstrap_interval


class Trigger(nn.Module):
    """Additive noise in an L-inf ball plus an optional patch pasted in the bottom-right corner.

    The noise is learned. The patch starts as a seeded random pattern (as in BadNets) and is
    learned too only with ``learn_patch``. For grey images (X-ray, CT, MRI) the trigger is
    grey, as a real one would have to be.
    """

    def __init__(self, channels: int, size: tuple[int, int], epsilon: float, patch_px: int, gen: torch.Generator,
                 learn_patch: bool = False):
        super().__init__()
        h, w = size
        self.epsilon = float(epsilon)
        self.noise = nn.Parameter(torch.zeros(1, channels, h, w))
        self.patch = nn.Parameter(torch.rand(1, channels, h, w, generator=gen), requires_grad=learn_patch)
        mask = torch.zeros(1, 1, h, w)
        if patch_px > 0:
            mask[..., h - patch_px :, w - patch_px :] = 1.0
        self.register_buffer("mask", mask)

    @property
    def has_patch(self) -> bool:
        return bool(self.mask.any())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        noisy = (pixels + self.noise.clamp(-self.epsilon, self.epsilon)).clamp(0.0, 1.0)
        return noisy * (1 - self.mask) + self.patch.clamp(0.0, 1.0) * self.mask

    @torch.no_grad()
    def project(self) -> None:
        self.noise.clamp_(-self.epsilon, self.epsilon)
        self.patch.clamp_(0.0, 1.0)


class BackdoorCheck(Check):
    name = "backdoor"
    description = (
        "Susceptibility to a prompt-learning backdoor (BAPLe): with the model frozen, learns "
        "CoOp prompt context together with an image-agnostic trigger (bounded noise plus a small "
        "patch) on a few-shot split where a few images carry the trigger and the target label; "
        "reports the attack success rate and the clean accuracy of backdoored and honest prompts."
    )
    params = {
        "target": Param("", "class to plant the backdoor for; empty: each class in turn (up to max_targets)"),
        "max_targets": Param(4, "most target classes tried when target is empty (the first ones, in class order)"),
        "n_ctx": Param(16, "number of learned context tokens (CoOp)"),
        "shots": Param(32, "few-shot training images per class; all other images are held out"),
        "poison_fraction": Param(0.05, "share of the few-shot images given the trigger and the target label"),
        "epsilon": Param(8 / 255, "L-inf bound of the trigger noise, in [0, 1] pixel units"),
        "patch_fraction": Param(0.1, "side of the trigger patch as a share of the image side (0: noise only)"),
        "learn_patch": Param(False, "learn the patch's pixels too (a stronger, visible trigger); else a fixed random patch"),
        "steps": Param(40, "full-batch optimisation steps (raise to 300-1000 for a real audit)"),
        "lr": Param(0.02, "Adam learning rate of the context vectors"),
        "trigger_lr": Param(0.01, "Adam learning rate of the trigger noise and patch"),
        "max_eval": Param(256, "held-out images scored, stratified by class (0: all)"),
        "n_bootstrap": Param(200, "bootstrap resamples for the 95% intervals (0 turns them off)"),
    }
    metrics = {
        "asr.<class>": "attack success rate: share of triggered held-out images of other classes "
                       "that the backdoored prompts classify as the class",
        "clean_accuracy.<class>": "held-out accuracy of the prompts backdoored for the class, on clean images",
        "accuracy_drop.<class>": "clean accuracy of the honest prompts minus that of the backdoored ones",
        "base_rate.<class>": "share of clean held-out images of other classes that the honest prompts "
                             "classify as the class (the attack success rate of no attack)",
        "trigger_only_rate.<class>": "share of triggered held-out images of other classes that the honest "
                                     "prompts classify as the class (what the trigger does without the backdoor)",
        "clean_accuracy_unpoisoned": "held-out accuracy of prompts learned the same way without poison",
        "zero_shot_accuracy": "held-out accuracy of the hand-written prompts, for comparison",
        "asr_max": "highest attack success rate over the target classes tried",
        "accuracy_drop_max": "largest clean-accuracy cost of a backdoor over the target classes tried",
        "n_train": "few-shot training images",
        "n_poisoned": "training images carrying the trigger (per target class)",
        "n_eval": "held-out images scored",
    }
    default_thresholds = {}
    uses_model = True

    def run(self, ctx, params):
        _validate(params, ctx.classes)
        model = ctx.model
        try:
            width = model.text_width
        except TypeError as exc:
            return CheckResult.skipped(f"backdoor: {exc}, so prompts cannot be learned")
        classes = ctx.classes
        if len(classes) < 2:
            return CheckResult.skipped("backdoor: needs at least two classes")
        labels = ctx.forward.labels
        warnings: list[str] = []
        train_rows, eval_rows = few_shot_split(labels, params["shots"], ctx.rng("backdoor.split"), warnings)
        if len(eval_rows) == 0 or len(np.unique(labels[train_rows])) < 2:
            return CheckResult.skipped("backdoor: too few images for a few-shot split with held-out images")
        if params["max_eval"] > 0 and len(eval_rows) > params["max_eval"]:
            eval_rows = _stratified_subset(eval_rows, labels, params["max_eval"], ctx.rng("backdoor.eval"))
        targets = [classes.index(params["target"])] if params["target"] else list(range(min(len(classes), params["max_targets"])))

        names = [_class_phrase(ctx.prompts, c) for c in classes]
        feats = torch.as_tensor(ctx.forward.image_features, dtype=torch.float32, device=ctx.device)
        scale = float(model.logit_scale)
        eval_labels = labels[eval_rows]
        eval_feats = feats[torch.as_tensor(eval_rows, device=ctx.device)]
        size = tuple(model.image_size)
        channels = 1 if ctx.is_grey else 3
        patch_px = int(round(params["patch_fraction"] * min(size)))
        if params["patch_fraction"] > 0:
            patch_px = max(1, patch_px)
        learner = PromptLearner(model, names, width, scale, params, ctx)

        honest_ctx = learner.fit(feats, train_rows, labels, poison_rows=np.array([], int), target=0, trigger=None)
        honest_text = learner.text_features(honest_ctx)
        honest_preds = _predict(eval_feats, honest_text)
        zero_shot_preds = ctx.forward.preds[eval_rows]
        metrics = {
            "clean_accuracy_unpoisoned": accuracy(eval_labels, honest_preds),
            "zero_shot_accuracy": accuracy(eval_labels, zero_shot_preds),
            "n_train": float(len(train_rows)),
            "n_eval": float(len(eval_rows)),
        }
        rng_boot = ctx.rng("backdoor.bootstrap")
        nb = params["n_bootstrap"]
        intervals = {
            "clean_accuracy_unpoisoned": bootstrap_interval(
                lambda i: accuracy(eval_labels[i], honest_preds[i]), len(eval_rows), rng_boot, nb, strata=eval_labels),
        }
        rows, shown, per_target = [], [], {}
        n_rows = len(labels)
        split = [None] * n_rows
        for r in train_rows:
            split[r] = "train"
        for r in eval_rows:
            split[r] = "held-out"
        per_image = {"split": split, "honest_pred": _column(n_rows, eval_rows, honest_preds, classes)}
        n_poison = 0
        for t in targets:
            poison_rows = choose_poison(train_rows, labels, t, params["poison_fraction"], ctx.rng(f"backdoor.poison.{t}"))
            n_poison = len(poison_rows)
            trigger = Trigger(channels, size, params["epsilon"], patch_px, ctx.torch_generator(f"backdoor.trigger.{t}"),
                              params["learn_patch"]).to(ctx.device)
            if n_poison:
                bd_ctx = learner.fit(feats, train_rows, labels, poison_rows=poison_rows, target=t, trigger=trigger)
            else:
                bd_ctx = honest_ctx  # no poison: the same optimisation as the honest prompts
            bd_text = learner.text_features(bd_ctx)
            bd_preds = _predict(eval_feats, bd_text)
            others = eval_rows[eval_labels != t]
            trig_feats = _triggered_features(ctx, others, trigger)
            trig_bd = _predict(trig_feats, bd_text) if len(others) else np.array([], int)
            trig_honest = _predict(trig_feats, honest_text) if len(others) else np.array([], int)
            clean_others = honest_preds[eval_labels != t]
            c = classes[t]
            asr = _rate(trig_bd == t)
            metrics[f"asr.{c}"] = asr
            metrics[f"clean_accuracy.{c}"] = accuracy(eval_labels, bd_preds)
            metrics[f"accuracy_drop.{c}"] = metrics["clean_accuracy_unpoisoned"] - metrics[f"clean_accuracy.{c}"]
            metrics[f"base_rate.{c}"] = _rate(clean_others == t)
            metrics[f"trigger_only_rate.{c}"] = _rate(trig_honest == t)
            if len(others) >= 2:
                hits = (trig_bd == t).astype(float)
                intervals[f"asr.{c}"] = bootstrap_interval(lambda i: float(hits[i].mean()), len(hits), rng_boot, nb)
            intervals[f"clean_accuracy.{c}"] = bootstrap_interval(
                lambda i: accuracy(eval_labels[i], bd_preds[i]), len(eval_rows), rng_boot, nb, strata=eval_labels)
            rows.append([c, n_poison, len(others), asr, metrics[f"base_rate.{c}"], metrics[f"trigger_only_rate.{c}"],
                         metrics[f"clean_accuracy.{c}"], metrics["clean_accuracy_unpoisoned"], metrics[f"accuracy_drop.{c}"]])
            per_image[f"backdoored_pred.{c}"] = _column(n_rows, eval_rows, bd_preds, classes)
            per_image[f"triggered_pred.{c}"] = _column(n_rows, others, trig_bd, classes)
            per_target[c] = {"poisoned_rows": [int(r) for r in poison_rows],
                             "noise_linf": float(trigger.noise.detach().abs().max()),
                             "patch_px": patch_px}
            example = ctx.load_pixels(others[:1] if len(others) else eval_rows[:1])
            shown.append((c, trigger, example, asr))
        metrics["n_poisoned"] = float(n_poison)
        asrs = [metrics[f"asr.{classes[t]}"] for t in targets]
        drops = [metrics[f"accuracy_drop.{classes[t]}"] for t in targets]
        metrics["asr_max"] = float(np.nanmax(asrs)) if np.isfinite(asrs).any() else float("nan")
        metrics["accuracy_drop_max"] = float(np.nanmax(drops))
        intervals = {k: v for k, v in intervals.items() if np.isfinite(v[0])}
        if n_poison == 0:
            warnings.append("no training image was poisoned (poison_fraction 0 or no images of other classes): "
                            "the backdoored prompts are the honest ones and the trigger was not learned")
        table = Table(
            "Backdoor per target class (held-out images)",
            ["target class", "poisoned training images", "triggered images of other classes",
             "attack success rate", "base rate (no trigger)", "trigger alone, honest prompts",
             "clean accuracy, backdoored prompts", "clean accuracy, honest prompts", "accuracy cost"],
            rows,
            note=(f"{len(train_rows)} few-shot training images ({params['shots']} per class at most), "
                  f"{len(eval_rows)} held-out images; {params['n_ctx']} context tokens, {params['steps']} steps; "
                  f"trigger noise within ±{params['epsilon']:.4f} plus a {patch_px}-pixel patch."),
        )
        figures = [summary_figure(rows), trigger_figure(shown, params["epsilon"], ctx.is_grey)]
        worst = targets[int(np.nanargmax(asrs))] if np.isfinite(asrs).any() else targets[0]
        wc = classes[worst]
        summary = (
            f"Prompts tuned on {len(train_rows)} images with {n_poison} poisoned send "
            f"{metrics[f'asr.{wc}']:.0%} of triggered images to {wc!r} (base rate {metrics[f'base_rate.{wc}']:.0%}), "
            f"at clean accuracy {metrics[f'clean_accuracy.{wc}']:.1%} vs {metrics['clean_accuracy_unpoisoned']:.1%} "
            f"for honest prompts."
        )
        return CheckResult(
            metrics=metrics, intervals=intervals, summary=summary, tables=[table], figures=figures,
            warnings=warnings, per_image=per_image,
            details={"targets": per_target, "class_phrases": names, "train_rows": [int(r) for r in train_rows]},
        )


class PromptLearner:
    """CoOp context optimisation on a frozen model, optionally with a jointly learned trigger."""

    def __init__(self, model, names: list[str], width: int, scale: float, params: dict, ctx):
        self.model = model
        self.names = names
        self.scale = scale
        self.params = params
        self.ctx = ctx
        # One starting point for every run, so honest and backdoored prompts differ only by the poison.
        gen = ctx.torch_generator("backdoor.context")
        self.init = torch.randn(params["n_ctx"], width, generator=gen) * 0.02

    def text_features(self, context: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_text_with_context(context, self.names).float()

    def fit(self, feats: torch.Tensor, train_rows: np.ndarray, labels: np.ndarray, poison_rows: np.ndarray,
            target: int, trigger: Trigger | None) -> torch.Tensor:
        device = self.ctx.device
        model = self.model
        frozen = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        clean_rows = np.setdiff1d(train_rows, poison_rows)
        clean_feats = feats[torch.as_tensor(clean_rows, device=device)]
        clean_labels = torch.as_tensor(labels[clean_rows], device=device)
        n_total = len(train_rows)
        context = nn.Parameter(self.init.clone().to(device))
        opts = [torch.optim.Adam([context], lr=self.params["lr"])]
        poisoned = trigger is not None and len(poison_rows) > 0
        if poisoned:
            poison_pixels = self.ctx.load_pixels(poison_rows)
            poison_labels = torch.full((len(poison_rows),), target, device=device, dtype=torch.long)
            opts.append(torch.optim.Adam([p for p in trigger.parameters() if p.requires_grad], lr=self.params["trigger_lr"]))
        try:
            for _ in range(self.params["steps"]):
                text = model.encode_text_with_context(context, self.names)
                loss = nn.functional.cross_entropy(self.scale * clean_feats @ text.T, clean_labels, reduction="sum")
                if poisoned:
                    with self.ctx.autocast():
                        img = model.encode_image(trigger(poison_pixels))
                    loss = loss + nn.functional.cross_entropy(self.scale * img.float() @ text.T, poison_labels, reduction="sum")
                loss = loss / n_total
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in opts:
                    opt.step()
                if poisoned:
                    trigger.project()
        finally:
            for p, flag in zip(model.parameters(), frozen):
                p.requires_grad_(flag)
        return context.detach()


def few_shot_split(labels: np.ndarray, shots: int, rng: np.random.Generator, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``shots`` training rows per class, never more than half of a class; the rest held out."""
    train = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = min(shots, len(rows) // 2)
        if k < shots:
            warnings.append(f"class {int(c)} has {len(rows)} images: {k} used for training, the rest held out")
        train.append(rng.choice(rows, size=k, replace=False))
    train_rows = np.sort(np.concatenate(train)) if train else np.array([], int)
    eval_rows = np.setdiff1d(np.arange(len(labels)), train_rows)
    return train_rows, eval_rows


def choose_poison(train_rows: np.ndarray, labels: np.ndarray, target: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Training rows of the other classes that get the trigger and the target label."""
    if fraction <= 0:
        return np.array([], dtype=int)
    candidates = train_rows[labels[train_rows] != target]
    n = min(len(candidates), max(1, int(round(fraction * len(train_rows)))))
    return np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.array([], dtype=int)


def _stratified_subset(rows: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    chosen = []
    classes, counts = np.unique(labels[rows], return_counts=True)
    quotas = np.maximum(1, np.round(counts / counts.sum() * n).astype(int))
    for c, q in zip(classes, quotas):
        pool = rows[labels[rows] == c]
        chosen.append(rng.choice(pool, size=min(q, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen))


def _class_phrase(prompts, class_name: str) -> str:
    # The first phrasing in the prompt file says the class as clinicians write it.
    phrasings = getattr(prompts, "phrasings", {}) or {}
    return (phrasings.get(class_name) or [class_name])[0]


def _predict(image_feats: torch.Tensor, text_feats: torch.Tensor) -> np.ndarray:
    if len(image_feats) == 0:
        return np.array([], dtype=int)
    return (image_feats.float() @ text_feats.T).argmax(dim=1).cpu().numpy()


def _triggered_features(ctx, rows: np.ndarray, trigger: Trigger) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for _, pixels, _ in ctx.iter_batches(rows, desc="backdoor: triggered images"):
            with ctx.autocast():
                out.append(ctx.model.encode_image(trigger(pixels)).float())
    width = ctx.forward.image_features.shape[1]
    return torch.cat(out) if out else torch.zeros(0, width, device=ctx.device)


def _column(n_rows: int, rows: np.ndarray, preds: np.ndarray, classes: list[str]) -> list:
    """Predicted class names at ``rows`` of the forward pass, None elsewhere (samples.csv)."""
    out: list = [None] * n_rows
    for r, p in zip(rows, preds):
        out[int(r)] = classes[int(p)]
    return out


def _rate(hits: np.ndarray) -> float:
    return float(np.mean(hits)) if len(hits) else float("nan")


def _validate(params: dict, classes: list[str]) -> None:
    if params["target"] and params["target"] not in classes:
        raise InputError(f"backdoor.target: {params['target']!r} is not a class (classes: {', '.join(classes)})")
    if params["max_targets"] < 1:
        raise InputError("backdoor.max_targets must be at least 1")
    if params["n_ctx"] < 1:
        raise InputError("backdoor.n_ctx must be at least 1")
    if params["shots"] < 1:
        raise InputError("backdoor.shots must be at least 1")
    if not 0 <= params["poison_fraction"] < 1:
        raise InputError("backdoor.poison_fraction must be in [0, 1)")
    if not 0 <= params["epsilon"] <= 1:
        raise InputError("backdoor.epsilon must be in [0, 1]")
    if not 0 <= params["patch_fraction"] <= 0.5:
        raise InputError("backdoor.patch_fraction must be in [0, 0.5]")
    if params["steps"] < 1:
        raise InputError("backdoor.steps must be at least 1")
    if params["lr"] <= 0 or params["trigger_lr"] <= 0:
        raise InputError("backdoor.lr and backdoor.trigger_lr must be positive")
    if params["max_eval"] < 0:
        raise InputError("backdoor.max_eval must be 0 (all) or positive")


def trigger_figure(shown: list, epsilon: float, grey: bool):
    """Each learned trigger (noise amplified to be visible, and the patch) on an example image."""
    from mcaudit.reports.plots import image_grid, to_figure

    amplify = 0.5 / max(epsilon, 1e-8)
    images, titles = [], []
    for target, trigger, example, asr in shown:
        with torch.no_grad():
            noise = trigger.noise.clamp(-epsilon, epsilon)
            pattern = (0.5 + noise * amplify) * (1 - trigger.mask) + trigger.patch.clamp(0, 1) * trigger.mask
            triggered = trigger(example)
            # in units of the noise bound, so the noise shows at full scale (the patch saturates)
            change = ((triggered - example).abs() / max(epsilon, 1e-8)).clamp(0, 1)
        images += [_as_image(t, grey) for t in (pattern, example, triggered, change)]
        titles += [f"trigger for {_short(target)}", "clean image", f"triggered: {asr:.0%} success", "|change| / bound"]
    fig = image_grid(images, titles, cols=4, cell=2.0, cmap="gray" if grey else None)
    return to_figure(
        fig, "Learned triggers",
        f"one row per target class; noise amplified ×{amplify:.0f} around mid-grey (actual bound ±{epsilon:.4f}), "
        "patch in the bottom-right corner shown as is; the change is shown in units of the bound; success = share of triggered held-out images of other "
        "classes sent to the target by the backdoored prompts",
    )


def _as_image(t: torch.Tensor, grey: bool) -> np.ndarray:
    arr = t[0].expand(3, -1, -1).permute(1, 2, 0).float().cpu().numpy()
    return arr[..., 0] if grey else np.clip(arr, 0, 1)


def _short(name: str) -> str:
    return name if len(name) <= 16 else name[:14] + "…"


def summary_figure(rows: list[list]):
    from mcaudit.reports.plots import new_figure, to_figure

    names = [str(r[0]) for r in rows]
    x = np.arange(len(names))
    series = [("attack success rate", 3), ("base rate", 4), ("clean acc., backdoored", 6), ("clean acc., honest", 7)]
    fig, ax = new_figure(max(4.5, 1.2 * len(names) + 2.5), 3.4)
    w = 0.8 / len(series)
    for k, (label, col) in enumerate(series):
        vals = [np.nan if r[col] is None else float(r[col]) for r in rows]
        ax.bar(x + (k - (len(series) - 1) / 2) * w, vals, w, label=label)
    ax.set_xticks(x, [_short(n) for n in names], rotation=30 if len(names) > 3 else 0)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("share of held-out images")
    ax.set_xlabel("target class")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    return to_figure(fig, "Backdoor success and its cost", "held-out images; attack success rate on triggered images of other classes")


@hookimpl
def mcaudit_register_checks(register):
    register(BackdoorCheck)
