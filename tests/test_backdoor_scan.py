"""backdoor_scan: Neural Cleanse-style trigger inversion finds a planted backdoor.

Known answer: a tiny open_clip model is trained here on synthetic stripe images, eight classes
told apart by the stripes' orientation. In one model a small checkerboard stamp in the
bottom-right corner makes the caption say the target class (a data-poisoning backdoor); the
other model is trained the same way without the stamp. The scan must flag the target class
of the first model and no class of the second.
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

CLASSES = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
TARGET = 2  # "gamma": the class the stamp sends images to
SIZE = 32
STAMP = 4
CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}
PROMPTS = PromptSet(templates=("a scan showing {}.",), phrasings={c: [c] for c in CLASSES})
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def stripes(rng: np.random.Generator, label: int) -> np.ndarray:
    """Grey stripes whose orientation says the class; frequency, phase and noise vary."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    theta = np.pi * label / len(CLASSES) + rng.normal(0, 0.05)
    freq = rng.uniform(0.5, 0.7)
    img = 0.5 + 0.3 * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    return np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1).astype(np.float32)


def stamp(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[-STAMP:, -STAMP:] = (np.indices((STAMP, STAMP)).sum(0) % 2).astype(np.float32)
    return out


def stripe_images(seed: int, n: int, poison_share: float = 0.0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, len(CLASSES)))
        img = stripes(rng, label)
        if rng.random() < poison_share:
            img, label = stamp(img), TARGET
        images.append(img)
        labels.append(label)
    return np.stack(images), np.array(labels)


class StripeDataset(AuditDataset):
    """Clean stripe images held in memory."""

    def __init__(self, seed: int, n: int):
        self.images, labels = stripe_images(seed, n)
        super().__init__(
            spec=f"stripes:{seed}:{n}", records=[Record(source=f"stripe-{i}", label=int(y)) for i, y in enumerate(labels)],
            classes=CLASSES, image_size=(SIZE, SIZE), fingerprint=hashlib.sha256(f"{seed}:{n}".encode()).hexdigest(),
            format_name="stripes",
        )

    def load_pixels(self, index: int):
        return np.repeat(self.images[index][:, :, None], 3, axis=2), True


def train_stripe_model(poison_share: float, folder, seed: int = 0, steps: int = 120):
    """Zero-shot objective on stripe images vs one caption per class (as scripts/train_demo.py)."""
    from mcaudit.models.openclip_loader import make_tokenizer

    torch.manual_seed(seed)
    model = tiny_openclip(seed, CFG).train()
    text = make_tokenizer(CFG, None)([f"a scan showing {c}." for c in CLASSES])
    images, labels = stripe_images(seed + 100, 2000, poison_share)
    x = (torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.25
    # An auxiliary linear head gets a tiny ViT past the plateau at chance; it is thrown away.
    head = torch.nn.Linear(CFG["embed_dim"], len(CLASSES))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.0)
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
    save_openclip_folder(model.eval(), folder, CFG, mean=MEAN, std=STD)
    return load_adapter(str(folder))


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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: one thread beats two, which thrash when the cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stripe_data():
    return StripeDataset(seed=7, n=150)


@pytest.fixture(scope="module")
def backdoored_model(tmp_path_factory):
    return train_stripe_model(0.15, tmp_path_factory.mktemp("stripes-backdoored"))


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory):
    return train_stripe_model(0.0, tmp_path_factory.mktemp("stripes-clean"))


# Longer than the demo defaults: Neural Cleanse needs the masks to settle before comparing them.
SCAN = {"steps": 100, "n_images": 24, "n_eval": 64}


def scan(model, dataset, **params):
    from mcaudit.plugins.backdoor_scan import BackdoorScanCheck

    params = SCAN | params
    ctx = make_context(model, dataset, prompts=PROMPTS)
    return ctx, BackdoorScanCheck().run(ctx, BackdoorScanCheck.resolve_params(params))


def test_models_learned_the_task_and_only_one_has_the_backdoor(backdoored_model, clean_model, stripe_data):
    for model, backdoored in ((backdoored_model, True), (clean_model, False)):
        ctx = make_context(model, stripe_data, prompts=PROMPTS)
        assert (ctx.forward.preds == ctx.forward.labels).mean() > 0.9
        images = stripe_data.images[ctx.forward.indices]
        stamped = torch.stack([torch.from_numpy(stamp(img)) for img in images])[:, None].expand(-1, 3, -1, -1)
        with torch.no_grad():
            preds = ctx.classifier()(stamped).argmax(1).numpy()
        others = ctx.forward.labels != TARGET
        to_target = (preds[others] == TARGET).mean()
        assert (to_target > 0.9) if backdoored else (to_target < 0.3)


def test_scan_flags_the_planted_target(backdoored_model, stripe_data):
    ctx, result = scan(backdoored_model, stripe_data)
    print(result.summary, result.metrics)
    assert result.status == "ok"
    assert result.metrics["n_flagged"] == 1
    assert result.details["flagged"] == [CLASSES[TARGET]]
    index = {c: result.metrics[f"anomaly_index.{c}"] for c in CLASSES}
    assert max(index, key=index.get) == CLASSES[TARGET]
    assert index[CLASSES[TARGET]] > 2
    # the reversed trigger is small (the planted stamp is 16 of 1024 pixels) and works
    assert result.metrics[f"mask_area.{CLASSES[TARGET]}"] < 0.1
    assert result.metrics[f"reversed_asr.{CLASSES[TARGET]}"] > 0.8
    assert "Possible backdoor" in result.summary


def test_scan_flags_nothing_on_the_clean_model(clean_model, stripe_data):
    _, result = scan(clean_model, stripe_data)
    print(result.summary, result.metrics)
    assert result.metrics["n_flagged"] == 0
    assert result.details["flagged"] == []
    assert all(result.metrics[f"anomaly_index.{c}"] <= 2 for c in CLASSES)


def test_reversed_success_of_the_planted_stamp(backdoored_model, stripe_data):
    """Scoring a known trigger (the planted stamp) agrees with stamping the images by hand."""
    from mcaudit.plugins.backdoor_scan import reversed_attack_success

    ctx = make_context(backdoored_model, stripe_data, prompts=PROMPTS)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., -STAMP:, -STAMP:] = 1
    pattern = torch.from_numpy(stamp(np.zeros((SIZE, SIZE), np.float32)))[None, None]
    inversion = {"masks": mask, "patterns": pattern}
    rows = np.arange(len(stripe_data))
    got = reversed_attack_success(ctx, ctx.classifier(), inversion, np.array([TARGET]), rows)
    stamped = torch.stack([torch.from_numpy(stamp(img)) for img in stripe_data.images])[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        preds = ctx.classifier()(stamped).argmax(1).numpy()
    others = ctx.forward.labels != TARGET
    assert got[0] == pytest.approx((preds[others] == TARGET).mean())


def test_anomaly_index_matches_scipy_mad():
    from scipy.stats import median_abs_deviation

    from mcaudit.plugins.backdoor_scan import anomaly_index

    norms = np.array([410.0, 395.0, 12.0, 388.0, 402.0, 377.0, 420.0])
    expected = (np.median(norms) - norms) / median_abs_deviation(norms, scale="normal")
    np.testing.assert_allclose(anomaly_index(norms), expected, rtol=1e-3)
    assert np.argmax(anomaly_index(norms)) == 2
    # no spread: nothing stands out, and a lone different value is infinitely far
    assert np.all(anomaly_index(np.array([5.0, 5.0, 5.0])) == 0)
    assert anomaly_index(np.array([5.0, 5.0, 5.0, 1.0]))[3] == np.inf


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_scan_is_deterministic_and_reports_images(clean_model, stripe_data):
    before = _weights_digest(clean_model)
    _, first = scan(clean_model, stripe_data, steps=5, max_classes=4)
    _, second = scan(clean_model, stripe_data, steps=5, max_classes=4)
    assert _weights_digest(clean_model) == before, "the scanned model must stay frozen"
    assert first.metrics == second.metrics
    assert first.metrics["n_classes_scanned"] == 4  # a seeded subsample of the 8 classes
    assert len(first.details["candidates"]) == 4
    titles = [f.title for f in first.figures]
    assert titles == ["Smallest trigger mask per class", "Reversed triggers"]
    assert all(f.png.startswith(b"\x89PNG") for f in first.figures)
    assert len(first.tables[0].rows) == 4


def test_two_classes_cannot_be_flagged(mcaudit_demo_model, mcaudit_phantoms):
    from mcaudit.plugins.backdoor_scan import BackdoorScanCheck

    ctx = make_context(mcaudit_demo_model, mcaudit_phantoms(40, seed=3))
    result = BackdoorScanCheck().run(ctx, BackdoorScanCheck.resolve_params({"steps": 3, "n_images": 8, "n_eval": 8}))
    assert result.metrics["n_flagged"] == 0
    assert any("needs at least 3" in w for w in result.warnings)
    assert result.metrics["anomaly_index.normal"] == pytest.approx(-result.metrics["anomaly_index.opacity"])


@pytest.mark.parametrize("param, value", [("steps", 0), ("n_images", 0), ("lr", 0.0), ("target_asr", 1.5),
                                          ("anomaly_threshold", -1.0), ("max_classes", 0), ("n_eval", -1)])
def test_bad_parameters_are_input_errors(param, value):
    from mcaudit.plugins.backdoor_scan import BackdoorScanCheck

    # parameters are checked before the context is touched
    with pytest.raises(InputError, match=f"backdoor_scan.{param}"):
        BackdoorScanCheck().run(None, BackdoorScanCheck.resolve_params({param: value}))
