"""Tests of the saliency check (plugins/checks/saliency/ and its helper modules)."""

from __future__ import annotations

import csv

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from mcaudit import InputError
from mcaudit.data.dataset import AuditDataset, Record
from mcaudit.plugins.checks.saliency import SaliencyCheck
from mcaudit.plugins.checks.saliency.attributions import AttributionSettings, attribution_maps
from mcaudit.plugins.checks.saliency.metrics import (
    baseline_images,
    curve_area,
    mass_inside,
    perturbation_curves,
    pixel_ranks,
    pointing_hits,
    random_ranks,
    rank_correlation,
    structural_similarity,
    top_fraction_iou,
)
from mcaudit.plugins.checks.saliency.tower import find_image_tower
from mcaudit.prompts import PromptSet
from mcaudit.testing import load_adapter, make_context, save_openclip_folder, tiny_openclip

from mcaudit.testing import derive_status
from conftest import shared

# -- a model whose label is decided by a bright square at a known place -----------------------
SIZE = 32
SQUARE = (slice(8, 16), slice(16, 24))  # rows, columns: one 8 x 8 patch of the ViT grid
SQUARE_CLASSES = ["no square", "square"]
SQUARE_PROMPTS = PromptSet(templates=("an image with {}.",), phrasings={"no square": ["no marker"], "square": ["a bright marker"]})
SQUARE_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


def square_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images, each with a bright distractor square somewhere away from the known place;
    label 1 images also have the bright square at the known place, which alone decides the label."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.35, size=(n, SIZE, SIZE)).astype(np.float32)
    labels = np.arange(n) % 2
    for i in range(n):
        while True:
            r, c = rng.integers(0, SIZE - 6, size=2)
            if r + 6 <= SQUARE[0].start - 1 or r >= SQUARE[0].stop + 1 or c + 6 <= SQUARE[1].start - 1 or c >= SQUARE[1].stop + 1:
                break
        images[i, r : r + 6, c : c + 6] = rng.uniform(0.8, 1.0)
        if labels[i]:
            images[i, SQUARE[0], SQUARE[1]] = rng.uniform(0.8, 1.0)
    return images, labels


def square_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[SQUARE] = True
    return mask


class SquareDataset(AuditDataset):
    """The square images in memory; images with the square carry it as their mask."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mask_file: Path | None):
        records = [
            Record(source=f"square-{i}", label=int(y), mask=str(mask_file) if (mask_file and y) else None)
            for i, y in enumerate(labels)
        ]
        super().__init__(spec="squares", records=records, classes=SQUARE_CLASSES, image_size=(SIZE, SIZE),
                         fingerprint="squares", format_name="squares")
        self.images = images

    def load_pixels(self, index):
        return np.repeat(self.images[index][..., None], 3, axis=2), True


def train_square_model(folder: Path, seed: int = 0, steps: int = 250):
    """A tiny open_clip ViT trained (both towers, zero-shot objective) on the square task."""
    save_openclip_folder(tiny_openclip(seed, SQUARE_CFG), folder, SQUARE_CFG, mean=[0.5] * 3, std=[0.25] * 3)
    adapter = load_adapter(str(folder)).requires_grad_(True)  # the loader freezes weights
    images, labels = square_images(1024, seed + 100)
    x_all = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous()
    y_all = torch.from_numpy(labels)
    prompts = SQUARE_PROMPTS.class_prompts(SQUARE_CLASSES)
    # The auxiliary head gets a tiny ViT off the plateau where both captions embed alike
    # (the trick of scripts/train_demo.py); it is thrown away after training.
    head = torch.nn.Linear(SQUARE_CFG["embed_dim"], 2)
    params = list(adapter.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    adapter.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (64,), generator=gen)
        raw = adapter._encode_normalized_image(adapter.normalize_pixels(x_all[idx]))
        text = adapter.class_text_features(prompts)
        logits = adapter.logit_scale * torch.nn.functional.normalize(raw, dim=-1) @ text.T
        loss = torch.nn.functional.cross_entropy(logits, y_all[idx]) + torch.nn.functional.cross_entropy(head(raw), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def square_model(tmp_path_factory):
    return train_square_model(tmp_path_factory.mktemp("square-model"), seed=0, steps=100)


@pytest.fixture(scope="module")
def untrained_square_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("square-untrained")
    save_openclip_folder(tiny_openclip(0, SQUARE_CFG), folder, SQUARE_CFG, mean=[0.5] * 3, std=[0.25] * 3)
    return load_adapter(str(folder))


@pytest.fixture(scope="module")
def square_data(tmp_path_factory):
    """Only images with the square, so every explained prediction is 'square'."""
    from PIL import Image

    mask_file = tmp_path_factory.mktemp("square-mask") / "mask.png"
    Image.fromarray(square_mask().astype(np.uint8) * 255).save(mask_file)
    images, labels = square_images(48, seed=7)
    keep = labels == 1
    return SquareDataset(images[keep], labels[keep], mask_file)


KNOWN_ANSWER_PARAMS = {
    "n_images": 12, "n_mask_images": 0, "methods": ["integrated_gradients", "saliency", "grad_cam"], "steps": 8,
    "cascade_points": 1, "top_percent": 6.25, "n_bootstrap": 200, "ig_steps": 16,
}


def test_square_model_is_learned(square_model):
    images, labels = square_images(128, seed=11)
    ctx = make_context(square_model, SquareDataset(images, labels, None), prompts=SQUARE_PROMPTS)
    assert (ctx.forward.preds == ctx.forward.labels).mean() >= 0.95


@pytest.fixture(scope="module")
def square_context(square_model, square_data):
    return make_context(square_model, square_data, prompts=SQUARE_PROMPTS)


@pytest.fixture(scope="module")
def square_result(square_context):
    return SaliencyCheck().run(square_context, SaliencyCheck.resolve_params(KNOWN_ANSWER_PARAMS))


def test_known_answer_faithful_maps_find_the_square(square_context, square_result):
    assert (square_context.forward.preds == 1).all()
    result = square_result
    m, ci = result.metrics, result.intervals
    # most of the positive evidence lies in the square (6% of the image), and peaks there
    assert m["integrated_gradients.mass_in_mask"] > 0.8
    for method in ("integrated_gradients", "saliency", "grad_cam"):
        assert m[f"{method}.pointing_game"] == 1.0
        assert m[f"{method}.deletion_gain"] > 0, method
    # deleting the pixels the gradient methods rank first kills the score far faster than random
    assert ci["saliency.deletion_gain"][0] > 0
    assert ci["grad_cam.deletion_gain"][0] > 0
    assert m["saliency.deletion_auc"] < m["random.deletion_auc"]
    # randomising the model changes the maps
    assert m["saliency.randomisation_spearman"] < 0.5 and m["saliency.sanity_passed"] == 1.0
    assert m["integrated_gradients.randomisation_spearman"] < 0.9
    assert m["integrated_gradients.randomisation_ssim"] < 0.6
    assert m["n_mask_images"] == m["n_images"] == 12


def test_known_answer_the_recommended_method_is_one_that_passes_the_sanity_test(square_result):
    """On the square model Integrated Gradients and Grad-CAM keep their maps when the tower is
    randomised (as Adebayo et al. found for input-weighted and class-activation maps); plain
    gradients do not. Only the latter may be recommended, however faithful the others look."""
    result = square_result
    m = result.metrics
    assert result.details["sanity"] == {"integrated_gradients": "fail", "saliency": "pass", "grad_cam": "fail"}
    assert result.intervals["integrated_gradients.randomisation_spearman"][0] > 0.5
    assert result.intervals["saliency.randomisation_spearman"][1] <= 0.5
    assert m["grad_cam.deletion_gain"] > m["saliency.deletion_gain"]  # more faithful, yet not sane
    assert result.details["recommended"] == "saliency"
    for key in ("deletion_gain", "insertion_gain", "mass_in_mask"):
        assert m[f"recommended_{key}"] == m[f"saliency.{key}"]
        assert result.intervals[f"recommended_{key}"] == result.intervals[f"saliency.{key}"]
    assert m["mask_share"] == pytest.approx(64 / 1024)
    status, reason, outcomes, _ = derive_status(SaliencyCheck, result)
    assert {o["metric"]: o["status"] for o in outcomes.values()} == {
        "recommended_deletion_gain": "pass", "recommended_insertion_gain": "pass", "recommended_mass_in_mask": "pass"}
    assert status == "pass", reason
    assert "Saliency (gradient) is the most faithful" in result.summary
    assert "Integrated Gradients, Grad-CAM fail the randomisation sanity test" in result.summary


def test_known_answer_when_every_method_fails_the_sanity_test_the_check_fails(square_context, square_result):
    params = SaliencyCheck.resolve_params(KNOWN_ANSWER_PARAMS | {"methods": ["integrated_gradients", "grad_cam"]})
    result = SaliencyCheck().run(square_context, params)
    assert set(result.details["sanity"].values()) == {"fail"} and result.details["recommended"] is None
    assert [f.status for f in result.findings] == ["fail"]
    assert "no attribution method passes the randomisation sanity test" in result.findings[0].message
    for key in ("deletion_gain", "insertion_gain", "mass_in_mask"):
        assert f"recommended_{key}" not in result.metrics
        assert "none can be recommended" in result.not_evaluated[f"recommended_{key}"]
    status, reason, outcomes, _ = derive_status(SaliencyCheck, result)
    assert status == "fail" and reason == result.findings[0].message
    assert {o["status"] for o in outcomes.values()} == {"not_evaluated"}
    assert "no method is recommended" in result.summary and "most faithful" not in result.summary


def test_bootstrap_intervals_over_images_match_scipy(square_result):
    from scipy.stats import bootstrap

    for key in ("saliency.deletion_auc", "grad_cam.insertion_auc"):
        values = np.array([v for v in square_result.per_image[key] if v is not None])
        assert len(values) == 12 and square_result.metrics[key] == pytest.approx(values.mean())
        ref = bootstrap((values,), np.mean, n_resamples=20000, method="percentile", random_state=0).confidence_interval
        lo, hi = square_result.intervals[key]
        # 200 resamples in the check: its percentiles carry Monte Carlo error of a few % of the width
        assert lo == pytest.approx(ref.low, abs=0.2 * (ref.high - ref.low))
        assert hi == pytest.approx(ref.high, abs=0.2 * (ref.high - ref.low))


@pytest.mark.parametrize("spearman, interval, verdict", [
    (0.2, (0.1, 0.3), "pass"), (0.7, (0.6, 0.8), "fail"), (0.45, (0.3, 0.6), "undecided"),
    (0.45, None, "pass"), (float("nan"), None, "no verdict"),
])
def test_sanity_verdict_is_decided_on_the_interval(spearman, interval, verdict):
    from mcaudit.plugins.checks.saliency import _sanity_verdicts

    intervals = {"saliency.randomisation_spearman": interval} if interval else {}
    assert _sanity_verdicts(["saliency"], {"saliency.randomisation_spearman": spearman}, intervals, 0.5) == {"saliency": verdict}


def test_no_method_clearly_passing_is_inconclusive_and_none_is_recommended():
    from mcaudit.plugins.checks.saliency import _recommend

    metrics = {"saliency.deletion_gain": 1.0, "saliency.insertion_gain": 1.0, "grad_cam.deletion_gain": 2.0, "grad_cam.insertion_gain": 2.0}
    recommended, findings, not_evaluated = _recommend(["saliency", "grad_cam"], metrics, {},
                                                      {"saliency": "undecided", "grad_cam": "fail"}, True, False)
    assert recommended is None and [f.status for f in findings] == ["inconclusive"]
    assert "Saliency (gradient)" in findings[0].message and set(not_evaluated) == {
        "recommended_deletion_gain", "recommended_insertion_gain", "recommended_mass_in_mask"}
    # the less faithful method is recommended when it alone passes
    recommended, findings, not_evaluated = _recommend(["saliency", "grad_cam"], metrics, {},
                                                      {"saliency": "pass", "grad_cam": "fail"}, True, False)
    assert recommended == "saliency" and not findings
    assert not_evaluated == {"recommended_mass_in_mask": "the explained images have no region masks or boxes"}


def test_known_answer_untrained_model_gets_no_credit(untrained_square_model, square_result, square_data):
    """The control: the same data through an untrained model; its gradients do not single out the
    square and do no better than random, so the known-answer test above can fail."""
    params = SaliencyCheck.resolve_params(KNOWN_ANSWER_PARAMS | {"cascade_points": 0})
    trained = square_result.metrics
    control = SaliencyCheck().run(make_context(untrained_square_model, square_data, prompts=SQUARE_PROMPTS), params).metrics
    assert control["saliency.mass_in_mask"] < trained["saliency.mass_in_mask"] - 0.2
    assert control["saliency.deletion_gain"] < 1.0 < trained["saliency.deletion_gain"]
    assert control["grad_cam.deletion_gain"] < 1.0 < trained["grad_cam.deletion_gain"]
    assert "saliency.randomisation_spearman" not in control  # cascade_points 0 turns the test off
    assert "recommended_deletion_gain" not in control


def test_sanity_test_turned_off_leaves_the_check_not_evaluated(untrained_square_model, square_data):
    params = SaliencyCheck.resolve_params(KNOWN_ANSWER_PARAMS | {"cascade_points": 0, "methods": ["saliency"], "n_images": 4})
    result = SaliencyCheck().run(make_context(untrained_square_model, square_data, prompts=SQUARE_PROMPTS), params)
    assert "cascade_points 0" in result.not_evaluated["recommended_deletion_gain"]
    status, reason, _, _ = derive_status(SaliencyCheck, result)
    assert status == "not_evaluated" and "cascade_points 0" in reason


def with_boxes(data: SquareDataset, box) -> SquareDataset:
    """The same images with a box (x, y, width, height) as their region instead of a mask file."""
    boxed = SquareDataset(data.images, np.array([r.label for r in data.records]), None)
    for record in boxed.records:
        record.boxes = (box,)
    return boxed


SQUARE_BOX = (SQUARE[1].start, SQUARE[0].start, SQUARE[1].stop - SQUARE[1].start, SQUARE[0].stop - SQUARE[0].start)


def test_known_answer_a_box_around_the_square_scores_as_its_mask_does(square_model, square_data, square_result):
    boxed = make_context(square_model, with_boxes(square_data, SQUARE_BOX), prompts=SQUARE_PROMPTS)
    assert torch.equal(boxed.load_mask(0), torch.from_numpy(square_mask()))
    result = SaliencyCheck().run(boxed, SaliencyCheck.resolve_params(KNOWN_ANSWER_PARAMS))
    for method in KNOWN_ANSWER_PARAMS["methods"]:
        for key in ("pointing_game", "mass_in_mask", "top_iou"):
            assert result.metrics[f"{method}.{key}"] == pytest.approx(square_result.metrics[f"{method}.{key}"], abs=1e-9)


def test_known_answer_a_box_away_from_the_square_gets_no_credit(square_model, square_data):
    away = (0, SIZE - 8, 8, 8)  # the bottom-left corner: never the square, rarely the distractor
    boxed = make_context(square_model, with_boxes(square_data, away), prompts=SQUARE_PROMPTS)
    result = SaliencyCheck().run(boxed, SaliencyCheck.resolve_params({**KNOWN_ANSWER_PARAMS, "methods": ["saliency"]}))
    assert result.metrics["n_mask_images"] == 12
    assert result.metrics["saliency.pointing_game"] <= 0.1
    assert result.metrics["saliency.mass_in_mask"] < 0.15


def test_mass_in_mask_matches_captum_run_bare(square_model, square_context, square_result):
    """The check's Integrated Gradients mass equals captum's, called directly on the same rows."""
    from captum.attr import IntegratedGradients

    ctx, result = square_context, square_result
    params = SaliencyCheck.resolve_params(KNOWN_ANSWER_PARAMS)
    rows = result.details["rows"]
    x = ctx.load_pixels(rows)
    classifier = square_model.zero_shot_classifier(ctx.class_features.clone())
    target = torch.as_tensor(ctx.forward.preds[rows])
    attr = IntegratedGradients(classifier).attribute(x, baselines=x * 0, target=target, n_steps=params["ig_steps"]).sum(dim=1)
    pos = attr.clamp_min(0)
    expected = (pos[:, SQUARE[0], SQUARE[1]].sum(dim=(1, 2)) / pos.sum(dim=(1, 2))).mean()
    assert result.metrics["integrated_gradients.mass_in_mask"] == pytest.approx(float(expected), abs=1e-4)


# -- batched curves against a plain loop -------------------------------------------------------
def reference_curves(classifier, image, baseline, relevance, target, steps):
    """Deletion and insertion curves one perturbed image and one forward pass at a time."""
    order = np.argsort(-relevance.reshape(-1), kind="stable")
    hw = len(order)
    deletion, insertion = [], []
    for k in range(steps + 1):
        top = order[: (k * hw) // steps]
        deleted = image.clone().reshape(3, -1)
        deleted[:, top] = baseline.reshape(3, -1)[:, top]
        inserted = baseline.clone().reshape(3, -1)
        inserted[:, top] = image.reshape(3, -1)[:, top]
        with torch.no_grad():
            deletion.append(float(classifier(deleted.reshape(1, *image.shape))[0, target]))
            insertion.append(float(classifier(inserted.reshape(1, *image.shape))[0, target]))
    return np.array(deletion), np.array(insertion)


@pytest.mark.parametrize("baseline", ["blur", "mean", "black"])
def test_deletion_auc_equals_unbatched_reference(mcaudit_tiny_model, mcaudit_phantoms, baseline):
    from sklearn.metrics import auc

    ctx = make_context(mcaudit_tiny_model, mcaudit_phantoms(6, seed=3, image_size=(32, 32)))
    classifier = mcaudit_tiny_model.zero_shot_classifier(ctx.class_features.clone())
    pixels = ctx.load_pixels([0, 1, 2])
    targets = torch.tensor([0, 1, 1])
    gen = torch.Generator().manual_seed(5)
    maps = [torch.rand(3, *pixels.shape[-2:], generator=gen) for _ in range(2)]  # tie-free
    ranks = torch.stack([pixel_ranks(m, gen) for m in maps])
    base = baseline_images(pixels, baseline)
    steps = 7

    def score(x, i):
        return classifier(x)[torch.arange(len(x)), targets[i]]

    # a batch size that splits images' steps across passes, to test the bookkeeping
    deletion, insertion = perturbation_curves(score, pixels, base, ranks, steps, batch_size=5)
    x_axis = np.linspace(0, 1, steps + 1)
    for o in range(2):
        for i in range(3):
            ref_del, ref_ins = reference_curves(classifier, pixels[i], base[i], maps[o][i].numpy(), int(targets[i]), steps)
            np.testing.assert_allclose(deletion[o, i], ref_del, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(insertion[o, i], ref_ins, rtol=1e-4, atol=1e-4)
            assert curve_area(deletion[o, i]) == pytest.approx(auc(x_axis, ref_del), abs=1e-4)
            assert curve_area(insertion[o, i]) == pytest.approx(auc(x_axis, ref_ins), abs=1e-4)


def test_pixel_ranks_break_ties_at_random_but_reproducibly():
    flat = torch.zeros(1, 8, 8)
    flat[0, 2, 3] = 1.0
    a = pixel_ranks(flat, torch.Generator().manual_seed(1))
    b = pixel_ranks(flat, torch.Generator().manual_seed(1))
    c = pixel_ranks(flat, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[0, 2 * 8 + 3] == 0  # the one relevant pixel first


def test_pixel_orders_of_a_shard_equal_those_of_the_whole():
    """A torchrun process holding images 2 and 3 of 5 gets the orders one process gives them."""
    maps = torch.zeros(5, 6, 6)
    maps[:, 1, 1] = 1.0  # mostly ties, so the random tie order matters
    whole = torch.cat([random_ranks(5, 36, torch.Generator().manual_seed(3)), pixel_ranks(maps, torch.Generator().manual_seed(4))])
    gen_r, gen_p = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    held = np.array([2, 3])
    part = torch.cat([random_ranks(5, 36, gen_r, held), pixel_ranks(maps[held], gen_p, held, 5)])
    assert torch.equal(part, whole[[2, 3, 7, 8]])
    # the generator advanced past all five images, so the next draws agree too
    reference = torch.Generator().manual_seed(3)
    for _ in range(5):
        torch.randperm(36, generator=reference)
    assert torch.equal(gen_r.get_state(), reference.get_state())


def test_rank_correlation_and_ssim_match_scipy_and_torchmetrics():
    from scipy.stats import spearmanr
    from torchmetrics.functional.image import structural_similarity_index_measure

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 24, 24, generator=gen)
    b = a + 0.8 * torch.randn(4, 24, 24, generator=gen)
    b[1] = torch.relu(b[1])  # ties, as rectified maps have
    ours = rank_correlation(a, b)
    for i in range(4):
        assert ours[i] == pytest.approx(spearmanr(a[i].abs().reshape(-1), b[i].abs().reshape(-1)).statistic, abs=1e-10)
    assert np.isnan(rank_correlation(torch.ones(1, 5, 5), a[:1, :5, :5])[0])
    na, nb = a.abs() / a.abs().amax(dim=(1, 2), keepdim=True), b.abs() / b.abs().amax(dim=(1, 2), keepdim=True)
    ssim = structural_similarity(na, nb)
    for i in range(4):
        ref = structural_similarity_index_measure(na[i][None, None].double(), nb[i][None, None].double(), data_range=1.0, sigma=1.5)
        assert ssim[i] == pytest.approx(float(ref), abs=1e-8)
    assert structural_similarity(na, na) == pytest.approx(np.ones(4))


def test_localisation_measures_match_references():
    from sklearn.metrics import jaccard_score

    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(5, 16, 16, generator=gen)
    masks = torch.zeros(5, 16, 16, dtype=torch.bool)
    masks[:, 4:10, 3:9] = True
    maps[0, 5, 5] = 50.0  # peak inside the mask
    maps[1, 0, 0] = 50.0  # peak outside
    hits = pointing_hits(maps, masks)
    assert hits[0] == 1 and hits[1] == 0
    for i in range(5):
        m, k = maps[i].numpy(), masks[i].numpy()
        assert hits[i] == float(k.reshape(-1)[np.argmax(m)])
        pos = np.clip(m, 0, None)
        assert mass_inside(maps, masks)[i] == pytest.approx(pos[k].sum() / pos.sum())
        top = np.zeros(256, bool)
        top[np.argsort(-m.reshape(-1))[:51]] = True  # 20% of 256, rounded
        assert top_fraction_iou(maps, masks, 20.0)[i] == pytest.approx(jaccard_score(k.reshape(-1), top))
    assert np.isnan(mass_inside(-maps.abs() - 1, masks)).all()


# -- Grad-CAM and the image tower ---------------------------------------------------------------
def test_vit_grad_cam_matches_hand_written_hooks(square_model, square_context):
    ctx = square_context
    classifier = square_model.zero_shot_classifier(ctx.class_features.clone())
    tower = find_image_tower(classifier)
    assert tower.kind == "open_clip ViT" and tower.has_grad_cam
    assert [name for name, _ in tower.levels] == ["output head", "block 2", "block 1", "patch embedding"]
    x = ctx.load_pixels([0, 1, 2])
    target = torch.tensor([1, 1, 0])
    with torch.no_grad():
        plain = classifier(x)
        with tower.grad_cam_tap():
            tapped = classifier(x)
    assert torch.equal(plain, tapped)  # the tap changes no value

    settings = AttributionSettings(batch_size=2, internal_batch_size=8, ig_steps=4, shap_samples=2, occlusion_window=8, occlusion_stride=4, seed=0)
    ours = attribution_maps("grad_cam", classifier, tower, x, target, settings)

    # reference: Grad-CAM by hand on the last block's normed input tokens, class token dropped
    saved = {}
    ln = square_model.model.visual.transformer.resblocks[-1].ln_1
    handle = ln.register_forward_hook(lambda _m, _i, out: saved.update(tokens=out))
    xr = x.clone().requires_grad_(True)
    logits = classifier(xr)
    handle.remove()
    tokens = saved["tokens"]
    grads = torch.autograd.grad(logits[torch.arange(3), target].sum(), tokens)[0]
    patches, g = tokens[:, 1:], grads[:, 1:]
    weights = g.mean(dim=1, keepdim=True)
    cam = torch.relu((weights * patches).sum(dim=2)).reshape(3, 1, 4, 4)
    cam = torch.nn.functional.interpolate(cam, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(ours, cam.detach(), atol=1e-5, rtol=1e-4)
    # the known square is where the trained model's Grad-CAM peaks
    assert ours[0][SQUARE].mean() > ours[0].mean()


def test_timm_vit_grad_cam_matches_hand_written_hooks():
    """BiomedCLIP's image tower is a timm ViT trunk inside open_clip's TimmModel."""
    from mcaudit.plugins.loaders.openclip_adapter import OpenClipAdapter

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 160},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        "custom_text": True,
    }
    model = tiny_openclip(0, cfg)
    adapter = OpenClipAdapter(model, None, spec="timm", image_size=(160, 160), mean=[0.5] * 3, std=[0.25] * 3).eval()
    classifier = adapter.zero_shot_classifier(torch.nn.functional.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), dim=-1))
    tower = find_image_tower(classifier)
    trunk = model.visual.trunk
    assert tower.kind == "timm ViT" and tower.has_grad_cam
    assert [name for name, _ in tower.levels][:2] == ["output head", f"block {len(trunk.blocks)}"]
    assert tower.levels[-1][0] == "patch embedding"
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1])
    settings = AttributionSettings(batch_size=2, internal_batch_size=8, ig_steps=4, shap_samples=2, occlusion_window=8, occlusion_stride=4, seed=0)
    ours = attribution_maps("grad_cam", classifier, tower, x, target, settings)

    # reference: Grad-CAM by hand on the last block's normed input tokens, prefix tokens dropped
    saved = {}
    handle = trunk.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: saved.update(tokens=out))
    logits = classifier(x.clone().requires_grad_(True))
    handle.remove()
    tokens = saved["tokens"]
    grads = torch.autograd.grad(logits[torch.arange(2), target].sum(), tokens)[0]
    prefix = trunk.num_prefix_tokens
    gh, gw = trunk.patch_embed.grid_size
    patches, g = tokens[:, prefix:], grads[:, prefix:]
    cam = torch.relu(((g.mean(dim=1, keepdim=True)) * patches).sum(dim=2)).reshape(2, 1, gh, gw)
    cam = torch.nn.functional.interpolate(cam, size=(160, 160), mode="bilinear", align_corners=False)[:, 0]
    assert cam.abs().sum() > 0
    torch.testing.assert_close(ours, cam.detach(), atol=1e-5, rtol=1e-4)


def test_resnet_tower_uses_the_last_conv_stage():
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    model = tiny_openclip(0, cfg)
    from mcaudit.plugins.loaders.openclip_adapter import OpenClipAdapter

    adapter = OpenClipAdapter(model, None, spec="resnet", image_size=(64, 64), mean=[0.5] * 3, std=[0.25] * 3).eval()
    classifier = adapter.zero_shot_classifier(torch.nn.functional.normalize(torch.randn(2, 16), dim=-1))
    tower = find_image_tower(classifier)
    assert tower.kind == "open_clip ResNet" and tower.cam_layer is model.visual.layer4
    assert [n for n, _ in tower.levels] == ["output head", "layer4", "layer3", "layer2", "layer1", "stem"]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    settings = AttributionSettings(batch_size=2, internal_batch_size=8, ig_steps=4, shap_samples=2, occlusion_window=8, occlusion_stride=4, seed=0)
    maps = attribution_maps("grad_cam", classifier, tower, x, torch.tensor([0, 1]), settings)
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all() and (maps >= 0).all()


def _conv_adapter():
    """A differentiable ModelAdapter that is not open_clip: no image tower to find."""
    from mcaudit.models.adapter import ModelAdapter

    class TinyConvAdapter(ModelAdapter):
        def __init__(self):
            super().__init__(spec="tiny-conv", image_size=(32, 32), mean=[0.5] * 3, std=[0.25] * 3)
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 16))
            self.text = torch.nn.Embedding(1000, 16)

        def _encode_normalized_image(self, images):
            return self.net(images)

        def _encode_prompts(self, prompts):
            return self.text(torch.tensor([sum(map(ord, p)) % 1000 for p in prompts]))

        @property
        def logit_scale(self):
            return 10.0

    return TinyConvAdapter().eval()


def test_adapter_without_open_clip_tower_skips_grad_cam_with_a_note(mcaudit_phantoms):
    adapter = _conv_adapter()
    ctx = make_context(adapter, mcaudit_phantoms(12, seed=2, image_size=(32, 32)))
    params = SaliencyCheck.resolve_params({"methods": ["saliency", "grad_cam"], "n_images": 4, "steps": 4, "n_bootstrap": 0})
    result = SaliencyCheck().run(ctx, params)
    assert result.status == "ok"
    assert any("Grad-CAM skipped" in w for w in result.warnings)
    assert "saliency.deletion_auc" in result.metrics and "grad_cam.deletion_auc" not in result.metrics
    assert result.details["image_tower"] == "unknown" and result.details["notes"]
    assert "saliency.randomisation_spearman" in result.metrics  # randomises the adapter's own layers
    only_cam = SaliencyCheck().run(ctx, SaliencyCheck.resolve_params({"methods": ["grad_cam"], "n_images": 4}))
    assert only_cam.status == "skipped"


# -- parameters, determinism, targets ------------------------------------------------------------
@pytest.mark.parametrize("given", [
    {"methods": ["saliency", "lime"]}, {"methods": []}, {"n_images": 1}, {"steps": 0}, {"top_percent": 0.0},
    {"baseline": "noise"}, {"cascade_points": -1}, {"sanity_max_spearman": 2.0}, {"ig_steps": 0},
])
def test_bad_parameters_are_input_errors(given):
    with pytest.raises(InputError, match="saliency"):
        SaliencyCheck.resolve_params(given)


def test_comma_separated_methods_from_the_command_line():
    assert SaliencyCheck.resolve_params({"methods": "grad-cam, Saliency"})["methods"] == ["grad_cam", "saliency"]


def test_same_seed_same_metrics_and_prompt_target(mcaudit_tiny_model, mcaudit_phantoms):
    data = mcaudit_phantoms(16, seed=4, image_size=(32, 32))
    params = SaliencyCheck.resolve_params({"methods": ["gradient_shap", "occlusion", "grad_cam"], "n_images": 3, "steps": 3, "shap_samples": 4, "occlusion_window": 8, "cascade_points": 1, "n_bootstrap": 200})
    a = SaliencyCheck().run(make_context(mcaudit_tiny_model, data, seed=3), params)
    b = SaliencyCheck().run(make_context(mcaudit_tiny_model, data, seed=3), params)
    assert a.metrics == b.metrics and a.intervals == b.intervals
    assert a.details["rows"] == b.details["rows"] and len(a.details["rows"]) == 3
    prompt = SaliencyCheck().run(
        make_context(mcaudit_tiny_model, data, seed=3),
        SaliencyCheck.resolve_params({"methods": ["saliency"], "n_images": 4, "steps": 4, "target_prompt": "a bright opacity", "cascade_points": 0}),
    )
    assert prompt.details["target"] == "prompt 'a bright opacity'"
    assert np.isfinite(prompt.metrics["saliency.deletion_auc"])


# -- real data: HAM10000 with lesion masks --------------------------------------------------------
def _cyan_pixels(png: bytes) -> int:
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb[..., 0] < 60) & (rgb[..., 1] > 200) & (rgb[..., 2] > 200)).sum())


def audit_saliency_on(manifest: Path, tmp_path: Path, n_images: int):
    """``mcaudit run`` of a small saliency check (Saliency, Grad-CAM) with a tiny model."""
    from mcaudit.testing import run_cli

    folder = save_openclip_folder(tiny_openclip(0), tmp_path / "tiny")
    outcome = run_cli([
        "run", "--quiet", "--model", folder, "--data", manifest, "--checks", "saliency", "-p", "mcaudit.plugins.checks.saliency",
        "--set", "saliency.methods=saliency,grad_cam", "--set", f"saliency.n_images={n_images}", "--set", "saliency.steps=4",
        "--set", "saliency.cascade_points=1", "--device", "cpu",
    ], tmp_path / "out")
    assert outcome.exit_code == 0, outcome.output
    return outcome


def test_ham10000_localisation_and_mask_outlines(tmp_path):
    outcome = audit_saliency_on(shared("ham10000/manifest.csv"), tmp_path, n_images=4)
    entry = outcome.results["checks"]["saliency"]
    assert entry["execution"] == "completed", entry.get("summary")
    assert entry["status"] in ("pass", "warn", "fail", "inconclusive", "not_evaluated"), entry["status"]
    metrics = entry["metrics"]
    assert metrics["n_mask_images"] == 5
    for method in ("saliency", "grad_cam"):
        for key in ("pointing_game", "mass_in_mask", "top_iou"):
            assert metrics[f"{method}.{key}"] is not None and 0 <= metrics[f"{method}.{key}"] <= 1
    assert "Localisation" in outcome.html and "Attribution maps" in outcome.html
    # the overlay PNG is embedded in the report; decode it to find the outlines
    import base64
    import re

    pngs = [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", outcome.html)]
    assert pngs and max(_cyan_pixels(p) for p in pngs) > 50  # the cyan mask outlines are drawn


def test_tbx11k_boxes_from_coco_annotations(tmp_path):
    """Three TBX11K radiographs: their COCO boxes become the regions localisation is scored on."""
    import importlib.util
    import json

    annotations = shared("cxr_samples/tbx11k/annotations/TBX11K_train.json")
    images = annotations.parent.parent / "imgs"
    spec = importlib.util.spec_from_file_location("coco_to_manifest", Path(__file__).parents[1] / "examples" / "coco_to_manifest.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    manifest = tmp_path / "tbx.csv"
    assert converter.main([str(annotations), str(images), str(manifest)]) == 0
    coco = json.loads(annotations.read_text())
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(coco["images"]) == 3
    assert sorted(r["label"] for r in rows) == ["health", "tb", "tb"]
    assert sum(len(r["boxes"].split(";")) for r in rows if r["boxes"]) == len(coco["annotations"])

    from mcaudit.plugins.formats.image_sets import load_manifest
    from mcaudit.hook_types import DataRequest

    data = load_manifest(manifest, DataRequest(image_size=(64, 64)))
    first = coco["annotations"][0]  # a box on a 512 x 512 image: 1/8 of it at 64 x 64
    region = data.load_mask(next(i for i, r in enumerate(data.records) if r.boxes == ((*[round(v, 2) for v in first["bbox"]],),)))
    x, y, w, h = first["bbox"]
    assert abs(int(region.sum()) - (w / 8) * (h / 8)) <= (w / 8 + h / 8 + 1) * 2

    outcome = audit_saliency_on(manifest, tmp_path, n_images=2)
    metrics = outcome.results["checks"]["saliency"]["metrics"]
    assert metrics["n_mask_images"] == 2  # the two tb images; the healthy one has no box
    for method in ("saliency", "grad_cam"):
        assert 0 <= metrics[f"{method}.mass_in_mask"] <= 1


# -- torchrun: two gloo processes split the images --------------------------------------------------
def _phantom_manifest(folder: Path, n: int) -> Path:
    """Demo phantoms as PNGs in a CSV manifest, every third one with a (left lung) region mask."""
    from PIL import Image

    from mcaudit.testing import phantom_dataset

    data = phantom_dataset(n, seed=5, groups=())
    (folder / "masks").mkdir(parents=True)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 14:30] = 255
    Image.fromarray(mask).save(folder / "masks" / "lung.png")
    lines = ["path,label,mask"]
    for i in range(n):
        pixels = (data[i]["pixels"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{data.classes[data.records[i].label]},{'masks/lung.png' if i % 3 == 0 else ''}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


@pytest.mark.slow
def test_torchrun_two_processes_split_the_images(tmp_path):
    """Each process explains its share of the images (GradientSHAP's draws seeded per row);
    the gathered per-image results give the metrics, intervals and per-image columns of one
    process, and rank 0 still draws the overlay grid with images held by both processes."""
    from mcaudit.testing import run_cli, run_torchrun

    manifest = _phantom_manifest(tmp_path / "data", 30)
    args = ["--quiet", "--model", "demo", "--data", str(manifest), "--checks", "saliency", "--threads", "1",
            "--set", "saliency.methods=integrated_gradients,saliency,gradient_shap,grad_cam",
            "--set", "saliency.n_images=9", "--set", "saliency.n_mask_images=3", "--set", "saliency.steps=5",
            "--set", "saliency.ig_steps=8", "--set", "saliency.shap_samples=4", "--set", "saliency.n_bootstrap=50",
            "--set", "saliency.cascade_points=2"]
    single = run_cli(["run", *args], tmp_path / "single")
    assert single.exit_code == 0, single.output
    one = single.results["checks"]["saliency"]
    two = run_torchrun(args, tmp_path / "multi")["checks"]["saliency"]
    assert one["execution"] == two["execution"] == "completed", (one["summary"], two["summary"])
    assert one["status"] == two["status"] and one["status_reason"] == two["status_reason"]
    assert two["details"]["rows"] == one["details"]["rows"] and len(one["details"]["rows"]) == 12
    assert one["metrics"]["n_mask_images"] == two["metrics"]["n_mask_images"] >= 3
    assert set(two["metrics"]) == set(one["metrics"]) and "gradient_shap.mass_in_mask" in one["metrics"]
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6, nan_ok=True), key
    assert set(two["intervals"]) == set(one["intervals"])
    for key, (lo, hi) in one["intervals"].items():
        assert two["intervals"][key] == pytest.approx([lo, hi], rel=1e-6, abs=1e-6), key
    for name in ("mean_deletion_curve", "mean_insertion_curve", "cascade_spearman"):
        for method, curve in one["details"][name].items():
            assert two["details"][name][method] == pytest.approx(curve, rel=1e-6, abs=1e-6), (name, method)
    assert [f["title"] for f in two["figures"]] == [f["title"] for f in one["figures"]]
    assert "Attribution maps" in [f["title"] for f in two["figures"]]
