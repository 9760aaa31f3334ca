"""Batched deletion and insertion curves against an unbatched loop on the same work.

    python benchmarks/bench_deletion.py [--model demo] [--n 8] [--orders 5] [--steps 20]
                                        [--batch-size 256] [--device auto]

Both sides score the same perturbed images: N phantom images, ``orders`` pixel orders per
image (attribution maps, here random ones), deletion and insertion, ``steps + 1`` points per
curve. The loop builds one perturbed image and runs one forward pass per curve point, as a
straightforward implementation does; the saliency check's ``perturbation_curves`` builds the
states on the device with one mask comparison per batch and scores ``--batch-size`` of them per
pass, sharing the curve ends (the image and the baseline) between orders. The curves must
agree; the speed-up is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def loop_curves(classifier, pixels, baselines, ranks, targets, steps):
    m, n, hw = ranks.shape
    deletion = np.empty((m, n, steps + 1))
    insertion = np.empty((m, n, steps + 1))
    for o in range(m):
        for i in range(n):
            order = torch.argsort(ranks[o, i])
            for k in range(steps + 1):
                top = order[: (k * hw) // steps].to(pixels.device)
                deleted = pixels[i].clone().reshape(3, -1)
                deleted[:, top] = baselines[i].reshape(3, -1)[:, top]
                inserted = baselines[i].clone().reshape(3, -1)
                inserted[:, top] = pixels[i].reshape(3, -1)[:, top]
                with torch.no_grad():
                    deletion[o, i, k] = float(classifier(deleted.reshape(1, *pixels.shape[1:]))[0, targets[i]])
                    insertion[o, i, k] = float(classifier(inserted.reshape(1, *pixels.shape[1:]))[0, targets[i]])
    return deletion, insertion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--orders", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--baseline", default="blur")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from mcaudit.devices import resolve_device
    from mcaudit.plugins.checks.saliency.metrics import baseline_images, perturbation_curves, pixel_ranks
    from mcaudit.testing import load_adapter, make_context, phantom_dataset

    device = resolve_device(args.device)
    adapter = load_adapter(args.model, device=str(device))
    data = phantom_dataset(max(args.n, 2), seed=5, image_size=adapter.image_size)
    ctx = make_context(adapter, data)
    classifier = ctx.classifier()
    classifier.class_features = classifier.class_features.clone()
    rows = np.arange(args.n)
    pixels = ctx.load_pixels(rows)
    targets = torch.as_tensor(ctx.forward.preds[rows], device=device)
    gen = torch.Generator().manual_seed(0)
    ranks = torch.stack([pixel_ranks(torch.rand(args.n, *pixels.shape[-2:], generator=gen), gen) for _ in range(args.orders)])
    baselines = baseline_images(pixels, args.baseline)

    def score(x, i):
        return classifier(x)[torch.arange(len(x), device=x.device), targets[i]]

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    perturbation_curves(score, pixels[:1], baselines[:1], ranks[:1, :1], 2, args.batch_size)  # warm-up
    (b_del, b_ins), t_batched = timed(lambda: perturbation_curves(score, pixels, baselines, ranks, args.steps, args.batch_size))
    (l_del, l_ins), t_loop = timed(lambda: loop_curves(classifier, pixels, baselines, ranks, targets, args.steps))
    diff = max(np.abs(b_del - l_del).max(), np.abs(b_ins - l_ins).max())
    points = 2 * args.orders * args.n * (args.steps + 1)
    print(f"machine: {machine()}; device {device}")
    print(f"model {args.model}, {args.n} images {tuple(pixels.shape[-2:])}, {args.orders} orders, {args.steps} steps: {points} curve points")
    print(f"unbatched loop : {t_loop:8.3f} s ({points} forward passes)")
    print(f"batched curves : {t_batched:8.3f} s (batch size {args.batch_size})")
    print(f"speed-up       : {t_loop / t_batched:8.1f}x   (largest score difference {diff:.2e})")
    if diff > 1e-3:
        raise SystemExit("batched and unbatched curves disagree")


if __name__ == "__main__":
    main()
