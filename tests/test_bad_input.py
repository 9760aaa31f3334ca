"""Bad input: exit code 2 and one line naming the file, row or option; never a traceback."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

from mcaudit.testing import TINY_MODEL_CFG, run_cli, save_openclip_folder, tiny_openclip


def assert_usage_error(out, *needles):
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    lines = [ln for ln in out.output.strip().splitlines() if ln.startswith("mcaudit: error:")]
    assert len(lines) == 1, out.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_openclip_folder(tiny_openclip(0), tmp_path_factory.mktemp("tiny"))


def write_manifest(folder, rows, header="path,label"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, _ in rows:
        if name.endswith(".png"):
            Image.new("L", (20, 20), 128).save(folder / name)
    path = folder / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(f"{n},{label}" for n, label in rows) + "\n")
    return path


def test_missing_data_file(tmp_path, tiny_folder):
    out = run_cli(["run", "--model", str(tiny_folder), "--data", str(tmp_path / "nope.csv")], tmp_path / "o")
    assert_usage_error(out, "nope.csv", "no such file")


def test_missing_checkpoint(tmp_path):
    out = run_cli(["run", "--model", "ViT-B-32", "--checkpoint", str(tmp_path / "w.pt"), "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "--checkpoint", "w.pt")


def test_unknown_label_lists_known_classes(tmp_path, tiny_folder):
    manifest = write_manifest(tmp_path / "d", [("a.png", "normal"), ("b.png", "pneumonia")])
    prompts = tmp_path / "p.toml"
    prompts.write_text('[classes]\nnormal = ["normal"]\nopacity = ["opacity"]\n')
    out = run_cli(["run", "--model", str(tiny_folder), "--data", str(manifest), "--prompts", str(prompts)], tmp_path / "o")
    assert_usage_error(out, "manifest.csv line 3", "'pneumonia'", "normal, opacity")


def test_unreadable_image_is_counted_and_listed(tmp_path, tiny_folder):
    manifest = write_manifest(tmp_path / "d", [("a.png", "x"), ("b.png", "y"), ("broken.png", "x"), ("gone.png", "y")])
    (tmp_path / "d" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "d" / "gone.png").unlink()
    out = run_cli(["run", "--quiet", "--model", str(tiny_folder), "--data", str(manifest), "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    d = out.results["dataset"]
    assert d["images"] == 2 and d["skipped"] == 2
    assert {s["source"] for s in d["skipped_images"]} == {"broken.png", "gone.png"}
    assert "broken.png" in out.html
    strict = run_cli(["run", "--strict", "--model", str(tiny_folder), "--data", str(manifest)], tmp_path / "o2")
    assert_usage_error(strict, "broken.png")


def test_wrong_checkpoint_keys(tmp_path):
    cfg_file = tmp_path / "arch.json"
    import json

    cfg_file.write_text(json.dumps(TINY_MODEL_CFG))
    state = tiny_openclip(0).state_dict()
    state.pop("visual.proj")
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    out = run_cli(["run", "--model", str(cfg_file), "--checkpoint", str(tmp_path / "bad.pt"), "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "missing keys (visual.proj)", "unexpected keys (extra.weight)")


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_checkpoint_with_arbitrary_objects_is_refused(tmp_path, capsys):
    import json

    (tmp_path / "arch.json").write_text(json.dumps(TINY_MODEL_CFG))
    state = tiny_openclip(0).state_dict()
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": state, "payload": Payload()}, fh)
    out = run_cli(["run", "--model", str(tmp_path / "arch.json"), "--checkpoint", str(tmp_path / "evil.pt"), "--data", "phantom:n=4"], tmp_path / "o")
    assert_usage_error(out, "evil.pt", "refused to unpickle")
    assert "arbitrary code ran" not in out.output + capsys.readouterr().out


def test_unknown_threshold_metric(tmp_path):
    gate = tmp_path / "g.toml"
    gate.write_text('"performance.acuracy" = ">= 0.5"\n')
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=10", "--checks", "performance", "--gate", str(gate)], tmp_path / "o")
    assert_usage_error(out, "performance.acuracy", "no metric 'acuracy'")
    assert not (tmp_path / "o" / "results.json").exists()


def test_unknown_threshold_check(tmp_path):
    gate = tmp_path / "g.toml"
    gate.write_text('"perf.accuracy" = ">= 0.5"\n')
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=10", "--checks", "performance", "--gate", str(gate)], tmp_path / "o")
    assert_usage_error(out, "perf.accuracy", "no check 'perf'")


@pytest.mark.parametrize("flag", ["--gate", "--config", "--prompts"])
def test_malformed_toml(tmp_path, flag):
    bad = tmp_path / "bad.toml"
    bad.write_text('[thresholds\n"performance.accuracy" = >= \n')
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=10", flag, str(bad)], tmp_path / "o")
    assert_usage_error(out, "bad.toml", "malformed TOML")


def test_bad_threshold_syntax(tmp_path):
    gate = tmp_path / "g.toml"
    gate.write_text('"performance.accuracy" = "at least 0.5"\n')
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=10", "--gate", str(gate)], tmp_path / "o")
    assert_usage_error(out, "performance.accuracy", ">= 0.8")


def test_unknown_check_and_param(tmp_path):
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=10", "--checks", "nope"], tmp_path / "o")
    assert_usage_error(out, "unknown check 'nope'")
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=10", "--set", "performance.bins=3"], tmp_path / "o")
    assert_usage_error(out, "no parameter 'bins'")
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=10", "--set", "performance.n_bootstrap=many"], tmp_path / "o")
    assert_usage_error(out, "performance.n_bootstrap", "int")


def test_manifest_without_label_column(tmp_path, tiny_folder):
    manifest = write_manifest(tmp_path / "d", [("a.png", "x")], header="path,diagnosis")
    out = run_cli(["run", "--model", str(tiny_folder), "--data", str(manifest)], tmp_path / "o")
    assert_usage_error(out, "manifest.csv", "'label' column")


def test_unknown_group_column(tmp_path, tiny_folder):
    manifest = write_manifest(tmp_path / "d", [("a.png", "x")])
    out = run_cli(["run", "--model", str(tiny_folder), "--data", str(manifest), "--group", "sex"], tmp_path / "o")
    assert_usage_error(out, "--group sex")


def test_bad_device(tmp_path):
    out = run_cli(["run", "--model", "demo", "--data", "phantom:n=4", "--device", "cuda:7"], tmp_path / "o")
    assert out.exit_code == 2 and "--device" in out.output
