"""Data formats: manifests, image folders, MedMNIST, DICOM, and the real shared sets."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score

from mcaudit.data.dicom import read_dicom
from mcaudit.plugins.formats.image_sets import load_image_folder, load_manifest, load_medmnist
from mcaudit.data.images import UnreadableImage, read_image
from mcaudit.errors import InputError
from mcaudit.hook_types import DataRequest
from mcaudit.testing import run_cli, save_openclip_folder, tiny_openclip

from conftest import shared


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_openclip_folder(tiny_openclip(0), tmp_path_factory.mktemp("tiny"))


def check_samples_accuracy(out):
    with open(out.out_dir / "samples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    acc = accuracy_score([r["label"] for r in rows], [r["prediction"] for r in rows])
    assert out.results["checks"]["performance"]["metrics"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert len(rows) == out.results["dataset"]["images"]
    return rows


def test_grey_png_becomes_three_channels(tmp_path):
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "g.png")
    arr, grey = read_image(tmp_path / "g.png")
    assert arr.shape == (8, 8, 3) and grey
    assert arr[0, 1, 2] == pytest.approx(1 / 255)
    img16 = np.full((4, 4), 65535, dtype=np.uint16)
    Image.fromarray(img16).save(tmp_path / "w.png")
    arr16, _ = read_image(tmp_path / "w.png")
    assert arr16.max() == pytest.approx(1.0)


def test_unreadable_image_raises(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(UnreadableImage, match="x.jpg"):
        read_image(tmp_path / "x.jpg")


def test_manifest_classes_groups_and_masks(tmp_path):
    for name in ("a.png", "b.png", "m.png"):
        Image.new("L", (10, 10)).save(tmp_path / name)
    (tmp_path / "m.csv").write_text("path,label,sex,mask\na.png,b-class,F,m.png\nb.png,a-class,M,\n")
    ds = load_manifest(tmp_path / "m.csv", DataRequest(image_size=(16, 16), groups=("sex",)))
    assert ds.classes == ["a-class", "b-class"]
    assert [r.label for r in ds.records] == [1, 0]
    assert ds.records[0].groups == {"sex": "F"} and ds.records[0].mask.endswith("m.png")
    item = ds[0]
    assert item["pixels"].shape == (3, 16, 16) and item["grey"]
    assert ds.load_mask(1) is None and ds.load_mask(0).shape == (16, 16)


def test_manifest_boxes_become_regions_where_the_image_lands(tmp_path):
    # A 128 x 64 (w x h) image at model size 64 x 64: no scaling, the centre crop drops 32
    # columns on each side. Box 1 (x 40..56, y 8..32) lands at columns 8..24; box 2 is half
    # outside the crop (x 90..110 -> 58..64 after the crop); box 3 lies wholly cropped away.
    Image.new("L", (128, 64)).save(tmp_path / "wide.png")
    Image.new("L", (64, 64)).save(tmp_path / "plain.png")
    (tmp_path / "m.csv").write_text(
        "path,label,boxes\nwide.png,tb,\"40,8,16,24; 90,40,20,10;0,0,20,20\"\nplain.png,healthy,\n")
    ds = load_manifest(tmp_path / "m.csv", DataRequest(image_size=(64, 64)))
    assert ds.records[0].boxes == ((40.0, 8.0, 16.0, 24.0), (90.0, 40.0, 20.0, 10.0), (0.0, 0.0, 20.0, 20.0))
    assert ds.records[0].has_region and not ds.records[1].has_region
    expected = np.zeros((64, 64), bool)
    expected[8:32, 8:24] = True
    expected[40:50, 58:64] = True
    assert np.array_equal(ds.load_mask(0).numpy(), expected)
    assert ds.load_mask(1) is None


def test_boxes_and_mask_on_one_image_are_united(tmp_path):
    Image.new("L", (20, 20)).save(tmp_path / "a.png")
    mask = np.zeros((20, 20), np.uint8)
    mask[0:5, 0:5] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "m.csv").write_text("path,label,mask,boxes\na.png,x,m.png,\"10,10,5,5\"\n")
    region = load_manifest(tmp_path / "m.csv", DataRequest(image_size=(20, 20))).load_mask(0).numpy()
    assert region.sum() == 50 and region[0:5, 0:5].all() and region[10:15, 10:15].all()


@pytest.mark.parametrize("boxes, complaint", [
    ("10,10,5", "expected x,y,width,height"),
    ("a,b,c,d", "expected x,y,width,height"),
    ("10,10,0,5", "positive width and height"),
    ("10,10,nan,5", "finite position"),
])
def test_bad_boxes_name_the_line(tmp_path, boxes, complaint):
    Image.new("L", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text(f'path,label,boxes\na.png,x,\na.png,x,"{boxes}"\n')
    out = run_cli(["run", "--model", "demo", "--data", tmp_path / "m.csv", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "m.csv line 3" in out.output and complaint in out.output
    assert not (tmp_path / "o").exists()


def test_unquoted_commas_are_a_one_line_error(tmp_path):
    Image.new("L", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label,boxes\na.png,x,10,10,5,5\n")
    out = run_cli(["run", "--model", "demo", "--data", tmp_path / "m.csv", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "m.csv line 2: 6 fields for 3 columns" in out.output


def test_image_folder(tmp_path):
    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (12, 10), (i * 100, 0, 0)).save(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "benign" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, DataRequest(image_size=(8, 8)))
    assert ds.classes == ["benign", "malignant"]
    assert [r.source for r in ds.records] == ["benign/0.jpg", "benign/1.jpg", "malignant/0.jpg", "malignant/1.jpg"]


def test_medmnist_split_choice_and_errors(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.array([[0], [1], [1]]),
             test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([[1], [0]]))
    ds = load_medmnist(tmp_path / "pneumoniamnist.npz", DataRequest(image_size=(32, 32), split="train"))
    assert len(ds) == 3 and ds.classes == ["normal", "pneumonia"]
    with pytest.raises(InputError, match="no split 'val'"):
        load_medmnist(tmp_path / "pneumoniamnist.npz", DataRequest(split="val"))


def _write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None, frames=1):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames > 1:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    raw = np.array([[0, 1000], [2000, 3000]], dtype=np.uint16)
    _write_dicom(tmp_path / "plain.dcm", raw, slope=1.0, intercept=-1024.0)
    out = read_dicom(tmp_path / "plain.dcm")
    assert out.ravel().tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # window centre 976 HU (raw 2000), width 1000 HU: raw 1000 -> below the window, raw 3000 -> above
    _write_dicom(tmp_path / "win.dcm", raw, intercept=-1024.0, window=(976, 1001))
    win = read_dicom(tmp_path / "win.dcm")
    assert win[0, 1] == 0.0 and win[1, 1] == 1.0 and win[1, 0] == pytest.approx(0.5, abs=1e-3)
    _write_dicom(tmp_path / "inv.dcm", raw, photometric="MONOCHROME1")
    inv = read_dicom(tmp_path / "inv.dcm")
    assert inv[0, 0] == 1.0 and inv[1, 1] == 0.0


def test_dicom_multiframe_refused_unless_a_frame_is_chosen(tmp_path):
    frames = np.stack([np.full((4, 4), v, np.uint16) for v in (0, 10, 20)])
    frames[1, 0, 0] = 0
    _write_dicom(tmp_path / "multi.dcm", frames, frames=3)
    with pytest.raises(UnreadableImage, match="multi-frame DICOM .3 frames."):
        read_dicom(tmp_path / "multi.dcm")
    mid = read_dicom(tmp_path / "multi.dcm", frame="middle")
    assert mid[0, 0] == 0.0 and mid[1, 1] == 1.0


def test_oasis_manifest_end_to_end(tmp_path, tiny_folder):
    manifest = shared("oasis1/manifest.csv")
    out = run_cli(["run", "--quiet", "--model", str(tiny_folder), "--data", str(manifest), "--group", "sex",
                   "--checks", "performance", "--batch-size", "128"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    rows = check_samples_accuracy(out)
    assert out.results["dataset"]["images"] == 588
    assert set(out.results["dataset"]["classes"]) == {"dementia", "no dementia"}
    assert {r["sex"] for r in rows} == {"F", "M"}
    assert out.results["dataset"]["grey"] is True


def test_pneumoniamnist_end_to_end(tmp_path, tiny_folder):
    npz = shared("pneumoniamnist/pneumoniamnist.npz")
    out = run_cli(["run", "--quiet", "--model", str(tiny_folder), "--data", str(npz), "--split", "test",
                   "--checks", "performance", "--batch-size", "256"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    rows = check_samples_accuracy(out)
    assert len(rows) == 624
    assert sum(r["label"] == "pneumonia" for r in rows) == 390


def test_dicom_files_end_to_end(tmp_path, tiny_folder):
    folder = shared("dicom")
    files = {"CT_small.dcm": "CT", "MR_small.dcm": "MR", "MR2_UNCR.dcm": "MR", "emri_small.dcm": "MR", "US1_UNCR.dcm": "US"}
    manifest = tmp_path / "dicom.csv"
    with open(manifest, "w") as fh:
        fh.write("path,label\n")
        for name, label in files.items():
            fh.write(f"{folder / name},{label}\n")
    out = run_cli(["run", "--quiet", "--model", str(tiny_folder), "--data", str(manifest), "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    # the multi-frame file is refused with its reason; the others are scored
    d = out.results["dataset"]
    assert d["skipped"] == 1 and "multi-frame" in d["skipped_images"][0]["error"]
    check_samples_accuracy(out)
    chosen = run_cli(["run", "--quiet", "--model", str(tiny_folder), "--data", str(manifest), "--checks", "performance",
                      "--data-option", "dicom_frame=middle"], tmp_path / "o2")
    assert chosen.results["dataset"]["skipped"] == 0 and chosen.results["dataset"]["images"] == 5
