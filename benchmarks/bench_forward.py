"""Forward-only audit against a bare open_clip loop that encodes the same images.

    python benchmarks/bench_forward.py [--arch ViT-B-32] [--n 512] [--batch-size 64] [--device auto]

Both sides decode the same PNG files through a DataLoader with the same batch size and
workers, and run the same randomly initialised open_clip model under inference mode. The
audit side is ``mcaudit run`` with the forward-only checks (performance, calibration,
fairness, anomaly), which adds metrics, bootstrap intervals, plots and the report on top of
the pass, and encodes anomaly's two generated OOD sets (16 images each here). Both sides are
timed from loading the model to the end. The overhead target is at most 15% (ratio <= 1.15).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_phantom_manifest  # noqa: E402


def bare_loop(arch: str, checkpoint: Path, manifest: Path, batch_size: int, workers: int, device: str, precision: str) -> float:
    import csv

    import open_clip
    from PIL import Image

    # timed from model loading on, as the audit is: a bare script has to load the model too
    start = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(checkpoint), device=device)
    model.eval()
    rows = list(csv.DictReader(open(manifest)))
    paths = [manifest.parent / r["path"] for r in rows]

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return preprocess(Image.open(paths[i]).convert("RGB"))

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, num_workers=workers, pin_memory=device.startswith("cuda"))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.inference_mode(), torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
        for x in loader:
            model.encode_image(x.to(device, non_blocking=True))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def audit_run(arch: str, checkpoint: Path, manifest: Path, out: Path, batch_size: int, workers: int, device: str, precision: str) -> float:
    from click.testing import CliRunner

    from mcaudit.cli import cli

    args = ["run", "--quiet", "--model", arch, "--checkpoint", str(checkpoint), "--data", str(manifest),
            "--group", "site", "--group", "sex", "--checks", "performance,calibration,fairness,anomaly",
            # the generated OOD sets are extra images the bare loop never encodes: keep them small
            "--set", "anomaly.n_generated=16",
            "--batch-size", str(batch_size), "--workers", str(workers), "--device", device, "--precision", precision,
            "--out", str(out)]
    start = time.perf_counter()
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    elapsed = time.perf_counter() - start
    if result.exit_code not in (0, 1):
        raise SystemExit(result.output)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    import open_clip

    from mcaudit.devices import resolve_device

    device = str(resolve_device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_phantom_manifest(tmp / "data", args.n)
        torch.manual_seed(0)
        model = open_clip.create_model(args.arch)
        checkpoint = tmp / "weights.pt"
        torch.save(model.state_dict(), checkpoint)
        # warm both paths once (allocator, thread pools, lazy imports) on a few images
        small = write_phantom_manifest(tmp / "warm", 16)
        bare_loop(args.arch, checkpoint, small, args.batch_size, 0, device, args.precision)
        audit_run(args.arch, checkpoint, small, tmp / "warm-out", args.batch_size, 0, device, args.precision)
        bare = bare_loop(args.arch, checkpoint, manifest, args.batch_size, args.workers, device, args.precision)
        audit = audit_run(args.arch, checkpoint, manifest, tmp / "out", args.batch_size, args.workers, device, args.precision)
    print(f"machine: {machine()}")
    print(f"{args.arch}, {args.n} images, batch {args.batch_size}, {args.workers} workers, {device}, {args.precision}")
    print(f"bare open_clip forward: {bare:.2f} s ({args.n / bare:.1f} images/s)")
    print(f"forward-only audit:     {audit:.2f} s ({args.n / audit:.1f} images/s)")
    print(f"ratio audit / bare: {audit / bare:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
