"""The adversarial check's PGD against bare torchattacks doing the same work.

    python benchmarks/bench_pgd.py [--n 128] [--steps 10] [--eps 1/255,2/255,4/255] [--device auto] [--repeats 3]

Both sides attack the same correctly classified phantoms of the embedded demo model with
torchattacks.PGD (L-inf, random start, step 2.5 eps / steps) at each budget, in batches of the
same size, and score the attacked images. The audit side is ``AdversarialCheck.run`` with only
``pgd_linf`` selected and its large-budget sanity attack off (a different attack, not
overhead); on top of the attacks it pays for the zero-gradient probe, the report tables, the
robust-accuracy plot and the gallery. The overhead target is at most 5% (ratio <= 1.05).
Each side runs ``--repeats`` times and the fastest run counts, which filters out noise from
other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchattacks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def bare_pgd(ctx, rows, eps_list, steps, batch_size) -> tuple[float, dict[float, float]]:
    from mcaudit.plugins.checks.adversarial import attack_seed

    start = time.perf_counter()
    model = ctx.classifier()
    x = ctx.load_pixels(rows)
    y = torch.as_tensor(ctx.forward.labels[rows], device=x.device)
    with torch.no_grad():
        correct = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]) == y
    xc, yc = x[correct], y[correct]
    robust = {}
    for eps in eps_list:
        torch.manual_seed(attack_seed(ctx, "pgd_linf", "linf", eps))
        attack = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
        adv = torch.cat([attack(xc[i : i + batch_size], yc[i : i + batch_size]) for i in range(0, len(xc), batch_size)])
        with torch.no_grad():
            still = torch.cat([model(adv[i : i + batch_size]).argmax(1) for i in range(0, len(adv), batch_size)]) == yc
        robust[eps] = still.sum().item() / len(rows)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, robust


def audit_pgd(ctx, n, eps_list, steps) -> tuple[float, dict[float, float]]:
    from mcaudit.plugins.checks.adversarial import AdversarialCheck, budget_label

    params = AdversarialCheck.resolve_params({
        "attacks": ["pgd_linf"], "eps": eps_list, "eps_l2": [], "steps": steps, "n_images": n,
        "grey": False, "sanity_eps": 0.0,
    })
    start = time.perf_counter()
    result = AdversarialCheck().run(ctx, params)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, {e: result.metrics[f"robust_accuracy.pgd_linf.{budget_label('linf', e)}"] for e in eps_list}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images attacked")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", default="1/255,2/255,4/255")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for both sides (0: torch's default; mcaudit runs models under 10M parameters on 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mcaudit.devices import resolve_device
    from mcaudit.plugins.checks.adversarial import parse_budgets
    from mcaudit.testing import load_adapter, make_context, phantom_dataset

    device = str(resolve_device(args.device))
    eps_list = parse_budgets([args.eps], "--eps")
    model = load_adapter("demo", device=device)
    ctx = make_context(model, phantom_dataset(max(args.n, 64), seed=11), batch_size=args.batch_size)
    rows = ctx.stratified_rows(args.n, "adversarial")
    # warm both paths once (allocator, thread pools, lazy imports, matplotlib)
    bare_pgd(ctx, rows[:8], eps_list[:1], 1, args.batch_size)
    audit_pgd(ctx, 8, eps_list[:1], 1)
    bare_runs, audit_runs = [], []
    for _ in range(args.repeats):
        bare_runs.append(bare_pgd(ctx, rows, eps_list, args.steps, args.batch_size))
        audit_runs.append(audit_pgd(ctx, args.n, eps_list, args.steps))
    bare, bare_acc = min(bare_runs, key=lambda r: r[0])
    audit, audit_acc = min(audit_runs, key=lambda r: r[0])
    print(f"machine: {machine()}")
    print(f"demo model, {len(rows)} images, PGD L-inf {args.steps} steps at {args.eps}, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print("robust accuracy bare / audit: " + ", ".join(f"{bare_acc[e]:.3f} / {audit_acc[e]:.3f}" for e in eps_list))
    if any(abs(bare_acc[e] - audit_acc[e]) > 1e-9 for e in eps_list):
        raise SystemExit("the two sides disagree: they did not do the same work")
    print(f"bare torchattacks: {bare:.2f} s")
    print(f"adversarial audit: {audit:.2f} s")
    print(f"ratio audit / bare: {audit / bare:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
