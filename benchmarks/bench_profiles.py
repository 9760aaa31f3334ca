"""Whole audits per --profile: every check on a ViT-B-32 over the OASIS-1 slices.

    python benchmarks/bench_profiles.py [--profile quick] [--data PATH] [--model ViT-B-32]

The weights are random (no download): time depends on the architecture, not on what the
model learned. Prints each check's time, the images behind its main numbers (from
results.json), and the total wall time, which the quick profile must keep under 240 s on two
CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("MCAUDIT_SHARED_DATA", HERE.parent.parent / "shared" / "data")) / "oasis1" / "manifest.csv"


def random_checkpoint(arch: str, folder: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path = folder / f"{arch}-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick", choices=["quick", "standard", "thorough"])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--group", default="sex")
    ap.add_argument("--checks", default="", help="only these checks (comma-separated; default all)")
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"no data at {args.data} (set MCAUDIT_SHARED_DATA)")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = random_checkpoint(args.model, Path(tmp))
        out = Path(tmp) / "report"
        cmd = [sys.executable, "-m", "mcaudit", "run", "--quiet", "--model", args.model, "--checkpoint", str(ckpt),
               "--data", args.data, "--group", args.group, "--profile", args.profile, "--out", str(out)]
        if args.checks:
            cmd += ["--checks", args.checks]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if not (out / "results.json").exists():
            sys.exit(f"the audit wrote no results (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results = json.loads((out / "results.json").read_text())
    print(f"{args.model} (random weights) on {results['dataset']['images']} images, profile {args.profile}, "
          f"exit {proc.returncode}")
    for name, check in results["checks"].items():
        n = check.get("sample_size")
        print(f"  {name:<18} {check['duration_s']:8.1f} s  {check['status']:<14} n = {n if n is not None else '-'}")
    print(f"total wall time: {wall:.1f} s (target for quick: <= 240 s on two CPU cores)")


if __name__ == "__main__":
    main()
