"""The certified check: randomized smoothing against analytic radii and outside references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, norm

from mcaudit import InputError, ModelAdapter
from mcaudit.plugins.checks.certified import CertifiedCheck, certified_accuracy, clopper_pearson_lower
from mcaudit.prompts import PromptSet
from mcaudit.testing import load_adapter, make_context, phantom_dataset, run_cli
from mcaudit.testing import derive_status


def run_check(ctx, **given):
    # the quick profile with the three sigmas and 16 images these tests were sized for
    sized = CertifiedCheck.profile_params("quick") | {"sigmas": [0.12, 0.25, 0.5], "n_images": 16}
    return CertifiedCheck().run(ctx, CertifiedCheck.resolve_params(sized | given))


def test_clopper_pearson_matches_the_binomial_tail():
    n, alpha = 50, 0.01
    for k in (1, 10, 25, 49, 50):
        # the lower bound p solves P(X >= k | p) = alpha
        reference = brentq(lambda p: binom.sf(k - 1, n, p) - alpha, 1e-12, 1 - 1e-12)
        assert clopper_pearson_lower(np.array([k]), n, alpha)[0] == pytest.approx(reference, rel=1e-6)
    assert clopper_pearson_lower(np.array([0]), n, alpha)[0] == 0.0
    assert clopper_pearson_lower(np.array([n]), n, alpha)[0] == pytest.approx(alpha ** (1 / n))


class HalfSpaceAdapter(ModelAdapter):
    """A linear classifier in pixel space: "opacity" when w . x > b, with unit-norm w.

    Its smoothed classifier under N(0, sigma^2 I) noise is the same half-space, with
    pA = Phi(|d| / sigma) for an image at distance d from the boundary, so the exact certified
    radius is |d| (Cohen et al., 2019, example 1).
    """

    def __init__(self, w: torch.Tensor, b: float, size=(8, 8)):
        super().__init__(spec="half-space", image_size=size, mean=[0.0] * 3, std=[1.0] * 3)
        self.register_buffer("w", w / w.norm())
        self.b = b

    def distance(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1) @ self.w - self.b

    def _encode_normalized_image(self, images):
        s = self.distance(images)
        return torch.stack([torch.ones_like(s), s], dim=1)

    def _encode_prompts(self, prompts):
        return torch.tensor([[0.0, -1.0] if "normal" in p else [0.0, 1.0] for p in prompts])

    @property
    def logit_scale(self) -> float:
        return 10.0


def half_space_context(n: int = 24):
    dataset = phantom_dataset(n, seed=7, groups=(), image_size=(8, 8))
    pixels = torch.stack([dataset[i]["pixels"] for i in range(n)])
    labels = np.array([r.label for r in dataset.records])
    # the direction separating the class means, through their midpoint: a usable classifier
    w = pixels[labels == 1].mean(0).flatten() - pixels[labels == 0].mean(0).flatten()
    w = w / w.norm()
    b = float((pixels[labels == 1].mean(0).flatten() @ w + pixels[labels == 0].mean(0).flatten() @ w) / 2)
    model = HalfSpaceAdapter(w, b).eval()
    prompts = PromptSet(("{}",), {"normal": ["normal"], "opacity": ["opacity"]})
    return make_context(model, dataset, prompts=prompts), model, pixels


def test_half_space_certifies_close_to_the_analytic_radius():
    ctx, model, pixels = half_space_context()
    sigma = 0.25
    result = run_check(ctx, sigmas=[sigma], n0=2000, n=20_000, alpha=0.001, n_images=0, noise_batch=8192)
    per = result.details["per_sigma"]["0.25"]
    distance = model.distance(pixels[ctx.forward.indices]).numpy()
    radius, prediction = np.asarray(per["radius"], dtype=float), np.asarray(per["prediction"])
    # n0 = 2000 makes picking the wrong top class vanishingly rare at these distances
    usable = (np.abs(distance) > 0.1 * sigma) & (np.abs(distance) < 2.5 * sigma)
    assert usable.sum() >= 5, distance
    for d, r, p in zip(distance[usable], radius[usable], prediction[usable]):
        assert p == int(d > 0)  # the smoothed class is the half-space's class
        assert r <= abs(d) + 1e-6  # a certificate never exceeds the true radius (w.p. 1 - alpha)
        # with n = 20000 the Clopper-Pearson bound costs only a little radius; the estimate of pA
        # varies by sqrt(pA (1 - pA) / n), which moves the radius by that over the normal density
        pa = norm.cdf(abs(d) / sigma)
        expected = sigma * norm.ppf(clopper_pearson_lower(np.array([round(20_000 * pa)]), 20_000, 0.001)[0])
        spread = sigma * np.sqrt(pa * (1 - pa) / 20_000) / norm.pdf(norm.ppf(pa))
        assert r == pytest.approx(expected, abs=4 * spread)
        assert r >= 0.8 * abs(d)
    # wherever a certificate is issued, it names the half-space's class and stays inside its radius
    issued = ~np.isnan(radius)
    assert np.all(prediction[issued] == (distance[issued] > 0))
    assert np.all(radius[issued] <= np.abs(distance[issued]) + 1e-6)
    assert np.all(prediction[~issued] == -1)


def test_certified_accuracy_at_zero_is_at_most_the_smoothed_accuracy():
    ctx = make_context(load_adapter("demo"), phantom_dataset(60, seed=2))
    result = run_check(ctx, sigmas=[0.12, 0.25], n0=8, n=48, radii=[0.0, 0.05, 0.1, 0.2], n_images=16)
    m = result.metrics
    for s in ("0.12", "0.25"):
        r0 = m[f"certified_accuracy.sigma={s}.r=0"]
        assert r0 <= m[f"smoothed_accuracy.sigma={s}"]
        curve = [m[f"certified_accuracy.sigma={s}.r={r}"] for r in ("0", "0.05", "0.1", "0.2")]
        assert all(b <= a for a, b in zip(curve, curve[1:]))
        assert 0.0 <= m[f"abstention_rate.sigma={s}"] <= 1.0
        assert r0 + m[f"abstention_rate.sigma={s}"] <= 1.0 + 1e-9
        per = result.details["per_sigma"][s]
        labels = ctx.forward.labels[result.details["rows"]]
        assert certified_accuracy(np.asarray(per["prediction"]), np.asarray(per["radius"], dtype=float), labels, 0.0) == r0
    assert m["certified_accuracy.best.r=0.05"] == max(m["certified_accuracy.sigma=0.12.r=0.05"],
                                                      m["certified_accuracy.sigma=0.25.r=0.05"])
    # the largest radius n = 48 samples can certify bounds every certificate
    cap = result.details["max_certifiable_radius"]["0.12"]
    radii = np.asarray(result.details["per_sigma"]["0.12"]["radius"], dtype=float)
    assert np.nanmax(radii) <= cap + 1e-9
    assert m["clean_accuracy"] > 0.8 and not result.warnings
    column = result.per_image["certified_correct.sigma=0.25"]
    assert sum(v is not None for v in column) == 16

    # noise far beyond the image contrast destroys the predictions, and the report says so
    drowned = run_check(ctx, sigmas=[3.0], n0=4, n=16, n_images=16)
    assert drowned.metrics["certified_accuracy.best.r=0"] < 0.5
    assert any("Noise destroys most predictions" in w for w in drowned.warnings)


def test_same_seed_same_result_bad_parameters_and_report(tmp_path):
    ctx, _, _ = half_space_context(12)
    a, b = run_check(ctx, n=64), run_check(ctx, n=64)
    assert a.metrics == b.metrics
    for given in (dict(sigmas=[0.0]), dict(sigmas=["x"]), dict(alpha=0.7), dict(n=0), dict(radii=[-1.0]),
                  dict(n_images=-2), dict(radii=[]), dict(alpha=0.0)):
        with pytest.raises(InputError, match="certified"):
            CertifiedCheck.resolve_params(given)  # before the model loads
    out = run_cli(["run", "--quiet", "-p", "mcaudit.plugins.checks.certified", "--checks", "certified", "--model", "demo",
                   "--data", "phantom:n=40", "--profile", "quick", "--set", "certified.n_images=6",
                   "--set", "certified.n=16"], tmp_path / "out")
    assert out.exit_code == 0, out.output
    check = out.results["checks"]["certified"]
    # n = 16 noise samples cannot certify radius 0.25 at any of the sigmas: not evaluated, never pass
    assert check["execution"] == "completed" and check["status"] == "not_evaluated"
    assert "no certificate can reach radius 0.25" in check["status_reason"]
    assert "Randomized smoothing on 6 images" in check["summary"]
    assert "Certified accuracy against the L2 radius" in out.html
    assert "certified.certified_radius.sigma=0.25" in (out.out_dir / "samples.csv").read_text().splitlines()[0]


def test_counts_intervals_and_the_gated_radius(tmp_path):
    from scipy.stats import binomtest

    ctx = make_context(load_adapter("demo"), phantom_dataset(60, seed=2))
    result = run_check(ctx, sigmas=[0.12, 0.25], n=100, n_images=24, radii=[0.0, 0.1])
    m, counts = result.metrics, result.counts
    assert result.details["radii"] == [0.0, 0.1, 0.25]  # the gated radius is always reported
    for key, (k, n) in counts.items():
        assert n == 24 and m[key] == pytest.approx(k / n, abs=1e-12), key
        if ".best." in key or key == "certified_accuracy_at_radius":
            continue
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert result.intervals[key] == pytest.approx((ci.low, ci.high), abs=1e-9), key
    # the best over two noise levels: each level's exact interval at 97.5%, the largest of each end
    per = [counts[f"certified_accuracy.sigma={s}.r=0.25"] for s in ("0.12", "0.25")]
    bounds = [binomtest(k, n).proportion_ci(confidence_level=0.975, method="exact") for k, n in per]
    expected = (max(b.low for b in bounds), max(b.high for b in bounds))
    assert result.intervals["certified_accuracy_at_radius"] == pytest.approx(expected, abs=1e-9)
    assert m["certified_accuracy_at_radius"] == max(k for k, _ in per) / 24
    assert f"{max(k for k, _ in per)} of 24" in result.summary
    status, _, outcomes, _ = derive_status(CertifiedCheck, result)
    assert outcomes["certified.certified_accuracy_at_radius"]["status"] == status != "not_evaluated"


def test_best_of_interval_covers_the_best_noise_level():
    """Simulated: three noise levels certified on the same 50 images; the interval of the best
    observed one must contain the best true certified accuracy at least 95% of the time."""
    from mcaudit.plugins.checks.certified import best_of_interval

    rng = np.random.default_rng(0)
    truth = np.array([0.55, 0.6, 0.62])
    hits = []
    for _ in range(500):
        u = rng.random(50)  # one latent robustness per image: the levels are strongly correlated
        k = [int((u < p).sum()) for p in truth]
        lo, hi = best_of_interval([(v, 50) for v in k])
        hits.append(lo <= truth.max() <= hi)
    assert np.mean(hits) >= 0.95


def test_a_model_at_chance_does_not_pass():
    import dataclasses

    ctx = make_context(load_adapter("demo"), phantom_dataset(60, seed=2))
    shuffled = np.random.default_rng(1).permutation(ctx.forward.labels)
    ctx = dataclasses.replace(ctx, forward=dataclasses.replace(ctx.forward, labels=shuffled))
    result = run_check(ctx, sigmas=[0.25, 0.5], n=64, n_images=32)
    status, _, outcomes, _ = derive_status(CertifiedCheck, result)
    assert outcomes["certified.certified_accuracy_at_radius"]["status"] in ("fail", "inconclusive")
    assert status in ("fail", "inconclusive")


def test_profiles_and_threshold_reasons():
    quick, standard = (CertifiedCheck.resolve_params(CertifiedCheck.profile_params(p)) for p in ("quick", "standard"))
    assert standard == CertifiedCheck.resolve_params({})
    assert quick["n_images"] < standard["n_images"] < CertifiedCheck.profiles["thorough"]["n_images"]
    assert set(CertifiedCheck.threshold_reasons) == set(CertifiedCheck.default_thresholds)
    with pytest.raises(InputError, match="certified.gate_radius"):
        CertifiedCheck.resolve_params({"gate_radius": -1.0}) and run_check(half_space_context(8)[0], gate_radius=-1.0)
