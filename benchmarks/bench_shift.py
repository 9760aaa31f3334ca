"""The shift check against a bare loop applying the same corruptions.

    python benchmarks/bench_shift.py [--n 256] [--corruptions all] [--device auto] [--repeats 3]

Both sides corrupt the same stratified phantoms of the embedded demo model with the same
corruption functions, the same per-image generators and the same strengths, at every
severity, in batches of the same size, and score the corrupted images. The audit side is
``ShiftCheck.run``; on top of the corruptions it pays for the intervals (Wilson, Jeffreys,
paired bootstraps), ECE per severity, the table, the heat map, the accuracy curves and the
example gallery. The overhead target is at most 10% (ratio <= 1.10). Each side runs
``--repeats`` times and the fastest run counts.
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


def bare_loop(ctx, rows, plan, batch_size) -> tuple[float, dict]:
    from mcaudit.plugins.checks.shift import CORRUPTIONS, level

    start = time.perf_counter()
    model = ctx.classifier()
    labels = ctx.forward.labels
    hits = {cell: 0 for cell in plan.cells}
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            x = ctx.load_pixels(chunk)
            grey = ctx.forward.grey[chunk]
            for c, s in plan.cells:
                rngs = [ctx.image_rng(f"shift:{c}", int(r)) for r in chunk]
                xc = CORRUPTIONS[c].apply(x, level(plan.modality, c, s), rngs, grey)
                hits[(c, s)] += int((model(xc).argmax(1).cpu().numpy() == labels[chunk]).sum())
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, {cell: k / len(rows) for cell, k in hits.items()}


def audit(ctx, n, plan) -> tuple[float, dict]:
    from mcaudit.plugins.checks.shift import ShiftCheck

    params = ShiftCheck.resolve_params({"modality": plan.modality, "corruptions": plan.corruptions,
                                        "severities": plan.severities, "n_images": n})
    start = time.perf_counter()
    result = ShiftCheck().run(ctx, params)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, {(c, s): result.metrics[f"accuracy.{c}.s{s}"] for c, s in plan.cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images corrupted")
    ap.add_argument("--corruptions", default="all", help="radiography corruptions: all, core or names, comma-separated")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mcaudit.devices import resolve_device
    from mcaudit.plugins.checks.shift import select
    from mcaudit.plugins.checks.shift.evaluate import Plan
    from mcaudit.testing import load_adapter, make_context, phantom_dataset

    device = str(resolve_device(args.device))
    model = load_adapter("demo", device=device)
    ctx = make_context(model, phantom_dataset(max(args.n, 64), seed=11), batch_size=args.batch_size)
    plan = Plan("radiography", select("radiography", args.corruptions.split(",")), [1, 2, 3, 4, 5])
    rows = np.sort(ctx.stratified_rows(args.n, "shift:rows"))
    # warm both paths once (allocator, thread pools, lazy imports, matplotlib)
    small = Plan(plan.modality, plan.corruptions[:1], [1])
    bare_loop(ctx, rows[:8], small, args.batch_size)
    audit(ctx, 8, small)
    bare_runs = [bare_loop(ctx, rows, plan, args.batch_size) for _ in range(args.repeats)]
    audit_runs = [audit(ctx, args.n, plan) for _ in range(args.repeats)]
    bare, bare_acc = min(bare_runs, key=lambda r: r[0])
    checked, audit_acc = min(audit_runs, key=lambda r: r[0])
    print(f"machine: {machine()}")
    print(f"demo model, {len(rows)} images, {len(plan.corruptions)} corruptions x 5 severities, batch {args.batch_size}, "
          f"{device}, {torch.get_num_threads()} threads, best of {args.repeats}")
    if any(abs(bare_acc[cell] - audit_acc[cell]) > 1e-9 for cell in plan.cells):
        raise SystemExit("the two sides disagree: they did not do the same work")
    print(f"bare corruption loop: {bare:.2f} s")
    print(f"shift audit: {checked:.2f} s")
    print(f"ratio audit / bare: {checked / bare:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
