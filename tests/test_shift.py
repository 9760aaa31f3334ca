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
