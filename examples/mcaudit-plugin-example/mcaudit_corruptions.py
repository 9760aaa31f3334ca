"""mcaudit plugin: zero-shot accuracy under common medical image corruptions.

Each corruption works on pixels in [0, 1] and keeps grey images grey. Severity 1 is barely
visible; severity 5 is what a failing detector or an aggressive PACS export produces.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from mcaudit import Check, CheckResult, InputError, Param, Table, hookimpl

SEVERITIES = (1, 2, 3, 4, 5)


def gaussian_blur(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    sigma = (0.5, 1.0, 1.5, 2.5, 3.5)[severity - 1] * x.shape[-1] / 224 * 2
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.transpose(-1, -2), groups=x.shape[1])


def gaussian_noise(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    std = (0.04, 0.08, 0.12, 0.18, 0.26)[severity - 1]
    noise = torch.randn(x.shape[0], 1, *x.shape[2:], generator=gen).to(x.device)
    # one noise field for all channels, so a grey image stays grey
    return (x + std * noise).clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    c = (0.75, 0.6, 0.45, 0.3, 0.2)[severity - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def gamma(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    g = (1.3, 1.6, 2.0, 2.5, 3.2)[severity - 1]
    return x.clamp(0, 1) ** g


def jpeg(x: torch.Tensor, severity: int, gen: torch.Generator) -> torch.Tensor:
    from PIL import Image

    quality = (60, 35, 20, 10, 5)[severity - 1]
    out = []
    for img in x.detach().cpu():
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(back).permute(2, 0, 1))
    return torch.stack(out).to(x.device)


CORRUPTIONS = {
    "gaussian_blur": gaussian_blur,
    "gaussian_noise": gaussian_noise,
    "contrast": contrast,
    "gamma": gamma,
    "jpeg": jpeg,
}


class CorruptionsCheck(Check):
    name = "corruptions"
    description = (
        "Zero-shot accuracy under blur, noise, contrast loss, gamma shift and JPEG compression "
        "at five severities; mean corruption error (mCE) and relative mCE."
    )
    params = {
        "n_images": Param(64, "images in the stratified subsample (0 = all)"),
        "corruptions": Param(list(CORRUPTIONS), "corruptions to apply", None),
        "batch_size": Param(32, "images per forward pass"),
    }
    metrics = {
        "clean_accuracy": "accuracy on the subsample without corruption",
        "<corruption>.s<k>": "accuracy under a corruption at severity k (1-5)",
        "<corruption>.error": "error averaged over the five severities",
        "mce": "mean corruption error: error averaged over corruptions and severities",
        "relative_mce": "mean over corruptions of (corrupted error - clean error), averaged over severities",
    }
    default_thresholds = {"relative_mce": "<= 0.25"}

    def run(self, ctx, params):
        unknown = [c for c in params["corruptions"] if c not in CORRUPTIONS]
        if unknown:
            raise InputError(f"corruptions.corruptions: unknown {unknown[0]!r} (known: {', '.join(CORRUPTIONS)})")
        rows = ctx.stratified_rows(params["n_images"], "corruptions")
        model = ctx.classifier()
        correct = {name: {s: 0 for s in SEVERITIES} for name in params["corruptions"]}
        clean = 0
        gen = ctx.torch_generator("corruptions.noise")
        with torch.no_grad(), ctx.autocast():
            for _, pixels, labels in ctx.iter_batches(rows, params["batch_size"], "corruptions"):
                clean += int((model(pixels).argmax(1) == labels).sum())
                for name in params["corruptions"]:
                    for s in SEVERITIES:
                        corrupted = CORRUPTIONS[name](pixels, s, gen)
                        correct[name][s] += int((model(corrupted).argmax(1) == labels).sum())
        n = len(rows)
        clean_acc = clean / n
        metrics = {"clean_accuracy": clean_acc}
        table_rows = []
        errors, rel = [], []
        for name in params["corruptions"]:
            accs = [correct[name][s] / n for s in SEVERITIES]
            for s, a in zip(SEVERITIES, accs):
                metrics[f"{name}.s{s}"] = a
            err = 1 - float(np.mean(accs))
            metrics[f"{name}.error"] = err
            errors.append(err)
            rel.append(err - (1 - clean_acc))
            table_rows.append([name] + [round(a, 4) for a in accs] + [round(err, 4)])
        metrics["mce"] = float(np.mean(errors))
        metrics["relative_mce"] = float(np.mean(rel))
        worst = params["corruptions"][int(np.argmax(errors))]
        return CheckResult(
            metrics=metrics,
            summary=f"Clean accuracy {clean_acc:.1%}; mean corruption error {metrics['mce']:.1%}, worst under {worst}.",
            tables=[Table("Accuracy per corruption and severity", ["corruption", "s1", "s2", "s3", "s4", "s5", "mean error"], table_rows,
                          note=f"{n} images; severity 1 is mild, 5 is severe")],
        )


@hookimpl
def mcaudit_register_checks(register):
    register(CorruptionsCheck)
