"""The adversarial check: cross-checked against torchattacks run bare, and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchattacks

from mcaudit import InputError, ModelAdapter
from mcaudit.plugins.checks import adversarial as adv
from mcaudit.plugins.checks.adversarial import AdversarialCheck
from mcaudit.prompts import PromptSet
from mcaudit.testing import demo_prompts, load_adapter, make_context, phantom_dataset

from conftest import PNEUMONIA_PROMPTS, shared, train_pneumonia_clip
from mcaudit.testing import derive_status


@pytest.fixture(scope="module")
def demo():
    return load_adapter("demo")


@pytest.fixture(scope="module")
def demo_ctx(demo):
    return make_context(demo, phantom_dataset(96, seed=3))


def run_check(ctx, **given):
    # the quick profile, as the demo runs it: these tests check correctness, not a full audit
    return AdversarialCheck().run(ctx, AdversarialCheck.resolve_params(AdversarialCheck.profile_params("quick") | given))


def bare_classifier(ctx):
    # built here, not through the plugin, so the reference shares no code with the audit
    return ctx.model.zero_shot_classifier(ctx.class_features.clone()).eval()


def bare_robust_accuracy(ctx, rows, make_attack, seed):
    """torchattacks on the correctly classified images of ``rows``, scored over all of ``rows``."""
    model = bare_classifier(ctx)
    x = ctx.load_pixels(rows)
    y = torch.as_tensor(ctx.forward.labels[rows])
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    torch.manual_seed(seed)
    attacked = make_attack(model)(x[correct], y[correct])
    with torch.no_grad():
        still = (model(attacked).argmax(1) == y[correct]).sum().item()
    return still / len(rows)


def test_robust_accuracy_equals_torchattacks_run_bare(demo_ctx):
    eps, eps2, steps = 2 / 255, 0.25, 4
    result = run_check(demo_ctx, grey=False, eps=[eps], eps_l2=[eps2], steps=steps, square_queries=15,
                       attacks=["fgsm", "pgd_linf", "apgd_ce", "square", "pgd_l2"], n_images=24, sanity_eps=0.0)
    m = result.metrics
    rows = demo_ctx.stratified_rows(24, "adversarial:rows")
    seed = lambda name, norm, e: adv.attack_seed(demo_ctx, name, norm, e)  # noqa: E731
    expected = {
        "pgd_linf": bare_robust_accuracy(demo_ctx, rows, lambda f: torchattacks.PGD(
            f, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True), seed("pgd_linf", "linf", eps)),
        "apgd_ce": bare_robust_accuracy(demo_ctx, rows, lambda f: torchattacks.APGD(
            f, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed("apgd_ce", "linf", eps), loss="ce"), 0),
        "square": bare_robust_accuracy(demo_ctx, rows, lambda f: torchattacks.Square(
            f, norm="Linf", eps=eps, n_queries=15, n_restarts=1, seed=seed("square", "linf", eps), loss="margin"), 0),
    }
    for name, value in expected.items():
        assert m[f"robust_accuracy.{name}.2/255"] == pytest.approx(value, abs=1e-9), name
    l2 = bare_robust_accuracy(demo_ctx, rows, lambda f: torchattacks.PGDL2(
        f, eps=eps2, alpha=2.5 * eps2 / steps, steps=steps, random_start=True), seed("pgd_l2", "l2", eps2))
    assert m["robust_accuracy.pgd_l2.0.25"] == pytest.approx(l2, abs=1e-9)

    # FGSM is deterministic: attack every image, misclassified ones included, as a bare user would
    model = bare_classifier(demo_ctx)
    x, y = demo_ctx.load_pixels(rows), torch.as_tensor(demo_ctx.forward.labels[rows])
    attacked = torchattacks.FGSM(model, eps=eps)(x, y)
    with torch.no_grad():
        fgsm = (model(attacked).argmax(1) == y).sum().item() / len(rows)
        clean = (model(x).argmax(1) == y).sum().item() / len(rows)
    assert m["robust_accuracy.fgsm.2/255"] == pytest.approx(fgsm, abs=1e-9)
    assert m["clean_accuracy"] == pytest.approx(clean, abs=1e-9)

    worst = min(m[f"robust_accuracy.{a}.2/255"] for a in ("fgsm", "pgd_linf", "apgd_ce", "square"))
    assert m["worst_case_robust_accuracy.linf.2/255"] <= worst
    correct = clean * len(rows)
    assert m["attack_success_rate.pgd_linf.2/255"] == pytest.approx(1 - expected["pgd_linf"] * len(rows) / correct)


def test_zero_budget_leaves_accuracy_unchanged(demo_ctx):
    for grey in (False, True):
        result = run_check(demo_ctx, grey=grey, eps=[0.0], eps_l2=[0.0], steps=2, square_queries=5, n_images=16,
                           sanity_eps=0.0)
        m = result.metrics
        rows = demo_ctx.stratified_rows(16, "adversarial:rows")
        forward_acc = float((demo_ctx.forward.preds[rows] == demo_ctx.forward.labels[rows]).mean())
        assert m["clean_accuracy"] == pytest.approx(forward_acc)
        robust = {k: v for k, v in m.items() if k.startswith(("robust_accuracy.", "worst_case_robust_accuracy."))}
        assert len(robust) == 7  # fgsm, pgd_linf, apgd_ce, square, pgd_l2 and two worst cases
        assert all(v == pytest.approx(m["clean_accuracy"]) for v in robust.values()), robust


def test_robust_accuracy_falls_with_eps_on_the_demo_model(demo_ctx):
    result = run_check(demo_ctx, eps=["1/255", "3/255", "8/255"], eps_l2=[0.1, 0.5, 1.0], n_images=16)
    m = result.metrics
    for name, norm, labels in [(a, "linf", ["1/255", "3/255", "8/255"]) for a in ("fgsm", "pgd_linf", "apgd_ce", "square")] + [
        ("pgd_l2", "l2", ["0.1", "0.5", "1"])
    ]:
        accs = [m[f"robust_accuracy.{name}.{lab}"] for lab in labels]
        assert all(b <= a for a, b in zip(accs, accs[1:])), (name, accs)
    assert m["clean_accuracy"] > 0.8
    assert m["worst_case_robust_accuracy.linf.8/255"] < m["clean_accuracy"] - 0.5
    # a normal, differentiable model raises no gradient-masking flag
    assert m["gradient_masking_suspected"] == 0.0
    assert m["zero_gradient_share"] == 0.0 and m["sanity_robust_accuracy"] == 0.0
    assert "no warning sign of gradient masking was raised" in result.summary and not result.findings
    status, _, outcomes, _ = derive_status(AdversarialCheck, result)
    assert status in ("pass", "fail", "inconclusive")  # thresholds alone: no finding to warn about
    assert "robust_accuracy_at_smallest_eps" in result.counts
    assert result.details["grey_perturbation"] is True
    assert any("APGD-DLR skipped" in w for w in result.warnings)
    assert not any(k.startswith("robust_accuracy.apgd_dlr") for k in m)
    titles = [f.title for f in result.figures]
    assert "Robust accuracy against the L-inf budget" in titles and "Robust accuracy against the L2 budget" in titles
    [gallery] = result.galleries  # successful attacks at 8/255, each flipped away from its (correct) label
    assert gallery.items and all(i.prediction != i.label and len(i.pictures) == 3 for i in gallery.items)
    column = result.per_image["robust.linf.3/255"]
    rows = demo_ctx.stratified_rows(16, "adversarial:rows")
    assert len(column) == len(demo_ctx.forward)
    assert sum(v is not None for v in column) == len(rows)
    assert np.mean([column[r] for r in rows]) == pytest.approx(m["worst_case_robust_accuracy.linf.3/255"])


class QuantisedInput(ModelAdapter):
    """The demo model behind a rounding step: gradients vanish, the model still works."""

    def __init__(self, inner):
        super().__init__(spec="quantised-demo", image_size=inner.image_size, mean=inner.pixel_mean.flatten().tolist(),
                         std=inner.pixel_std.flatten().tolist())
        self.inner = inner

    def _encode_normalized_image(self, images):
        return self.inner._encode_normalized_image(torch.round(images * 2) / 2)

    def _encode_prompts(self, prompts):
        return self.inner._encode_prompts(prompts)

    @property
    def logit_scale(self):
        return self.inner.logit_scale


def test_gradient_masking_layer_raises_the_flags_and_a_warn_status(demo):
    ctx = make_context(QuantisedInput(demo).eval(), phantom_dataset(48, seed=3), prompts=demo_prompts())
    result = run_check(ctx, n_images=24, attacks=["fgsm", "pgd_linf"], eps=["4/255"], eps_l2=[], steps=3)
    m = result.metrics
    assert m["clean_accuracy"] > 0.5
    assert m["zero_gradient_share"] == 1.0 and m["flag.zero_gradients"] == 1.0
    assert m["flag.survives_large_eps"] == 1.0 and m["sanity_robust_accuracy"] > 0
    assert m["gradient_masking_suspected"] == 1.0
    assert "gradient masking suspected" in result.summary
    assert sum("Gradient masking suspected" in w for w in result.warnings) >= 2
    (finding,) = result.findings
    assert finding.status == "warn" and finding.metric == "gradient_masking_suspected"
    # the attacks cannot move a quantised input, so every robustness threshold is met: what
    # keeps the status from reading pass is the masking finding alone
    status, _, outcomes, _ = derive_status(AdversarialCheck, result)
    assert {o["status"] for o in outcomes.values()} == {"pass"}, outcomes
    assert status == "warn"


def test_flag_rules_on_planted_outcomes():
    n = 10
    ok = lambda k: np.arange(n) >= k  # noqa: E731  (the first k images fooled)
    robust = {("pgd_linf", "linf", 1 / 255): ok(2), ("pgd_linf", "linf", 2 / 255): ok(5),
              ("square", "linf", 1 / 255): ok(3), ("square", "linf", 2 / 255): ok(4)}
    flags, warnings = AdversarialCheck._flags(robust, {}, ["pgd_linf", "square"], [1 / 255, 2 / 255], [], 0.0,
                                              float("nan"), 0.0, n)
    assert flags == {"black_box_beats_white_box": True, "accuracy_rises_with_eps": False,
                     "zero_gradients": False, "survives_large_eps": False}
    assert "fooled 1 image(s)" in warnings[0]
    robust[("square", "linf", 1 / 255)] = ok(2)
    robust[("square", "linf", 2 / 255)] = ok(1)  # fewer fooled at the larger budget
    robust[("pgd_linf", "linf", 2 / 255)] = ok(2)
    flags, _ = AdversarialCheck._flags(robust, {}, ["pgd_linf", "square"], [1 / 255, 2 / 255], [], 16 / 255,
                                       0.0, 0.0, n)
    assert flags == {"black_box_beats_white_box": False, "accuracy_rises_with_eps": True,
                     "zero_gradients": False, "survives_large_eps": False}


def test_grey_attack_stays_grey_and_within_budget(demo_ctx):
    model = adv.GreyInput(demo_ctx.classifier())
    rows = demo_ctx.stratified_rows(8, "grey")
    x = demo_ctx.load_pixels(rows).mean(1, keepdim=True)
    y = torch.as_tensor(demo_ctx.forward.labels[rows])
    settings = adv.AttackSettings(3, 1, 5)
    linf = adv.run_attack("pgd_linf", model, x, y, 4 / 255, settings, 0, 64)
    assert linf.shape[1] == 1 and (linf - x).abs().max() <= 4 / 255 + 1e-6
    eps = 0.5
    l2 = adv.run_attack("pgd_l2", model, x, y, eps / math.sqrt(3), settings, 0, 64)
    seen = l2.expand(-1, 3, -1, -1) - x.expand(-1, 3, -1, -1)  # what the model sees
    assert seen.flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert torch.equal(model(l2), model.classifier(l2.expand(-1, 3, -1, -1)))


class RunsOutOfMemory(torch.nn.Module):
    """The classifier, raising CUDA's out-of-memory error for batches over ``limit`` images."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_attacks_and_predictions_halve_batches_that_run_out_of_memory(demo_ctx):
    classifier = demo_ctx.classifier()
    rows = demo_ctx.stratified_rows(12, "oom")
    x = demo_ctx.load_pixels(rows)
    y = torch.as_tensor(demo_ctx.forward.labels[rows])
    settings = adv.AttackSettings(3, 1, 5)
    fits = adv.run_attack("fgsm", classifier, x, y, 4 / 255, settings, 0, 12)
    tight = RunsOutOfMemory(classifier, 3)
    halved = adv.run_attack("fgsm", tight, x, y, 4 / 255, settings, 0, 12)
    assert torch.allclose(halved, fits, atol=1e-6)  # FGSM is deterministic: the same images
    assert tight.sizes[0] == 12 and max(s for s in tight.sizes if s <= 3) == 3
    assert torch.equal(adv.predict(tight, halved, 12), adv.predict(classifier, fits, 12))
    never = RunsOutOfMemory(classifier, 0)
    with pytest.raises(torch.OutOfMemoryError):  # not even one image fits: the error stands
        adv.predict(never, x, 12)


def test_apgd_dlr_runs_on_three_classes_and_matches_torchattacks(demo):
    dataset = phantom_dataset(48, seed=5)
    dataset.classes = ["normal", "opacity", "pleural effusion"]  # a third class with no images
    base = demo_prompts()
    prompts = PromptSet(base.templates, dict(base.phrasings) | {"pleural effusion": ["fluid in the pleural space"]})
    ctx = make_context(demo, dataset, prompts=prompts)
    eps, steps = 2 / 255, 3
    result = run_check(ctx, attacks=["apgd_dlr"], eps=[eps], eps_l2=[], steps=steps, n_images=16, grey=False,
                       sanity_eps=0.0)
    rows = ctx.stratified_rows(16, "adversarial:rows")
    expected = bare_robust_accuracy(ctx, rows, lambda f: torchattacks.APGD(
        f, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=adv.attack_seed(ctx, "apgd_dlr", "linf", eps),
        loss="dlr"), 0)
    assert result.metrics["robust_accuracy.apgd_dlr.2/255"] == pytest.approx(expected, abs=1e-9)
    assert not result.warnings


def test_same_seed_same_metrics_and_bad_parameters(demo_ctx):
    given = dict(n_images=8, eps=["2/255"], eps_l2=[0.25], steps=2, square_queries=5, gallery=0)
    a, b = run_check(demo_ctx, **given), run_check(demo_ctx, **given)
    assert a.metrics == b.metrics
    assert adv.parse_budgets(["1/255, 2/255", 0.5, "[4/255]"], "x") == [1 / 255, 2 / 255, 4 / 255, 0.5]
    for bad in (dict(attacks=["cw"]), dict(eps=["two/255"]), dict(eps=[-0.1]), dict(steps=0), dict(n_images=-1),
                dict(eps=[True]), dict(attacks=[]), dict(sanity_eps=-1.0)):
        with pytest.raises(InputError, match="adversarial"):
            AdversarialCheck.resolve_params(given | bad)  # before the model loads


# -- PneumoniaMNIST with a small model trained here ---------------------------------------
@pytest.fixture(scope="module")
def pneumonia_model_folder(tmp_path_factory):
    from mcaudit.testing import save_openclip_folder

    npz = shared("pneumoniamnist/pneumoniamnist.npz")
    model = train_pneumonia_clip(npz)
    folder = save_openclip_folder(model, tmp_path_factory.mktemp("pneumonia-clip"), mean=(0.5,) * 3, std=(0.25,) * 3)
    prompts = folder / "prompts.toml"
    prompts.write_text(PNEUMONIA_PROMPTS)
    return npz, folder, prompts


def test_pneumoniamnist_attacks_lower_accuracy_and_report_shows_curves(pneumonia_model_folder, mcaudit_run):
    npz, folder, prompts = pneumonia_model_folder
    out = mcaudit_run("--model", folder, "--data", npz, "--split", "test", "--prompts", prompts,
                      "-p", "mcaudit.plugins.checks.adversarial", "--checks", "performance,adversarial", "--profile", "quick",
                      "--set", "adversarial.n_images=48", "--set", "adversarial.eps=[\"1/255\", \"4/255\", \"16/255\"]",
                      "--set", "adversarial.eps_l2=[0.25, 1.0]")
    assert out.exit_code == 0, out.output
    check = out.results["checks"]["adversarial"]
    assert check["execution"] == "completed", check.get("summary")
    # a small model trained for seconds: 48 images decide nothing either way at 1/255
    assert check["status"] in ("pass", "fail", "inconclusive"), check["status_reason"]
    assert {"adversarial.robust_accuracy_at_smallest_eps", "adversarial.retained_accuracy_at_smallest_eps"} <= set(check["thresholds"])
    m = check["metrics"]
    assert m["clean_accuracy"] >= 0.7
    for name in ("fgsm", "pgd_linf", "apgd_ce", "square"):
        accs = [m[f"robust_accuracy.{name}.{e}"] for e in ("1/255", "4/255", "16/255")]
        assert accs[0] >= accs[1] >= accs[2], (name, accs)
    assert m["robust_accuracy.pgd_linf.16/255"] < m["clean_accuracy"] - 0.4
    assert m["robust_accuracy.pgd_l2.1"] < m["clean_accuracy"]
    assert m["gradient_masking_suspected"] == 0.0
    html = out.html
    assert "Robust accuracy against the L-inf budget" in html and "Robust accuracy against the L2 budget" in html
    assert html.count("data:image/png;base64,") >= 3
    samples = (out.out_dir / "samples.csv").read_text().splitlines()
    assert "adversarial.robust.linf.16/255" in samples[0]


@pytest.mark.slow
def test_torchrun_two_processes_share_the_attacked_rows(tmp_path):
    from mcaudit.testing import run_cli, run_torchrun

    args = ["--quiet", "--model", "demo", "--data", "phantom:n=50", "--profile", "quick", "-p", "mcaudit.plugins.checks.adversarial",
            "-p", "mcaudit.plugins.checks.certified", "--checks", "adversarial,certified", "--set", "adversarial.n_images=12",
            "--set", "certified.n_images=12", "--set", "certified.n=16"]
    single = run_cli(["run", *args], tmp_path / "single")
    assert single.exit_code == 0, single.output
    multi = run_torchrun(args, tmp_path / "multi")["checks"]
    for name in ("adversarial", "certified"):
        assert multi[name]["execution"] == "completed"
        assert multi[name]["status"] == single.results["checks"][name]["status"]
        for key in ("clean_accuracy", "n_images"):  # the same rows, whichever rank handled them
            assert multi[name]["metrics"][key] == single.results["checks"][name]["metrics"][key]


# -- honest numbers: counts, exact intervals, coverage, and a useless model -----------------


def test_counts_and_clopper_pearson_intervals_match_scipy(demo_ctx):
    from scipy.stats import binomtest

    result = run_check(demo_ctx, n_images=24, attacks=["fgsm", "pgd_linf"], eps=["1/255", "4/255"], eps_l2=[],
                       steps=3, sanity_eps=0.0)
    m, counts = result.metrics, result.counts
    rows = demo_ctx.stratified_rows(24, "adversarial:rows")
    assert counts["clean_accuracy"] == (int((demo_ctx.forward.preds[rows] == demo_ctx.forward.labels[rows]).sum()), 24)
    proportions = [k for k in counts if k.startswith(("robust_accuracy", "worst_case", "attack_success", "retained"))]
    assert len(proportions) == 2 * 2 * 2 + 2 + 2  # (robust, success) x two attacks x two budgets, two worst cases, the gated pair
    for key in proportions + ["clean_accuracy"]:
        k, n = counts[key]
        assert m[key] == pytest.approx(k / n, abs=1e-12), key
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert result.intervals[key] == pytest.approx((ci.low, ci.high), abs=1e-9), key
    # the gated pair is the worst case at the smallest budget, over all images and over the correct ones
    kept = counts["worst_case_robust_accuracy.linf.1/255"][0]
    assert counts["robust_accuracy_at_smallest_eps"] == (kept, 24)
    assert counts["retained_accuracy_at_smallest_eps"] == (kept, counts["clean_accuracy"][0])
    assert result.details["smallest_eps"] == "L-inf 1/255"
    assert f"{kept} of 24" in result.summary
    assert m["chance_level"] == pytest.approx(np.bincount(demo_ctx.forward.labels[rows]).max() / 24)


def test_clopper_pearson_intervals_cover_the_true_robust_accuracy():
    """2,000 simulated attacked subsamples per setting: at least 93% of the 95% intervals the
    check reports (Clopper-Pearson, mcaudit.metrics) contain the true robust accuracy."""
    from mcaudit.metrics import clopper_pearson_interval

    rng = np.random.default_rng(0)
    coverage = {}
    for n in (50, 500):
        for p in (0.02, 0.1, 0.3, 0.5, 0.8):
            k = rng.binomial(n, p, size=2000)
            # the interval depends only on k: compute it once per distinct k, then look it up
            distinct = np.unique(k)
            bounds = np.array([clopper_pearson_interval(int(v), n) for v in distinct])
            lo, hi = bounds[np.searchsorted(distinct, k)].T
            coverage[(n, p)] = float(np.mean((lo <= p) & (p <= hi)))
    print("coverage of 95% Clopper-Pearson intervals:", coverage)
    assert min(coverage.values()) >= 0.93, coverage


def test_a_model_at_chance_does_not_pass(demo):
    # the demo model with its labels shuffled: whatever it predicts is right by chance only
    ctx = make_context(demo, phantom_dataset(96, seed=3))
    shuffled = np.random.default_rng(1).permutation(ctx.forward.labels)
    import dataclasses

    ctx = dataclasses.replace(ctx, forward=dataclasses.replace(ctx.forward, labels=shuffled))
    result = run_check(ctx, n_images=48, attacks=["fgsm", "pgd_linf"], eps=["1/255"], eps_l2=[], steps=3,
                       sanity_eps=0.0)
    status, _, outcomes, _ = derive_status(AdversarialCheck, result)
    assert outcomes["adversarial.robust_accuracy_at_smallest_eps"]["status"] in ("fail", "inconclusive")
    assert status in ("fail", "inconclusive"), status


def test_no_nonzero_budget_leaves_the_gated_numbers_not_evaluated(demo_ctx):
    result = run_check(demo_ctx, n_images=8, attacks=["fgsm"], eps=[0.0], eps_l2=[], sanity_eps=0.0, gallery=0)
    assert result.not_evaluated["robust_accuracy_at_smallest_eps"] == "no nonzero attack budget was given"
    status, _, outcomes, _ = derive_status(AdversarialCheck, result)
    assert status == "not_evaluated"
    assert "no nonzero attack budget was given" in outcomes["adversarial.retained_accuracy_at_smallest_eps"]["sentence"]


def test_profiles_size_the_attacks():
    quick, standard, thorough = (AdversarialCheck.resolve_params(AdversarialCheck.profile_params(p))
                                 for p in ("quick", "standard", "thorough"))
    assert standard == AdversarialCheck.resolve_params({})  # the plain defaults are the standard profile
    assert quick["n_images"] < standard["n_images"] < thorough["n_images"]
    # 400 images: the exact interval of a proportion near 0.5 is about +-0.05
    from mcaudit.metrics import clopper_pearson_interval

    lo, hi = clopper_pearson_interval(standard["n_images"] // 2, standard["n_images"])
    assert (hi - lo) / 2 <= 0.051
    assert set(AdversarialCheck.threshold_reasons) == set(AdversarialCheck.default_thresholds)
