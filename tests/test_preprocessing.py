"""The pixels a model sees in an audit are those of its own preprocessing.

Real images of sizes other than the model's (OASIS-1 slices, HAM10000 dermoscopy, chest
X-ray PNGs and JPG, DICOMs) go through mcaudit's data path and are compared, after the
model's normalisation, with what open_clip's ``create_model_and_transforms`` preprocess and
transformers' image processor give for the same files, and the audit's image features
with the model's own ``encode_image`` of those. The tiny models have ViT-B-32's input
geometry (224 px, 32 px patches), so nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared

from mcaudit.data.dataset import AuditDataset, to_model_size
from mcaudit.data.dicom import read_dicom
from mcaudit.plugins.formats.image_sets import load_manifest
from mcaudit.forward import run_forward
from mcaudit.models.adapter import ModelAdapter, ZeroShotClassifier
from mcaudit.models.preprocessing import ModelPreprocessing, open_clip_preprocessing
from mcaudit.hook_types import DataRequest
from mcaudit.testing import load_adapter, make_context, save_openclip_folder, tiny_openclip

SIZE = 224
VIT_B_32_GEOMETRY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
TOLERANCE = 1e-5  # after normalisation, as the model receives it
DICOMS = ("cxr_samples/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",  # CR, JPEG baseline
          "dicom/MR2_UNCR.dcm",  # 16-bit, 1024 x 1024
          "dicom/CT_small.dcm")  # int16 CT, 128 x 128: smaller than the model, so enlarged


# -- the real images ---------------------------------------------------------------------------
def oasis_slices(n_per_view=(6, 5, 5)) -> list[Path]:
    """16 OASIS-1 slices over the three views (176x208, 176x176, 208x176)."""
    manifest = shared("oasis1/manifest.csv")
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for view, n in zip(("axial", "coronal", "sagittal"), n_per_view):
        out += [manifest.parent / r["path"] for r in rows if r["view"] == view][:n]
    return out


def ham_images(n=4) -> list[Path]:
    manifest = shared("ham10000/manifest.csv")
    with open(manifest, newline="") as fh:
        return [manifest.parent / r["path"] for r in list(csv.DictReader(fh))[:n]]


def cxr_images() -> list[Path]:
    folder = shared("cxr_samples")
    return sorted(folder.glob("*.png")) + sorted(folder.glob("tbx11k/imgs/*/*.png")) + sorted(folder.glob("*.jpg"))


def dicom_files() -> list[Path]:
    pytest.importorskip("pydicom")
    return [shared(p) for p in DICOMS]


@pytest.fixture(scope="module")
def real_images() -> list[Path]:
    images = oasis_slices() + ham_images() + cxr_images()
    sizes = {Image.open(p).size for p in images}
    assert (SIZE, SIZE) not in sizes, "a real image at the model's size would not test the resize"
    return images


def as_users_open(path: Path):
    """The PIL image a model's users hand to its preprocessing.

    Files PIL reads are opened as they are. A DICOM has no PIL reading: its users take the
    displayed image (modality LUT and window, as mcaudit's reader gives it) as 8 bits, the
    depth the model's RGB preprocessing works in.
    """
    if path.suffix.lower() != ".dcm":
        return Image.open(path)
    display = read_dicom(path)
    return Image.fromarray(np.clip(np.rint(display * 255.0), 0, 255).astype(np.uint8))


def manifest_of(paths: list[Path], folder: Path) -> Path:
    manifest = folder / "images.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for i, path in enumerate(paths):
            writer.writerow([str(path), "a" if i % 2 else "b"])
    return manifest


def audit_pixels(adapter: ModelAdapter, manifest: Path) -> tuple[AuditDataset, torch.Tensor]:
    """The dataset as the audit opens it and the pixels the forward pass gives the model."""
    dataset = load_manifest(manifest, DataRequest(image_size=adapter.image_size))
    dataset.use_preprocessing(adapter.pixel_transform)
    items = [dataset[i] for i in range(len(dataset))]
    assert all(it["error"] is None for it in items), [it["error"] for it in items]
    return dataset, torch.stack([it["pixels"] for it in items])


# -- open_clip -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_clip_pair(tmp_path_factory):
    """(mcaudit's adapter, open_clip's model, open_clip's eval preprocess) for one folder."""
    open_clip = pytest.importorskip("open_clip")
    folder = save_openclip_folder(tiny_openclip(0, VIT_B_32_GEOMETRY), tmp_path_factory.mktemp("vit-b-32-tiny"),
                                  cfg=VIT_B_32_GEOMETRY, mean=MEAN, std=STD)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return load_adapter(str(folder)), model.eval(), preprocess


def test_open_clip_pixels_equal_its_preprocess_on_real_images(open_clip_pair, real_images, tmp_path):
    adapter, _, preprocess = open_clip_pair
    images = real_images + dicom_files()
    _, pixels = audit_pixels(adapter, manifest_of(images, tmp_path))
    assert pixels.shape == (len(images), 3, SIZE, SIZE) and 0 <= pixels.min() and pixels.max() <= 1
    theirs = torch.stack([preprocess(as_users_open(p)) for p in images])
    gap = (adapter.normalize_pixels(pixels) - theirs).abs().amax(dim=(1, 2, 3))
    assert gap.max() <= TOLERANCE, dict(zip((p.name for p in images), gap.tolist()))


def test_the_float_resize_is_what_this_replaces(open_clip_pair, tmp_path):
    # Without this the equality above could hold for a trivial reason (no resize at all).
    adapter, _, preprocess = open_clip_pair
    slices = oasis_slices()
    dataset, _ = audit_pixels(adapter, manifest_of(slices, tmp_path))
    old = torch.stack([to_model_size(dataset.load_pixels(i)[0], adapter.image_size) for i in range(len(slices))])
    theirs = torch.stack([preprocess(Image.open(p)) for p in slices])
    assert (adapter.normalize_pixels(old) - theirs).abs().max() > 0.05


def test_open_clip_features_equal_its_own_encode_image(open_clip_pair, real_images, tmp_path):
    adapter, model, preprocess = open_clip_pair
    images = oasis_slices() + ham_images(2) + cxr_images()[:2] + dicom_files()[:1]
    dataset = load_manifest(manifest_of(images, tmp_path), DataRequest(image_size=adapter.image_size))
    ctx = make_context(adapter, dataset, batch_size=8)
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(as_users_open(p)) for p in images])), dim=-1)
    assert ctx.forward.indices.tolist() == list(range(len(images)))
    torch.testing.assert_close(ctx.forward.image_features, theirs, atol=TOLERANCE, rtol=0)
    # Checks that perturb images get the same pixels: [0, 1] at the model's size, same logits.
    pixels = ctx.load_pixels(np.arange(len(images)))
    assert pixels.shape == (len(images), 3, SIZE, SIZE) and 0 <= pixels.min() and pixels.max() <= 1
    with torch.no_grad():
        logits = ZeroShotClassifier(adapter, ctx.class_features)(pixels)
    torch.testing.assert_close(logits, ctx.forward.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preprocess_cfg", [
    {"resize_mode": "squash", "interpolation": "bilinear"},
    {"resize_mode": "longest", "fill_color": 0},
])
def test_the_folder_preprocess_cfg_is_followed(preprocess_cfg, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    folder = save_openclip_folder(tiny_openclip(1, VIT_B_32_GEOMETRY), tmp_path / "model", cfg=VIT_B_32_GEOMETRY, mean=MEAN, std=STD)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"].update(preprocess_cfg)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    adapter = load_adapter(str(folder))
    images = oasis_slices((2, 1, 1)) + ham_images(2)
    _, pixels = audit_pixels(adapter, manifest_of(images, tmp_path))
    theirs = torch.stack([preprocess(Image.open(p)) for p in images])
    assert (adapter.normalize_pixels(pixels) - theirs).abs().max() <= TOLERANCE


# -- transformers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from test_hf_clip import tiny_clip_config, write_clip_bpe

    folder = tmp_path_factory.mktemp("hf") / "clip-b-32-tiny"
    vocab_size = write_clip_bpe(folder)
    config = tiny_clip_config(vocab_size)
    config.vision_config.image_size, config.vision_config.patch_size = SIZE, 32
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    # shortest edge 256 then a 224 crop, PubMedCLIP-like: resize and crop both matter
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": SIZE, "width": SIZE},
                                             image_mean=list(MEAN), image_std=list(STD))
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def load_hf(folder: Path) -> ModelAdapter:
    from mcaudit.plugin_manager import make_plugin_manager
    from mcaudit.hook_types import ModelRequest

    manager = make_plugin_manager(load=["mcaudit.plugins.loaders.hf_clip"], autoload=False)
    return manager.hook.mcaudit_load_model(spec=str(folder), request=ModelRequest()).eval()


def test_transformers_pixels_and_features_equal_its_processor_and_model(hf_folder, real_images, tmp_path):
    transformers = pytest.importorskip("transformers")
    adapter = load_hf(hf_folder)
    images = real_images + dicom_files()
    _, pixels = audit_pixels(adapter, manifest_of(images, tmp_path))
    processor = transformers.CLIPProcessor.from_pretrained(str(hf_folder)).image_processor
    theirs = processor(images=[as_users_open(p) for p in images], return_tensors="pt")["pixel_values"]
    assert pixels.shape == theirs.shape == (len(images), 3, SIZE, SIZE)
    gap = (adapter.normalize_pixels(pixels) - theirs).abs().amax(dim=(1, 2, 3))
    assert gap.max() <= TOLERANCE, dict(zip((p.name for p in images), gap.tolist()))

    model = transformers.CLIPModel.from_pretrained(str(hf_folder)).eval()
    few = oasis_slices((3, 2, 2)) + ham_images(2)
    (tmp_path / "few").mkdir()
    dataset = load_manifest(manifest_of(few, tmp_path / "few"), DataRequest(image_size=adapter.image_size))
    class_features = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    forward = run_forward(adapter, dataset, class_features, batch_size=4)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=processor(images=[Image.open(p) for p in few], return_tensors="pt")["pixel_values"])
    feats = out if torch.is_tensor(out) else out.pooler_output
    torch.testing.assert_close(forward.image_features, torch.nn.functional.normalize(feats, dim=-1), atol=TOLERANCE, rtol=0)


def test_transformers_folder_without_processor_uses_openai_preprocessing(hf_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in hf_folder.iterdir():
        if path.name not in ("preprocessor_config.json", "processor_config.json"):
            (bare / path.name).write_bytes(path.read_bytes())
    adapter = load_hf(bare)
    images = ham_images(2) + oasis_slices((1, 0, 1))
    _, pixels = audit_pixels(adapter, manifest_of(images, tmp_path))
    openai = transformers.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    theirs = openai(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    assert (adapter.normalize_pixels(pixels) - theirs).abs().max() <= TOLERANCE


# -- regions, loader plugins, workers ------------------------------------------------------------
def test_a_box_lands_where_the_model_crop_puts_it(open_clip_pair, tmp_path):
    # OASIS axial, 176 wide x 208 high: the shorter side goes to 224, the height to
    # int(208 * 224 / 176) = 264, and the crop drops 20 rows at the top.
    adapter, _, _ = open_clip_pair
    path = oasis_slices((1, 0, 0))[0]
    assert Image.open(path).size == (176, 208)
    (tmp_path / "m.csv").write_text(f"path,label,boxes\n{path},a,\"44,66,88,55\"\n")
    dataset = load_manifest(tmp_path / "m.csv", DataRequest(image_size=adapter.image_size))
    dataset.use_preprocessing(adapter.pixel_transform)
    rows, cols = np.nonzero(dataset.load_mask(0).numpy())
    scale = SIZE / 176
    assert abs(cols.min() - 44 * scale) <= 1 and abs(cols.max() + 1 - (44 + 88) * scale) <= 1
    assert abs(rows.min() - (66 * scale - 20)) <= 1 and abs(rows.max() + 1 - ((66 + 55) * scale - 20)) <= 1


def test_ham_masks_follow_the_image_through_the_model_preprocessing(open_clip_pair, tmp_path):
    adapter, _, preprocess = open_clip_pair
    manifest = shared("ham10000/manifest.csv")
    with open(manifest, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["mask"]][:2]
    dataset = load_manifest(manifest, DataRequest(image_size=adapter.image_size))
    dataset.use_preprocessing(adapter.pixel_transform)
    for row in rows:
        index = next(i for i, r in enumerate(dataset.records) if r.source.endswith(Path(row["path"]).name))
        region = dataset.load_mask(index).numpy()
        lesion = preprocess(Image.open(manifest.parent / row["mask"]).convert("L")).numpy()[0] > 0  # normalised 0 -> below 0
        assert region.shape == (SIZE, SIZE) and region.any()
        assert (region != lesion).mean() < 0.01  # only boundary pixels differ (half-covered ones)


class _PluginAdapter(ModelAdapter):
    """A loader plugin's adapter: features are the mean normalised pixel per channel."""

    def __init__(self, **kwargs):
        super().__init__(spec="plugin", image_size=(SIZE, SIZE), mean=MEAN, std=STD, **kwargs)

    def _encode_normalized_image(self, images):
        return images.mean(dim=(2, 3))

    def _encode_prompts(self, prompts):
        return torch.eye(3)[: len(prompts)]

    @property
    def logit_scale(self):
        return 1.0


def test_a_loader_plugin_gives_its_own_normalising_preprocess(tmp_path):
    from torchvision import transforms

    own = transforms.Compose([transforms.Resize(SIZE, interpolation=transforms.InterpolationMode.BILINEAR),
                              transforms.CenterCrop(SIZE), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    adapter = _PluginAdapter(pixel_transform=ModelPreprocessing(own, (SIZE, SIZE), mean=MEAN, std=STD))
    images = ham_images(2) + oasis_slices((1, 1, 0))
    dataset = load_manifest(manifest_of(images, tmp_path), DataRequest(image_size=adapter.image_size))
    dataset.use_preprocessing(adapter.pixel_transform)
    pixels = torch.stack([dataset[i]["pixels"] for i in range(len(images))])
    theirs = torch.stack([own(Image.open(p).convert("RGB")) for p in images])  # as its users call it
    assert (adapter.normalize_pixels(pixels) - theirs).abs().max() <= TOLERANCE


def test_a_loader_without_a_transform_keeps_the_float_resize(tmp_path):
    adapter = _PluginAdapter()
    assert adapter.pixel_transform is None
    images = oasis_slices((1, 1, 1))
    dataset = load_manifest(manifest_of(images, tmp_path), DataRequest(image_size=adapter.image_size))
    run_forward(adapter, dataset, torch.eye(2, 3))
    for i in range(len(images)):
        torch.testing.assert_close(dataset[i]["pixels"], to_model_size(dataset.load_pixels(i)[0], (SIZE, SIZE)), atol=0, rtol=0)


def test_the_forward_pass_hands_each_model_its_own_preprocessing(open_clip_pair, tmp_path):
    # One dataset audited with two models in turn: the second must not keep the first's pipeline.
    adapter, _, _ = open_clip_pair
    dataset = load_manifest(manifest_of(oasis_slices((1, 0, 0)), tmp_path), DataRequest(image_size=adapter.image_size))
    run_forward(adapter, dataset, torch.nn.functional.normalize(torch.randn(2, 16), dim=-1))
    assert dataset.pixel_transform is adapter.pixel_transform
    run_forward(_PluginAdapter(), dataset, torch.eye(2, 3))
    assert dataset.pixel_transform is None


def test_preprocessing_survives_the_trip_to_a_data_loader_worker(open_clip_pair, hf_folder):
    # Workers started by spawn or forkserver receive the dataset pickled, transform included.
    image = np.asarray(Image.open(ham_images(1)[0]).convert("RGB"), dtype=np.float32) / 255
    for transform in (open_clip_pair[0].pixel_transform, load_hf(hf_folder).pixel_transform):
        copy = pickle.loads(pickle.dumps(transform))
        torch.testing.assert_close(copy(image), transform(image), atol=0, rtol=0)


def test_synthetic_float_images_at_the_model_size_are_only_rounded_to_8_bits():
    transform = open_clip_preprocessing((32, 32), {})
    image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    out = transform(image).permute(1, 2, 0).numpy()
    assert np.abs(out - image).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_allclose(out * 255, np.rint(image * 255), atol=1e-4)


def test_a_pipeline_of_the_wrong_size_is_refused():
    from torchvision import transforms

    wrong = ModelPreprocessing(transforms.Compose([transforms.Resize((20, 20)), transforms.Grayscale(), transforms.ToTensor()]), (SIZE, SIZE))
    with pytest.raises(ValueError, match=r"gave pixels of shape \(1, 20, 20\); the model takes \(3, 224, 224\)"):
        wrong(np.zeros((30, 40, 3), dtype=np.float32))

