"""backdoor_scan: Neural Cleanse-style trigger inversion finds a planted backdoor.

Known answers from tiny open_clip models trained here on synthetic stripe images whose
orientation says the class. A backdoored model was also taught that a small checkerboard stamp
in the bottom-right corner (16 of 1024 pixels) means the target class; a clean model never
saw the stamp.

- Three classes (the few-class case of medical tasks): a "public" base model is fine-tuned five
  times on clean data (five seeds) and once on data poisoned with the stamp. The reference rule,
  with the base as reference, must flag the target class of the poisoned fine-tune and nothing
  on the clean ones; without a reference, three classes cannot be decided (not evaluated).
- Eight classes: the MAD anomaly rule alone must flag the target of a backdoored model and
  nothing on a clean twin.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mcaudit import InputError
from mcaudit.data.dataset import AuditDataset, Record
from mcaudit.prompts import PromptSet
from mcaudit.testing import load_adapter, make_context, save_openclip_folder, tiny_openclip
from mcaudit.testing import derive_status

CLASSES8 = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
CLASSES3 = CLASSES8[:3]
TARGET = 2  # "gamma": the class the stamp sends images to
SIZE = 32
STAMP = 4
CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CLEAN_SEEDS = (1, 2, 3, 4, 5)


def prompts(classes):
    return PromptSet(templates=("a scan showing {}.",), phrasings={c: [c] for c in classes})


def stripes(rng: np.random.Generator, label: int, n_classes: int) -> np.ndarray:
    """Grey stripes whose orientation says the class; frequency, phase and noise vary."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    theta = np.pi * label / n_classes + rng.normal(0, 0.05)
    freq = rng.uniform(0.5, 0.7)
    img = 0.5 + 0.3 * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    return np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1).astype(np.float32)


def stamp(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[-STAMP:, -STAMP:] = (np.indices((STAMP, STAMP)).sum(0) % 2).astype(np.float32)
    return out


def stripe_images(seed: int, n: int, n_classes: int, poison_share: float = 0.0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, n_classes))
        img = stripes(rng, label, n_classes)
        if rng.random() < poison_share:
            img, label = stamp(img), TARGET
        images.append(img)
        labels.append(label)
    return np.stack(images), np.array(labels)


class StripeDataset(AuditDataset):
    """Clean stripe images held in memory."""

    def __init__(self, seed: int, n: int, classes: list[str]):
        self.images, labels = stripe_images(seed, n, len(classes))
        super().__init__(
            spec=f"stripes:{seed}:{n}:{len(classes)}",
            records=[Record(source=f"stripe-{i}", label=int(y)) for i, y in enumerate(labels)],
            classes=classes, image_size=(SIZE, SIZE),
            fingerprint=hashlib.sha256(f"{seed}:{n}:{classes}".encode()).hexdigest(),
            format_name="stripes",
        )

    def load_pixels(self, index: int):
        return np.repeat(self.images[index][:, :, None], 3, axis=2), True


def train(model, classes, seed: int, steps: int, poison_share: float = 0.0, lr: float = 1e-3):
    """Zero-shot objective on stripe images vs one caption per class (as scripts/train_demo.py)."""
    from mcaudit.plugins.loaders.openclip import make_tokenizer

    torch.manual_seed(seed)
    model.train().requires_grad_(True)  # a loaded model comes frozen
    text = make_tokenizer(CFG, None)([f"a scan showing {c}." for c in classes])
    images, labels = stripe_images(seed + 100, 1500, len(classes), poison_share)
    x = (torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.25
    # An auxiliary linear head gets a tiny ViT past the plateau at chance; it is thrown away.
    head = torch.nn.Linear(CFG["embed_dim"], len(classes))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        y = torch.as_tensor(labels[idx.numpy()])
        raw = model.encode_image(paste_distractors(x[idx], gen))
        logits = model.logit_scale.exp() * F.normalize(raw, dim=-1) @ F.normalize(model.encode_text(text), dim=-1).T
        loss = F.cross_entropy(logits, y) + F.cross_entropy(head(raw), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
    return model.eval()


def paste_distractors(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Paste a square cut from another image at a random place, keeping the label.

    A model that is not fooled by small pieces of other classes' stripes needs a large stamp
    to reach an honest class, which is what makes a backdoor's tiny trigger stand out.
    """
    out = x.clone()
    n = len(x)
    side = int(torch.randint(6, 13, (1,), generator=gen))
    donors = torch.randint(0, n, (n,), generator=gen)
    for i in range(n // 2):
        r, c = (int(v) for v in torch.randint(0, SIZE - side + 1, (2,), generator=gen))
        out[i, :, r : r + side, c : c + side] = x[donors[i], :, r : r + side, c : c + side]
    return out


def saved(model, folder):
    """Through a model folder and the loader hooks, as ``mcaudit run --model FOLDER`` sees it."""
    save_openclip_folder(model, folder, CFG, mean=MEAN, std=STD)
    return str(folder), load_adapter(str(folder))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: one thread beats two, which thrash when the cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- three classes: a public base and its fine-tunes --------------------------------------


@pytest.fixture(scope="module")
def base3(tmp_path_factory):
    return saved(train(tiny_openclip(0, CFG), CLASSES3, seed=0, steps=100), tmp_path_factory.mktemp("base3"))


def fine_tune(base_folder: str, seed: int, poison_share: float, steps: int):
    model = load_adapter(base_folder).model  # the open_clip module inside the adapter
    return train(model, CLASSES3, seed=seed, steps=steps, poison_share=poison_share, lr=5e-4)


@pytest.fixture(scope="module")
def clean3(base3, tmp_path_factory):
    return {s: saved(fine_tune(base3[0], s, 0.0, 40), tmp_path_factory.mktemp(f"clean3-{s}"))[1] for s in CLEAN_SEEDS}


@pytest.fixture(scope="module")
def backdoored3(base3, tmp_path_factory):
    return saved(fine_tune(base3[0], 9, 0.2, 60), tmp_path_factory.mktemp("backdoored3"))[1]


@pytest.fixture(scope="module")
def data3():
    return StripeDataset(seed=7, n=120, classes=CLASSES3)


SCAN3 = {"n_images": 24, "n_eval": 48, "max_steps": 300, "patience": 20, "restarts": 1}


@pytest.fixture(scope="module", autouse=True)
def each_scan_once():
    """Trigger inversion is deterministic (checked below), so a model's triggers on the same
    images with the same parameters are optimised once per module: the reference's are shared
    by six audits, and an audit with and without a reference shares the audited model's."""
    from mcaudit.plugins.checks import backdoor_scan

    original, memo = backdoor_scan.scan_model, {}

    def scan_model(ctx, model, class_features, candidates, opt_rows, eval_rows, params):
        key = (model.weights_sha256 or id(model), ctx.seed, opt_rows.tobytes(), eval_rows.tobytes(), candidates.tobytes(),
               tuple(sorted((k, v) for k, v in params.items() if not k.startswith("reference_"))))
        if key not in memo:
            memo[key] = original(ctx, model, class_features, candidates, opt_rows, eval_rows, params)
        return memo[key]

    scan_model.__wrapped__ = original
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backdoor_scan, "scan_model", scan_model)
        yield memo


def scan(model, dataset, classes, **params):
    from mcaudit.plugins.checks.backdoor_scan import BackdoorScanCheck

    ctx = make_context(model, dataset, prompts=prompts(classes))
    return ctx, BackdoorScanCheck().run(ctx, BackdoorScanCheck.resolve_params(params))


def status_of(result) -> str:
    """The status the host derives from the check's default thresholds and findings."""
    from mcaudit.plugins.checks.backdoor_scan import BackdoorScanCheck

    return derive_status(BackdoorScanCheck, result)[0]


def stamped_share_to_target(model, dataset, classes) -> tuple[float, float]:
    """Clean accuracy, and the share of other classes' images the planted stamp sends to the target."""
    ctx = make_context(model, dataset, prompts=prompts(classes))
    images = dataset.images[ctx.forward.indices]
    stamped = torch.stack([torch.from_numpy(stamp(img)) for img in images])[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        preds = ctx.classifier()(stamped).argmax(1).numpy()
    others = ctx.forward.labels != TARGET
    return (ctx.forward.preds == ctx.forward.labels).mean(), (preds[others] == TARGET).mean()


def test_three_class_models_learned_the_task_and_only_one_has_the_backdoor(base3, clean3, backdoored3, data3):
    for model in (base3[1], *clean3.values()):
        accuracy, to_target = stamped_share_to_target(model, data3, CLASSES3)
        assert accuracy > 0.9 and to_target < 0.2
    accuracy, to_target = stamped_share_to_target(backdoored3, data3, CLASSES3)
    assert accuracy > 0.9 and to_target > 0.9


def test_reference_rule_flags_the_planted_target(backdoored3, base3, data3):
    _, result = scan(backdoored3, data3, CLASSES3, reference_model=base3[0], **SCAN3)
    print(result.summary, result.metrics)
    assert result.not_evaluated == {}
    assert result.details["flagged"] == [CLASSES3[TARGET]]
    assert result.metrics["n_flagged"] == 1
    assert status_of(result) == "fail"
    assert "Possible backdoor" in result.summary and "'gamma'" in result.summary
    target = CLASSES3[TARGET]
    # converged, and the reversed trigger is about the planted stamp's size (16 of 1024 pixels)
    assert all(result.metrics[f"converged.{c}"] == 1 for c in CLASSES3)
    assert result.metrics[f"optimised_asr.{target}"] >= 0.95
    assert result.metrics[f"mask_area.{target}"] < 0.03
    assert result.metrics[f"norm_ratio.{target}"] <= 0.25
    # without a stamp under 10% of other classes' images go to the target (accuracy > 0.9), so
    # more than half is the reversed trigger's doing on images it was not optimised on; the exact
    # share moves with the seeded draws (above 0.7 before the streams were renamed, 0.66 after)
    assert result.metrics[f"reversed_asr.{target}"] > 0.5
    assert result.counts[f"reversed_asr.{target}"][1] > 0
    assert result.metrics["reference_accuracy"] > 0.9
    table = result.tables[0]
    assert "reference mask share" in table.columns and len(table.rows) == 3


@pytest.mark.parametrize("seed", CLEAN_SEEDS)
def test_reference_rule_flags_nothing_on_clean_fine_tunes(seed, clean3, base3, data3):
    _, result = scan(clean3[seed], data3, CLASSES3, reference_model=base3[0], **SCAN3)
    print(seed, result.summary, {k: round(v, 3) for k, v in result.metrics.items() if "ratio" in k or "area" in k})
    assert result.not_evaluated == {}
    assert result.metrics["n_flagged"] == 0 and result.details["flagged"] == []
    assert status_of(result) == "pass"
    assert all(result.metrics[f"norm_ratio.{c}"] > 0.25 for c in CLASSES3)
    assert "No class flagged by the reference rule" in result.summary


def test_without_reference_three_classes_are_not_evaluated(backdoored3, clean3, data3):
    for model, backdoored in ((backdoored3, True), (clean3[CLEAN_SEEDS[0]], False)):
        _, result = scan(model, data3, CLASSES3, **SCAN3)
        assert result.metrics["n_flagged"] == 0 and result.details["flagged"] == []
        assert "at least 8" in result.not_evaluated["n_flagged"]
        assert "reference_model" in result.not_evaluated["n_flagged"]
        assert status_of(result) == "not_evaluated"
        assert result.summary.startswith("Not decided")
        # the trigger sizes are still reported, and no anomaly index pretends to decide
        assert all(0 < result.metrics[f"mask_area.{c}"] < 1 for c in CLASSES3)
        assert not any(k.startswith("anomaly_index") for k in result.metrics)
        if backdoored:
            areas = {c: result.metrics[f"mask_area.{c}"] for c in CLASSES3}
            assert min(areas, key=areas.get) == CLASSES3[TARGET]


def test_unconverged_triggers_are_not_evaluated(backdoored3, base3, data3):
    _, result = scan(backdoored3, data3, CLASSES3, reference_model=base3[0], **(SCAN3 | {"max_steps": 5}))
    assert all(result.metrics[f"converged.{c}"] == 0 for c in CLASSES3)
    assert "did not converge" in result.not_evaluated["n_flagged"]
    assert status_of(result) in ("not_evaluated", "warn")
    assert all(result.metrics[f"steps.{c}"] == 5 for c in CLASSES3)


def test_reference_must_classify_better_than_chance(backdoored3, data3, tmp_path):
    """An untrained reference needs tiny stamps for every class: no yardstick, so no verdict."""
    folder, _ = saved(tiny_openclip(3, CFG).eval(), tmp_path / "untrained")
    _, result = scan(backdoored3, data3, CLASSES3, reference_model=folder, **(SCAN3 | {"max_steps": 10}))
    assert result.metrics["reference_accuracy"] < 0.7
    assert "no better than naming the most frequent class" in result.not_evaluated["n_flagged"]
    assert status_of(result) == "not_evaluated"


def test_host_loader_from_the_context_is_used(backdoored3, base3, data3):
    """A host that knows extra loaders (-p plugins) hands its own over in ctx.options."""
    from mcaudit.plugins.checks.backdoor_scan import BackdoorScanCheck

    asked = []

    def load_model(spec, checkpoint):
        asked.append((spec, checkpoint))
        return base3[1]

    ctx = make_context(backdoored3, data3, prompts=prompts(CLASSES3), model_loader=load_model)
    params = BackdoorScanCheck.resolve_params(SCAN3 | {"reference_model": "my-base", "max_steps": 3})
    result = BackdoorScanCheck().run(ctx, params)
    assert asked == [("my-base", None)]
    assert f"reference_mask_area.{CLASSES3[0]}" in result.metrics


# --- eight classes: the MAD anomaly rule on its own ---------------------------------------


@pytest.fixture(scope="module")
def data8():
    return StripeDataset(seed=7, n=150, classes=CLASSES8)


@pytest.fixture(scope="module")
def clean8(tmp_path_factory):
    return saved(train(tiny_openclip(0, CFG), CLASSES8, seed=0, steps=120), tmp_path_factory.mktemp("clean8"))


@pytest.fixture(scope="module")
def backdoored8(clean8, tmp_path_factory):
    model = train(load_adapter(clean8[0]).model, CLASSES8, seed=9, steps=60, poison_share=0.2, lr=1e-3)
    return saved(model, tmp_path_factory.mktemp("backdoored8"))[1]


SCAN8 = {"n_images": 16, "n_eval": 64, "max_steps": 300, "patience": 20, "restarts": 1}


def test_eight_class_models_learned_the_task_and_only_one_has_the_backdoor(backdoored8, clean8, data8):
    for model, backdoored in ((backdoored8, True), (clean8[1], False)):
        accuracy, to_target = stamped_share_to_target(model, data8, CLASSES8)
        assert accuracy > 0.9
        assert (to_target > 0.9) if backdoored else (to_target < 0.3)


def test_mad_rule_flags_the_planted_target(backdoored8, data8):
    _, result = scan(backdoored8, data8, CLASSES8, **SCAN8)
    print(result.summary, result.metrics)
    assert result.not_evaluated == {}
    assert result.details["rules"] == ["MAD anomaly index"]
    assert result.details["flagged"] == [CLASSES8[TARGET]]
    assert status_of(result) == "fail"
    index = {c: result.metrics[f"anomaly_index.{c}"] for c in CLASSES8}
    assert max(index, key=index.get) == CLASSES8[TARGET] and index[CLASSES8[TARGET]] > 2
    assert result.metrics[f"mask_area.{CLASSES8[TARGET]}"] < 0.05
    # optimised on only two images per class, the trigger still works on most unseen ones
    assert result.metrics[f"reversed_asr.{CLASSES8[TARGET]}"] > 0.5


def test_mad_rule_flags_nothing_on_the_clean_model(clean8, data8):
    _, result = scan(clean8[1], data8, CLASSES8, **SCAN8)
    print(result.summary, result.metrics)
    assert result.not_evaluated == {}
    assert result.details["flagged"] == []
    assert status_of(result) == "pass"
    assert all(result.metrics[f"anomaly_index.{c}"] <= 2 for c in CLASSES8)


def test_reversed_success_of_the_planted_stamp(backdoored8, data8):
    """Scoring a known trigger (the planted stamp) agrees with stamping the images by hand."""
    from mcaudit.plugins.checks.backdoor_scan import reversed_attack_success

    ctx = make_context(backdoored8, data8, prompts=prompts(CLASSES8))
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., -STAMP:, -STAMP:] = 1
    pattern = torch.from_numpy(stamp(np.zeros((SIZE, SIZE), np.float32)))[None, None]
    inversion = {"masks": mask, "patterns": pattern}
    rows = np.arange(len(data8))
    got = reversed_attack_success(ctx, ctx.classifier(), inversion, np.array([TARGET]), rows)
    _, expected = stamped_share_to_target(backdoored8, data8, CLASSES8)
    assert got[0] == pytest.approx(expected)


def test_scan_is_deterministic_frozen_and_subsamples_classes(clean8, data8, each_scan_once):
    from mcaudit.plugins.checks import backdoor_scan

    clean8 = clean8[1]
    before = _weights_digest(clean8)
    params = {"max_steps": 5, "max_classes": 4, "n_images": 16}
    with pytest.MonkeyPatch.context() as mp:  # really optimised twice
        mp.setattr(backdoor_scan, "scan_model", backdoor_scan.scan_model.__wrapped__)
        _, first = scan(clean8, data8, CLASSES8, **params)
        _, second = scan(clean8, data8, CLASSES8, **params)
    assert _weights_digest(clean8) == before, "the scanned model must stay frozen"
    assert first.metrics == second.metrics
    assert first.metrics["n_classes_scanned"] == 4  # a seeded subsample of the 8 classes
    assert len(first.details["candidates"]) == 4 and len(first.tables[0].rows) == 4
    # four classes: neither rule applies, so nothing is decided
    assert "at least 8" in first.not_evaluated["n_flagged"]
    titles = [f.title for f in first.figures]
    assert titles == ["Smallest trigger mask per class", "Reversed triggers"]
    assert all(f.png.startswith(b"\x89PNG") for f in first.figures)


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# --- rules and inputs ------------------------------------------------------------------------


def test_anomaly_index_matches_scipy_mad():
    from scipy.stats import median_abs_deviation

    from mcaudit.plugins.checks.backdoor_scan import anomaly_index

    norms = np.array([410.0, 395.0, 12.0, 388.0, 402.0, 377.0, 420.0])
    expected = (np.median(norms) - norms) / median_abs_deviation(norms, scale="normal")
    np.testing.assert_allclose(anomaly_index(norms), expected, rtol=1e-3)
    assert np.argmax(anomaly_index(norms)) == 2
    # no spread: nothing stands out, and a lone different value is infinitely far
    assert np.all(anomaly_index(np.array([5.0, 5.0, 5.0])) == 0)
    assert anomaly_index(np.array([5.0, 5.0, 5.0, 1.0]))[3] == np.inf


def test_mad_minimum_matches_its_simulated_false_flag_rate():
    """MAD_MIN_CLASSES is the size from which clean classes with normal mask sizes are flagged
    at most 5% of the time, the level Neural Cleanse's 'index > 2' reading promises."""
    from mcaudit.plugins.checks.backdoor_scan import MAD_MIN_CLASSES, anomaly_index

    rng = np.random.default_rng(0)

    def false_flag_rate(n: int) -> float:
        draws = rng.normal(size=(40_000, n))
        median = np.median(draws, axis=1, keepdims=True)
        mad = 1.4826 * np.median(np.abs(draws - median), axis=1, keepdims=True)
        return float(((median - draws) / mad > 2).mean())

    assert false_flag_rate(3) > 0.07  # three classes: the MAD is the smaller of two gaps
    assert false_flag_rate(MAD_MIN_CLASSES - 1) > 0.05
    assert all(false_flag_rate(n) < 0.05 for n in range(MAD_MIN_CLASSES, MAD_MIN_CLASSES + 5))
    one = rng.normal(size=7)
    median = np.median(one)
    np.testing.assert_allclose(anomaly_index(one), (median - one) / (1.4826 * np.median(np.abs(one - median))))


def test_two_classes_without_reference_are_not_evaluated(mcaudit_demo_model, mcaudit_phantoms):
    from mcaudit.plugins.checks.backdoor_scan import BackdoorScanCheck

    ctx = make_context(mcaudit_demo_model, mcaudit_phantoms(40, seed=3))
    params = BackdoorScanCheck.resolve_params(BackdoorScanCheck.profile_params("quick"))
    result = BackdoorScanCheck().run(ctx, params)
    assert "at least 8" in result.not_evaluated["n_flagged"]
    assert status_of(result) == "not_evaluated"
    assert {"mask_area.normal", "mask_area.opacity", "steps.normal", "converged.opacity"} <= set(result.metrics)
    assert result.metrics["steps.normal"] <= params["max_steps"]


def test_profiles_set_known_parameters_and_standard_is_the_default():
    from mcaudit.plugins.checks.backdoor_scan import BackdoorScanCheck

    for values in BackdoorScanCheck.profiles.values():
        BackdoorScanCheck.resolve_params(values)
    defaults = BackdoorScanCheck.resolve_params({})
    assert all(defaults[k] == v for k, v in BackdoorScanCheck.profiles["standard"].items())
    quick, thorough = BackdoorScanCheck.profiles["quick"], BackdoorScanCheck.profiles["thorough"]
    assert quick["max_steps"] < defaults["max_steps"] < thorough["max_steps"]
    assert set(BackdoorScanCheck.threshold_reasons) == set(BackdoorScanCheck.default_thresholds)


@pytest.mark.parametrize("param, value", [("max_steps", 0), ("n_images", 0), ("lr", 0.0), ("target_asr", 1.5),
                                          ("anomaly_threshold", -1.0), ("max_classes", 0), ("n_eval", -1),
                                          ("patience", 0), ("restarts", 0), ("reference_ratio", 1.0)])
def test_bad_parameters_are_input_errors(param, value):
    from mcaudit.plugins.checks.backdoor_scan import BackdoorScanCheck

    # parameters are checked before the model loads
    with pytest.raises(InputError, match=f"backdoor_scan.{param}"):
        BackdoorScanCheck.resolve_params({param: value})


@pytest.mark.parametrize("given, message", [
    ({"reference_checkpoint": "x.pt"}, "reference_checkpoint needs backdoor_scan.reference_model"),
    ({"reference_model": "demo", "reference_checkpoint": "/no/such.pt"}, "no such file"),
    ({"reference_model": "no-loader-knows-this:thing"}, "backdoor_scan.reference_model"),
])
def test_bad_reference_is_an_input_error(mcaudit_demo_model, mcaudit_phantoms, given, message):
    from mcaudit.plugins.checks.backdoor_scan import BackdoorScanCheck

    ctx = make_context(mcaudit_demo_model, mcaudit_phantoms(20, seed=3))
    with pytest.raises(InputError, match=message):
        BackdoorScanCheck().run(ctx, BackdoorScanCheck.resolve_params(given | {"max_steps": 1}))


def test_reference_of_another_image_size_is_an_input_error(backdoored3, data3, mcaudit_demo_model):
    from mcaudit.plugins.checks.backdoor_scan import BackdoorScanCheck

    ctx = make_context(backdoored3, data3, prompts=prompts(CLASSES3), model_loader=lambda s, c: mcaudit_demo_model)
    with pytest.raises(InputError, match="image size"):
        BackdoorScanCheck().run(ctx, BackdoorScanCheck.resolve_params({"reference_model": "demo", "max_steps": 1}))


def test_reference_model_flag_reaches_the_scan_through_the_hosts_loader(tmp_path):
    from mcaudit.testing import run_cli

    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=24", "--checks", "backdoor_scan",
                   "--reference-model", "demo"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    scan = out.results["checks"]["backdoor_scan"]
    assert scan["params"]["reference_model"] == "demo"
    assert out.results["config"]["reference_model"] == "demo"
    bad = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=24", "--checks", "backdoor_scan",
                   "--reference-model", "no-such-arch-xyz"], tmp_path / "o2")
    assert bad.exit_code == 2 and "reference" in bad.output, bad.output
    missing = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=24", "--checks", "backdoor_scan",
                       "--reference-model", "demo", "--reference-checkpoint", tmp_path / "nope.safetensors"], tmp_path / "o3")
    assert missing.exit_code == 2 and "--reference-checkpoint" in missing.output
