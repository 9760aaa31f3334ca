"""The shift check (acquisition shift): corruptions against their references, known answers on
trained tiny models, and the check on real data in ../shared/data."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest
import torch

from conftest import PNEUMONIA_PROMPTS, shared, train_pneumonia_clip
from mcaudit.plugins.checks.shift import ShiftCheck, photometric, spatial
from mcaudit.plugins.checks.shift.evaluate import Plan
from mcaudit.testing import run_cli

PLUGIN = ["-p", "mcaudit.plugins.checks.shift"]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _phantom_224(channels: int = 1) -> np.ndarray:
    """A smooth test image with edges, 224 x 224, uint8."""
    yy, xx = np.mgrid[:224, :224] / 224.0
    img = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.15 * ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.05)
    if channels == 3:
        img = np.stack([img, 0.8 * img + 0.1 * xx, 0.6 * img + 0.3 * yy], axis=-1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _ours(fn, img: np.ndarray, strength, rng=None) -> np.ndarray:
    grey = img.ndim == 2
    x = torch.from_numpy(img.astype(np.float32) / 255)
    x = x[None, None].expand(1, 3, -1, -1) if grey else x.permute(2, 0, 1)[None]
    y = fn(x.contiguous(), strength, [rng or np.random.default_rng(0)], [grey])[0]
    y = y[0] if grey else y.permute(1, 2, 0)
    return y.numpy() * 255


def _stub_wand(monkeypatch):
    import sys
    import types

    image, api = types.ModuleType("wand.image"), types.ModuleType("wand.api")
    image.Image, api.library = object, None
    for name, module in (("wand", types.ModuleType("wand")), ("wand.image", image), ("wand.api", api)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "medmnistc.corruptions.filter", raising=False)


# (medmnistc module, class, severity parameter, our function, channels)
REFERENCES = [
    ("noise", "GaussianNoise", 0.12, photometric.gaussian_noise, 1),
    ("noise", "SpeckleNoise", 0.2, photometric.speckle_noise, 1),
    ("noise", "ShotNoise", 25, photometric.shot_noise, 1),
    ("enhance", "Brightness", 0.7, photometric.brightness, 3),
    ("enhance", "Contrast", 0.6, photometric.contrast, 1),
    ("enhance", "GammaCorrection", 1.4, photometric.gamma, 1),
    ("enhance", "Saturate", 0.15, photometric.saturate, 3),
    ("compression", "Pixelate", 0.3, spatial.pixelate, 1),
    ("compression", "JPEGCompression", 15, spatial.jpeg, 1),
    ("filter", "GaussianBlur", 7, spatial.gaussian_blur, 1),
    ("filter", "DefocusBlur", (5, 0.2), spatial.defocus_blur, 3),
]


@pytest.mark.parametrize("module,name,strength,fn,channels", REFERENCES, ids=[r[1] for r in REFERENCES])
def test_corruption_matches_medmnistc(module, name, strength, fn, channels, monkeypatch):
    if not _has("medmnistc"):
        pytest.skip("medmnistc is not installed (pip install medmnistc)")
    if module == "filter" and not _has("wand"):
        _stub_wand(monkeypatch)  # filter.py imports Wand (ImageMagick) for motion blur only; Gaussian and defocus blur do not use it
    try:
        ref_module = __import__(f"medmnistc.corruptions.{module}", fromlist=[name])
    except ImportError as exc:  # its own dependencies (OpenCV, scikit-image, Wand) are missing
        pytest.skip(f"medmnistc.corruptions.{module} cannot be imported: {exc}")
    from PIL import Image

    img = _phantom_224(channels)
    np.random.seed(0)
    reference = np.asarray(getattr(ref_module, name)([strength]).apply(Image.fromarray(img), 0), dtype=np.float64)
    ours = _ours(fn, img, strength, np.random.RandomState(0))  # the same draws as MedMNIST-C's np.random
    if reference.ndim == 3 and ours.ndim == 2:
        reference = reference[..., 0]
    # MedMNIST-C truncates to 8 bits (and Pillow resamples in fixed point); we keep floats
    diff = np.abs(np.floor(ours + 1e-3) - reference)
    assert diff.mean() < 1.0 and np.quantile(diff, 0.99) <= 3, (diff.mean(), diff.max())


def test_gibbs_matches_monai():
    monai = pytest.importorskip("monai.transforms")
    from mcaudit.plugins.checks.shift import mri

    img = _phantom_224().astype(np.float32) / 255
    reference = monai.GibbsNoise(alpha=0.6)(torch.from_numpy(img)[None]).numpy()[0]
    ours = mri.gibbs(torch.from_numpy(img)[None, None].expand(1, 3, -1, -1), 0.6)[0, 0].numpy()
    assert np.abs(ours - np.clip(reference, 0, 1)).max() < 1e-4


def test_torchio_artefacts_are_torchio_with_the_same_parameters():
    tio = pytest.importorskip("torchio")
    from mcaudit.plugins.checks.shift import mri

    img = _phantom_224().astype(np.float32) / 255
    x = torch.from_numpy(img)[None, None].expand(1, 3, -1, -1)
    coefficients = mri.bias_coefficients(np.random.default_rng(3), 0.3)
    direct = tio.BiasField(coefficients=coefficients, order=3)(tio.ScalarImage(tensor=torch.from_numpy(img)[None, :, :, None],
                                                                               affine=np.eye(4))).data[0, :, :, 0]
    ours = mri.bias_field(x, 0.3, [np.random.default_rng(3)], [True])
    assert torch.allclose(ours[0, 0], direct.clamp(0, 1), atol=1e-5)
    assert torch.equal(ours[0, 0], ours[0, 2])  # a grey slice stays grey


def test_stain_conversion_matches_scikit_image():
    color = pytest.importorskip("skimage.color")
    from mcaudit.plugins.checks.shift import overlays

    img = _phantom_224(3).astype(np.float64) / 255
    ours = overlays.rgb_to_hed(torch.from_numpy(img).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - color.rgb2hed(img)).max() < 1e-4
    back = overlays.hed_to_rgb(torch.from_numpy(color.rgb2hed(img)).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0)
    assert np.abs(back.numpy() - color.hed2rgb(color.rgb2hed(img))).max() < 1e-4


# -- known answers on trained tiny models ------------------------------------------------------

ARTEFACT = 10  # grey levels of the fine checkerboard a scanner would leave on one class's images


def _npz_32(src, dst, artefact: int) -> None:
    """PneumoniaMNIST at 32 x 32 (the tiny model's size, so no resize touches the artefact),
    with a faint one-pixel checkerboard on every pneumonia image when ``artefact``."""
    data = np.load(src)
    out = {}
    checker = (np.indices((32, 32)).sum(axis=0) % 2 * 2 - 1) * artefact
    for split in ("train", "test"):
        x = torch.as_tensor(data[f"{split}_images"], dtype=torch.float32)[:, None]
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
        labels = data[f"{split}_labels"].reshape(-1)
        x[labels == 1] += checker
        out[f"{split}_images"] = np.clip(np.round(x), 0, 255).astype(np.uint8)
        out[f"{split}_labels"] = data[f"{split}_labels"]
    np.savez(dst, **out)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(data with the artefact, shortcut model folder, twin model folder): the shortcut model is
    trained on the data with the artefact, its twin on the same images without it."""
    from mcaudit.testing import save_openclip_folder

    src = shared("pneumoniamnist/pneumoniamnist.npz")
    root = tmp_path_factory.mktemp("shift")
    marked, clean = root / "pneumoniamnist_marked.npz", root / "pneumoniamnist_clean.npz"
    _npz_32(src, marked, ARTEFACT)
    _npz_32(src, clean, 0)
    folders = []
    for name, npz in (("shortcut", marked), ("twin", clean)):
        folder = save_openclip_folder(train_pneumonia_clip(npz, steps=120, balanced=True), root / name,
                                      mean=(0.5,) * 3, std=(0.25,) * 3)
        (folder / "prompts.toml").write_text(PNEUMONIA_PROMPTS)
        folders.append(folder)
    return marked, folders[0], folders[1]


def _context(folder, npz):
    from mcaudit.hook_types import DataRequest
    from mcaudit.plugins.formats.image_sets import load_medmnist
    from mcaudit.prompts import load_prompts
    from mcaudit.testing import load_adapter, make_context

    model = load_adapter(str(folder))
    dataset = load_medmnist(npz, DataRequest(image_size=model.image_size, split="test"))
    return make_context(model, dataset, prompts=load_prompts(folder / "prompts.toml"))


def _run(ctx, **params):
    return ShiftCheck().run(ctx, ShiftCheck.resolve_params({"n_images": 0, "examples": False} | params))


@pytest.mark.slow
def test_severity_zero_is_clean_and_noise_lowers_accuracy_monotonically(twins):
    marked, _, twin = twins
    ctx = _context(twin, marked)
    result = _run(ctx, modality="radiography", corruptions=["gaussian_noise"], severities=[0, 1, 2, 3, 4, 5], n_images=300)
    m = result.metrics
    assert m["accuracy.gaussian_noise.s0"] == m["clean_accuracy"]
    assert m["balanced_accuracy.gaussian_noise.s0"] == m["clean_balanced_accuracy"]
    curve = [m[f"accuracy.gaussian_noise.s{s}"] for s in range(6)]
    assert all(a >= b for a, b in zip(curve, curve[1:])), curve
    assert curve[5] < curve[0] - 0.05, curve


@pytest.mark.slow
def test_a_shortcut_model_collapses_where_the_corruption_erases_its_artefact(twins):
    marked, shortcut, twin = twins
    corruptions = ["gaussian_blur", "pixelate", "jpeg", "contrast_down"]
    results = {name: _run(_context(folder, marked), modality="radiography", corruptions=corruptions,
                          severities=[1, 3, 5], n_images=240) for name, folder in (("shortcut", shortcut), ("twin", twin))}
    worst = results["shortcut"].details["worst_corruption"]
    assert worst in ("gaussian_blur", "pixelate", "jpeg")
    assert worst in results["shortcut"].summary
    s, t = results["shortcut"].metrics, results["twin"].metrics
    assert s["clean_accuracy"] > 0.9
    assert s[f"accuracy_drop.{worst}"] > 0.25, s
    assert t[f"accuracy_drop.{worst}"] < min(0.15, s[f"accuracy_drop.{worst}"] / 2), (s, t)
    assert s["accuracy_drop.contrast_down"] < s[f"accuracy_drop.{worst}"] - 0.2


# -- torchrun: two gloo processes split the images -----------------------------------------------

@pytest.mark.slow
def test_torchrun_two_processes_give_the_metrics_of_one(tmp_path):
    """Each process corrupts and scores its share of the rows (per-image generators, so the
    draws do not depend on the shard); the gathered results give one process's numbers."""
    from mcaudit.testing import run_torchrun

    args = ["--quiet", "--model", "demo", "--data", "phantom:n=40", "--checks", "shift", "--threads", "1",
            "--profile", "quick", "--reference-model", "demo", "--set", "shift.n_images=15",
            "--set", "shift.severities=1,5", "--set", "shift.corruptions=gaussian_noise,jpeg,pixelate"]
    single = run_cli(["run", *args], tmp_path / "single")
    assert single.exit_code in (0, 1), single.output
    one = single.results["checks"]["shift"]
    two = run_torchrun(args, tmp_path / "multi")["checks"]["shift"]
    assert one["execution"] == two["execution"] == "completed", (one["summary"], two["summary"])
    assert one["status"] == two["status"] and one["status_reason"] == two["status_reason"]
    assert two["details"]["rows"] == one["details"]["rows"] and len(one["details"]["rows"]) == 15
    assert "mce" in one["metrics"] and "accuracy_drop.jpeg" in one["intervals"]
    for part in ("metrics", "intervals", "counts"):
        assert set(two[part]) == set(one[part]), part
        for key, value in one[part].items():
            assert two[part][key] == pytest.approx(value, rel=1e-6, abs=1e-6, nan_ok=True), (part, key)
    assert [f["title"] for f in two["figures"]] == [f["title"] for f in one["figures"]]
