"""Time and peak memory of an audit at 1k, 4k and 16k images: linear time, flat memory.

    python benchmarks/bench_scaling.py [--sizes 1000 4000 16000] [--checks performance,calibration,fairness]

Each size runs ``mcaudit run`` on the demo model and generated phantoms in its own process,
so the peak resident memory (ru_maxrss) of one size is not carried into the next.

Linear time is judged on the marginal cost: the seconds each extra image adds between one
size and the next. Dividing total time by images would look better than linear only
because the fixed costs (start-up, model, report) are shared out over more images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from click.testing import CliRunner
from mcaudit.cli import cli
n, checks, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
start = time.perf_counter()
r = CliRunner().invoke(cli, ["run", "--quiet", "--model", "demo", "--data", f"phantom:n={n}", "--group", "site",
                             "--checks", checks, "--batch-size", "256", "--out", out], catch_exceptions=False)
elapsed = time.perf_counter() - start
print(json.dumps({"n": n, "seconds": elapsed, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "exit": r.exit_code}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--checks", default="performance,calibration,fairness")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(n), args.checks, str(Path(tmp) / f"o{n}")],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"machine: {machine()}")
    print(f"checks: {args.checks}")
    print(f"{'images':>8} {'seconds':>9} {'ms/image':>9} {'peak MB':>9}")
    for r in rows:
        print(f"{r['n']:>8} {r['seconds']:>9.2f} {1000 * r['seconds'] / r['n']:>9.3f} {r['peak_mb']:>9.0f}")
    first, last = rows[0], rows[-1]
    slopes = [(b["seconds"] - a["seconds"]) / (b["n"] - a["n"]) for a, b in zip(rows, rows[1:])]
    for (a, b), slope in zip(zip(rows, rows[1:]), slopes):
        print(f"marginal time {a['n']} -> {b['n']} images: {1000 * slope:.3f} ms/image")
    if len(slopes) > 1:
        print(f"marginal time per image, last step vs first: {slopes[-1] / slopes[0]:.2f}x (1.0 = linear)")
    print(f"peak memory, largest vs smallest: {last['peak_mb'] / first['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
