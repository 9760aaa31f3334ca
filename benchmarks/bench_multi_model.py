"""Two models in one audit against two single-model audits, and a cached re-run against the first.

    python benchmarks/bench_multi_model.py [--arch ViT-B-32] [--n 2048] [--batch-size 64] [--repeats 2] [--device auto]

Two randomly initialised models of ``--arch`` are audited on the same ``--n`` phantom PNGs
with the forward-pass checks (performance, calibration). "Singles" is two ``mcaudit run``
with one model each, without the forward cache; "pair" is one ``mcaudit run --model A
--model B`` (also without the cache), which decodes each image once for both models, audits
them in turn and adds the paired comparison and its page. Target: pair / singles <= 1.10.
Then the pair again with the cache filled by a first pair run: cached / first <= 0.10.

Each side runs in-process through the CLI, timed from argument parsing to the written
report, after one warm-up run of every path on 16 images. A shared two-core machine drifts
by 10 to 20% over minutes (one ViT-B-32 audit of 2,048 images took 148 s, then 116 s a few
minutes later), so singles and pair alternate (singles first in even repeats, pair first in
odd ones) and the ratio is of each side's best time, the usual estimate when noise only adds.
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

CHECKS = "performance,calibration"


def mcaudit(args: list[str]) -> float:
    from click.testing import CliRunner

    from mcaudit.cli import cli

    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["run", "--quiet", "--checks", CHECKS, *[str(a) for a in args]], catch_exceptions=False)
    elapsed = time.perf_counter() - start
    if result.exit_code not in (0, 1):
        raise SystemExit(result.output)
    return elapsed


def common(manifest: Path, batch_size: int, device: str) -> list[str]:
    return ["--data", str(manifest), "--batch-size", str(batch_size), "--device", device]


def pair_args(arch: str, checkpoints: list[Path]) -> list[str]:
    return [a for i, c in enumerate(checkpoints) for a in ("--model", arch, "--checkpoint", str(c), "--label", f"m{i}")]


def measure(arch: str, checkpoints: list[Path], manifest: Path, tmp: Path, batch_size: int, device: str, tag: str,
            repeats: int = 1) -> dict:
    shared = common(manifest, batch_size, device)

    def singles(r: int) -> float:
        return sum(mcaudit(["--model", arch, "--checkpoint", c, "--no-cache", *shared, "--out", tmp / f"{tag}-single{i}-{r}"])
                   for i, c in enumerate(checkpoints))

    def pair(r: int) -> float:
        return mcaudit([*pair_args(arch, checkpoints), "--no-cache", *shared, "--out", tmp / f"{tag}-pair-{r}"])

    single_times, pair_times = [], []
    for r in range(repeats):
        if r % 2 == 0:
            single_times.append(singles(r))
            pair_times.append(pair(r))
        else:
            pair_times.append(pair(r))
            single_times.append(singles(r))
    cache = tmp / f"{tag}-cache"
    first = mcaudit([*pair_args(arch, checkpoints), "--cache-dir", cache, *shared, "--out", tmp / f"{tag}-first"])
    cached = mcaudit([*pair_args(arch, checkpoints), "--cache-dir", cache, *shared, "--out", tmp / f"{tag}-cached"])
    return {"singles": single_times, "pair": pair_times, "first": first, "cached": cached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternating measurements of each side")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import open_clip

    from mcaudit.devices import resolve_device

    device = str(resolve_device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_phantom_manifest(tmp / "data", args.n)
        checkpoints = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            checkpoints.append(tmp / f"model{seed}.pt")
            torch.save(open_clip.create_model(args.arch).state_dict(), checkpoints[-1])
        measure(args.arch, checkpoints, write_phantom_manifest(tmp / "warm", 16), tmp, args.batch_size, device, "warm")
        t = measure(args.arch, checkpoints, manifest, tmp, args.batch_size, device, "main", args.repeats)
    print(f"machine: {machine()}")
    print(f"{args.arch} x 2 models, {args.n} images, batch {args.batch_size}, {device}, checks {CHECKS}")
    times = ", ".join(f"{s:.2f}" for s in t["singles"])
    print(f"two single-model audits: best {min(t['singles']):.2f} s (each repeat: {times})")
    times = ", ".join(f"{s:.2f}" for s in t["pair"])
    print(f"one two-model audit:     best {min(t['pair']):.2f} s (each repeat: {times}; with the paired comparison and its page)")
    print(f"ratio pair / singles: {min(t['pair']) / min(t['singles']):.3f} (target <= 1.10)")
    print(f"two-model audit, cache filled: {t['first']:.2f} s; re-run from the cache: {t['cached']:.2f} s")
    print(f"ratio cached / first: {t['cached'] / t['first']:.3f} (target <= 0.10)")


if __name__ == "__main__":
    main()
