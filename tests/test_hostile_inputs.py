"""Hostile and broken inputs: each is skipped and counted, warned about, or a one-line usage
error (exit 2) naming the file, row or option; never an internal error (exit 3)."""

from __future__ import annotations

import csv
import io
import json
import struct
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image
from test_bad_input import assert_usage_error

from mcaudit.data.images import MAX_IMAGE_PIXELS, UnreadableImage, read_image
from mcaudit.testing import run_cli, save_openclip_folder, tiny_openclip


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_openclip_folder(tiny_openclip(0), tmp_path_factory.mktemp("tiny"))


def declared_png(path, width: int, height: int) -> None:
    """A PNG whose header declares width x height grey pixels but holds one row of data:
    a few hundred bytes, never decoded in full (the way a decompression bomb arrives)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(bytes(width + 1))) + chunk(b"IEND", b""))


def write_manifest(folder, rows):
    """A path,label manifest of images already in ``folder``."""
    path = folder / "manifest.csv"
    path.write_text("path,label\n" + "".join(f"{name},{label}\n" for name, label in rows))
    return path


def labelled_pngs(folder, n: int = 6, classes=("x", "y")) -> list[tuple[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(folder / f"i{i}.png")
        rows.append((f"i{i}.png", classes[i % len(classes)]))
    return rows


# -- 1. oversized images ---------------------------------------------------------------------
def test_oversized_images_are_skipped_and_counted(tmp_path, tiny_folder):
    data = tmp_path / "d"
    rows = labelled_pngs(data)
    # 400 MP is over twice PIL's own limit (refused at open); 169 MP is over ours only.
    declared_png(data / "bomb.png", 20000, 20000)
    declared_png(data / "huge.png", 13000, 13000)
    manifest = write_manifest(data, rows + [("bomb.png", "x"), ("huge.png", "y")])
    out = run_cli(["run", "--quiet", "--model", tiny_folder, "--data", manifest, "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    d = out.results["dataset"]
    assert (d["images"], d["skipped"]) == (6, 2)
    errors = {s["source"]: s["error"] for s in d["skipped_images"]}
    assert set(errors) == {"bomb.png", "huge.png"}
    # refused from the header: decoding the one-row data would have said "truncated" instead
    assert "13000 x 13000 pixels (169 megapixels) is over the limit of 64 megapixels" in errors["huge.png"]
    assert "over the limit of 64 megapixels" in errors["bomb.png"]
    assert all("max_image_pixels" in e for e in errors.values())


def test_pixel_limit_is_the_data_option(tmp_path):
    image = tmp_path / "a.png"
    Image.new("L", (20, 10), 7).save(image)
    assert MAX_IMAGE_PIXELS == 64_000_000
    with pytest.raises(UnreadableImage, match="20 x 10 pixels"):
        read_image(image, {"max_image_pixels": 199})
    arr, grey = read_image(image, {"max_image_pixels": 200})
    assert arr.shape == (10, 20, 3) and grey and np.allclose(arr, 7 / 255)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_bad_pixel_limit_is_a_usage_error(tmp_path, value):
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=4", "--data-option", f"max_image_pixels={value}"], tmp_path / "o")
    assert_usage_error(out, "--data-option", f"max_image_pixels={value}")


# -- 2. a checkpoint that is not one ---------------------------------------------------------
@pytest.mark.parametrize("content", [b"hello, this is text\n", b""])
def test_text_file_as_checkpoint(tmp_path, tiny_folder, content):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(content)
    out = run_cli(["run", "--model", tiny_folder, "--checkpoint", weights, "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "weights.bin", "not a torch checkpoint")


# -- 3. data options -------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_bad_dicom_frame(tmp_path, value):
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=4", "--data-option", f"dicom_frame={value}"], tmp_path / "o")
    assert_usage_error(out, "--data-option", f"dicom_frame={value}")


def test_bad_dicom_frame_in_config_file(tmp_path):
    config = tmp_path / "mcaudit.toml"
    config.write_text('[run]\ndata_options = { dicom_frame = "abc" }\n')
    out = run_cli(["run", "--config", config, "--model", "demo", "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "mcaudit.toml", "dicom_frame=abc")


def test_good_dicom_frames_are_accepted():
    from mcaudit.config import parse_data_options

    assert parse_data_options(["dicom_frame=middle", "dicom_frame=0"]) == {"dicom_frame": 0}
    assert parse_data_options(["max_image_pixels=100_000_000", "other=abc"]) == {"max_image_pixels": 100_000_000, "other": "abc"}


# -- 4. MedMNIST files -----------------------------------------------------------------------
def test_empty_medmnist_split(tmp_path, tiny_folder):
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez(npz, test_images=np.zeros((0, 28, 28), np.uint8), test_labels=np.zeros((0, 1), np.uint8),
             train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    out = run_cli(["run", "--model", tiny_folder, "--data", npz], tmp_path / "o")
    assert_usage_error(out, "pneumoniamnist.npz", "split 'test' is empty", "test_images")


@pytest.mark.parametrize("key", ["test_images", "test_labels"])
def test_object_array_in_medmnist(tmp_path, tiny_folder, key):
    arrays = {"test_images": np.zeros((2, 28, 28), np.uint8), "test_labels": np.zeros((2, 1), np.uint8)}
    arrays[key] = np.array([None, "x"], dtype=object)
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez(npz, **arrays)
    out = run_cli(["run", "--model", tiny_folder, "--data", npz], tmp_path / "o")
    assert_usage_error(out, "pneumoniamnist.npz", key, "Object arrays cannot be loaded")


def test_non_numeric_medmnist_labels(tmp_path, tiny_folder):
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez(npz, test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([["a"], ["b"]]))
    out = run_cli(["run", "--model", tiny_folder, "--data", npz], tmp_path / "o")
    assert_usage_error(out, "pneumoniamnist.npz", "test_labels", "whole class indices")


# -- 5. CSV fields over csv.field_size_limit() -----------------------------------------------
def test_csv_field_over_the_size_limit(tmp_path, tiny_folder):
    data = tmp_path / "d"
    rows = labelled_pngs(data, 2)
    manifest = data / "manifest.csv"
    manifest.write_text(f"path,label,site\n{rows[0][0]},x,a\n{rows[1][0]},y,{'s' * (csv.field_size_limit() + 1)}\n")
    out = run_cli(["run", "--model", tiny_folder, "--data", manifest], tmp_path / "o")
    assert_usage_error(out, "manifest.csv line 3", "field larger than field limit")


# -- 6. numeric options ----------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [("--workers", "-1"), ("--seed", "99999999999999999999"), ("--seed", "-3")])
def test_out_of_range_numbers(tmp_path, option, value):
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=4", option, value], tmp_path / "o")
    assert_usage_error(out, f"{option} {value}")


def test_out_of_range_workers_in_config_file(tmp_path):
    config = tmp_path / "mcaudit.toml"
    config.write_text("[run]\nworkers = -2\n")
    out = run_cli(["run", "--config", config, "--model", "demo", "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "--workers -2")


# -- 7. results.json with a metric that is not a number --------------------------------------
@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo-results")
    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=40", "--checks", "performance"], out_dir)
    assert out.exit_code == 0, out.output
    return out_dir / "results.json"


@pytest.mark.parametrize("field,value,needle", [
    ("metrics", "high", "metric performance.accuracy is 'high', not a number"),
    ("metrics", True, "metric performance.accuracy is True, not a number"),
    ("intervals", ["a", 1], "intervals of metric performance.accuracy"),
])
def test_gate_and_compare_refuse_non_numeric_metrics(tmp_path, demo_results, field, value, needle):
    results = json.loads(demo_results.read_text())
    results["checks"]["performance"][field]["accuracy"] = value
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps(results))
    assert_usage_error(run_cli(["gate", bad]), "results.json", needle)
    assert_usage_error(run_cli(["compare", demo_results, bad]), "results.json", needle)
    assert_usage_error(run_cli(["compare", bad, demo_results, "--max-drop", "0.1"]), "results.json", needle)
    # an undefined metric is null, which mcaudit itself writes: not an error
    results["checks"]["performance"]["metrics"]["accuracy"] = None
    results["checks"]["performance"]["intervals"].pop("accuracy", None)
    bad.write_text(json.dumps(results))
    assert run_cli(["compare", demo_results, bad]).exit_code == 0


# -- 8. '$' in labels and subgroup values (matplotlib mathtext) ------------------------------
MATH = "$x^{$"


def test_dollar_signs_in_labels_and_groups_do_not_break_figures(tmp_path, tiny_folder):
    data = tmp_path / "d"
    rows = labelled_pngs(data, 24, classes=(r"$\frac{a", "b$c$"))
    manifest = data / "manifest.csv"
    manifest.write_text("path,label,site\n" + "".join(
        f'{name},"{label}",{MATH if i % 3 else "plain"}\n' for i, (name, label) in enumerate(rows)))
    out = run_cli(["run", "--quiet", "--model", tiny_folder, "--data", manifest, "--group", "site",
                   "--checks", "performance,fairness"], tmp_path / "o")
    assert out.exit_code in (0, 1), out.output
    for name in ("performance", "fairness"):
        check = out.results["checks"][name]
        assert check["execution"] == "completed", check.get("error")
        assert check["figures"], name


def test_every_text_of_a_figure_is_literal():
    from mcaudit.reports.plots import new_figure, to_figure

    fig, ax = new_figure()
    ax.bar([0, 1], [1, 2], label=MATH)
    ax.set_xticks([0, 1], [MATH, r"\frac{$"])
    ax.set_title(MATH)
    ax.set_xlabel(MATH)
    ax.legend(title=MATH)
    ax.text(0, 1, MATH)
    figure = to_figure(fig, MATH)
    assert figure.png.startswith(b"\x89PNG")


# -- 9. a mask file that is missing ----------------------------------------------------------
def test_missing_mask_is_skipped_and_counted(tmp_path, tiny_folder):
    data = tmp_path / "d"
    rows = labelled_pngs(data, 6)
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 255
    Image.fromarray(mask).save(data / "m.png")
    lines = [f"{name},{label},{'m.png' if i != 2 else 'gone.png'}" for i, (name, label) in enumerate(rows)]
    manifest = data / "manifest.csv"
    manifest.write_text("path,label,mask\n" + "\n".join(lines) + "\n")
    out = run_cli(["run", "--quiet", "--model", tiny_folder, "--data", manifest, "--checks", "saliency",
                   "--set", "saliency.methods=saliency", "--set", "saliency.cascade_points=0",
                   "--set", "saliency.n_images=6", "--set", "saliency.n_bootstrap=50"], tmp_path / "o")
    assert out.exit_code in (0, 1), out.output
    check = out.results["checks"]["saliency"]
    assert check["execution"] == "completed", check.get("error")
    assert check["metrics"]["n_mask_images"] == 5
    warning = next(w for w in check["warnings"] if "mask" in w)
    assert warning.startswith("1 of 6 images had a mask that could not be read") and "gone.png" in warning


# -- 10. duplicated rows and one class -------------------------------------------------------
def test_duplicate_rows_and_single_class_are_warned_about(tmp_path, tiny_folder):
    data = tmp_path / "d"
    rows = labelled_pngs(data, 4, classes=("x",))
    manifest = write_manifest(data, rows + [rows[1], rows[3]])
    out = run_cli(["run", "--model", tiny_folder, "--data", manifest, "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    warnings = out.results["dataset"]["warnings"]
    assert any("2 row(s) repeat an image" in w and "i1.png on lines 3 and 6" in w for w in warnings), warnings
    assert any("only class 'x' has images" in w for w in warnings), warnings
    assert "caveats" in out.output and "repeat an image" in out.output
    assert "repeat an image" in out.html
    # single-class data still cannot pass performance
    assert out.results["checks"]["performance"]["status"] not in ("pass", "warn")


def test_clean_manifest_has_no_data_warnings(tmp_path, tiny_folder):
    data = tmp_path / "d"
    manifest = write_manifest(data, labelled_pngs(data, 4))
    out = run_cli(["run", "--quiet", "--model", tiny_folder, "--data", manifest, "--checks", "performance"], tmp_path / "o")
    assert out.results["dataset"]["warnings"] == []


def test_single_class_folder_and_npz_are_warned_about(tmp_path):
    from mcaudit.plugins.formats.image_sets import load_image_folder, load_medmnist
    from mcaudit.hook_types import DataRequest

    (tmp_path / "f" / "normal").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "f" / "normal" / "a.png")
    assert "only class 'normal'" in load_image_folder(tmp_path / "f", DataRequest()).warnings[0]
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez(npz, test_images=np.zeros((3, 8, 8), np.uint8), test_labels=np.ones((3, 1), np.uint8))
    assert "only class 'pneumonia' of the 2 classes" in load_medmnist(npz, DataRequest()).warnings[0]
    # an out-of-distribution set has no classes to speak of
    assert load_medmnist(npz, DataRequest(role="ood")).warnings == []


# -- 11. --ood named as --ood ----------------------------------------------------------------
def test_bad_ood_path_names_ood(tmp_path):
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=4", "--ood", tmp_path / "nope.csv"], tmp_path / "o")
    assert_usage_error(out, "--ood", "nope.csv", "no such file")
    assert "--data" not in out.output


# -- 12. formula injection in samples.csv ----------------------------------------------------
def test_samples_csv_neutralises_formulas(tmp_path, tiny_folder):
    from mcaudit.reports.samples import text_cell

    data = tmp_path / "d"
    hostile = ["=cmd|' /C calc'!A0", "+SUM(1)", "@A1", "-2+3", "-5", "plain"]
    rows = labelled_pngs(data, len(hostile), classes=("=HYPERLINK(1)", "ok"))
    manifest = data / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "site"])
        writer.writerows([name, label, value] for (name, label), value in zip(rows, hostile))
    out = run_cli(["run", "--quiet", "--model", tiny_folder, "--data", manifest, "--group", "site",
                   "--checks", "performance"], tmp_path / "o")
    assert out.exit_code in (0, 1), out.output
    table = list(csv.DictReader(io.StringIO((tmp_path / "o" / "samples.csv").read_text())))
    sites = [r["site"] for r in table]
    assert sites == ["'=cmd|' /C calc'!A0", "'+SUM(1)", "'@A1", "'-2+3", "-5", "plain"]
    assert {r["label"] for r in table} == {"'=HYPERLINK(1)", "ok"}
    assert {r["prediction"] for r in table} <= {"'=HYPERLINK(1)", "ok"}
    # the probabilities stay numbers
    assert all(float(r["p_ok"]) >= 0 for r in table)
    # the manifest reader strips leading tabs and returns; other data may keep them
    assert [text_cell(v) for v in ("-0.5", "+1e3", "-", "=1", "\tx", "\r=1")] == ["-0.5", "+1e3", "'-", "'=1", "'\tx", "'\r=1"]


def test_negative_numbers_from_checks_stay_numeric():
    from mcaudit.reports.samples import _cell

    assert [_cell(v) for v in (-0.25, np.float32(-2.5), -3, None, float("nan"))] == ["-0.25", "-2.5", "-3", "", ""]
    assert _cell("=1+1") == "'=1+1"


# -- 13. hooks that raise --------------------------------------------------------------------
def write_plugin(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize("hook", ["mcaudit_register_checks", "mcaudit_register_model_loaders", "mcaudit_register_data_formats"])
def test_register_hook_that_raises_skips_the_plugin(tmp_path, monkeypatch, hook):
    name = write_plugin(tmp_path, monkeypatch, f"raising_{hook}", f"""
        from mcaudit import hookimpl

        @hookimpl
        def {hook}(register):
            raise RuntimeError("broken registration")

        @hookimpl
        def mcaudit_load_model(spec, request):
            raise AssertionError("a skipped plugin is never asked again")
        """)
    out = run_cli(["run", "-p", name, "--model", "demo", "--data", "phantom:n=12", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    assert f"plugin {name} failed and was skipped: its {hook} hook raised RuntimeError: broken registration" in out.output
    failed = out.results["plugins"]["failed"]
    assert [f["name"] for f in failed] == [name] and "broken registration" in failed[0]["error"]
    assert name not in [p["name"] for p in out.results["plugins"]["loaded"]]
    listing = json.loads(run_cli(["plugins", "--json", "-p", name]).output)
    assert [f["name"] for f in listing["failed"]] == [name]


def test_loader_that_raises_is_skipped_and_the_next_asked(tmp_path, monkeypatch):
    name = write_plugin(tmp_path, monkeypatch, "raising_loaders", """
        from mcaudit import hookimpl

        @hookimpl
        def mcaudit_load_model(spec, request):
            raise KeyError("model registry entry")

        @hookimpl
        def mcaudit_load_dataset(spec, request):
            raise ZeroDivisionError("dataset index")
        """)
    out = run_cli(["run", "-p", name, "--model", "demo", "--data", "phantom:n=12", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    assert f"plugin {name} failed and was skipped: its mcaudit_load_model hook raised KeyError" in out.output
    assert out.results["model"]["loader"] and out.results["dataset"]["images"] == 12
    failed = out.results["plugins"]["failed"]
    assert [f["name"] for f in failed] == [name] and "mcaudit_load_model" in failed[0]["error"]


def test_unclaimed_spec_names_the_plugin_that_failed(tmp_path, monkeypatch):
    name = write_plugin(tmp_path, monkeypatch, "raising_medclip", """
        from mcaudit import hookimpl

        @hookimpl
        def mcaudit_load_model(spec, request):
            if spec.startswith("medclip:"):
                raise RuntimeError("weights not found")
        """)
    out = run_cli(["run", "-p", name, "--model", "medclip:vit", "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "--model medclip:vit: no loader claims this spec", name, "RuntimeError: weights not found")


def test_input_error_from_a_loader_stays_a_usage_error(tmp_path, monkeypatch):
    name = write_plugin(tmp_path, monkeypatch, "strict_loader", """
        from mcaudit import InputError, hookimpl

        @hookimpl
        def mcaudit_load_dataset(spec, request):
            raise InputError(f"--data {spec}: strict_loader cannot read this")
        """)
    out = run_cli(["run", "-p", name, "--model", "demo", "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "strict_loader cannot read this")


def test_check_name_conflict_is_still_an_error(tmp_path, monkeypatch):
    name = write_plugin(tmp_path, monkeypatch, "twin_performance", """
        from mcaudit import hookimpl
        from mcaudit.plugins.checks.performance import PerformanceCheck

        @hookimpl
        def mcaudit_register_checks(register):
            register(PerformanceCheck)
        """)
    out = run_cli(["run", "-p", name, "--model", "demo", "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "'performance' is registered twice")


# -- 14. -p no:MODULE and functions without @hookimpl ----------------------------------------
def test_block_by_module_name():
    from mcaudit.catalog import build_catalog
    from mcaudit.plugin_manager import make_plugin_manager

    manager = make_plugin_manager(block=["mcaudit.plugins.checks.performance"], autoload=False)
    assert "performance" not in manager.plugin_names()
    assert "performance" not in build_catalog(manager).checks
    assert manager.warnings == []


def test_block_by_file_name(tmp_path):
    from mcaudit.plugin_manager import make_plugin_manager

    plugin = tmp_path / "file_plugin.py"
    plugin.write_text("")
    manager = make_plugin_manager(load=[str(plugin)], block=["file_plugin.py"], autoload=False)
    assert "file_plugin" not in manager.plugin_names()


def test_block_of_an_unknown_name_is_said(tmp_path):
    out = run_cli(["run", "-p", "no:perfomance", "--model", "demo", "--data", "phantom:n=12", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    assert "mcaudit: warning: -p no:perfomance: no plugin has this name or module, so nothing was blocked" in out.output


def test_function_without_hookimpl_is_warned_about(tmp_path, monkeypatch):
    name = write_plugin(tmp_path, monkeypatch, "unmarked_plugin", """
        from mcaudit import hookimpl

        def mcaudit_register_checks(register):
            pass

        @hookimpl
        def mcaudit_register_data_formats(register):
            pass
        """)
    out = run_cli(["plugins", "-p", name])
    assert out.exit_code == 0, out.output
    warnings = [ln for ln in out.output.splitlines() if "@hookimpl" in ln]
    assert len(warnings) == 1, out.output
    assert f"plugin {name}: mcaudit_register_checks is not decorated with @hookimpl" in warnings[0]
