"""open_clip model layouts: BiomedCLIP (HF text tower), QuiltNet, fine-tuned checkpoints.

Each layout is built locally with a tiny config, saved the way the model is published, and
loaded with the network switched off; its logits are checked against open_clip itself.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NETWORK_ATTEMPTS, put_in_hub_cache

from mcaudit.errors import InputError
from mcaudit.plugins.loaders import openclip as openclip_loader
from mcaudit.plugins.loaders.openclip import build_model
from mcaudit.plugin_manager import make_plugin_manager
from mcaudit.hook_types import ModelRequest
from mcaudit.testing import TINY_MODEL_CFG, run_cli, save_openclip_folder, tiny_openclip

REPO = Path(__file__).resolve().parents[1]
MEDCLIP_EXAMPLE = REPO / "examples" / "medclip_loader_plugin.py"
PROMPTS = ["a photo of normal.", "a chest x-ray showing opacity.", "an image of opacity"]
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]
TOWER = "tiny-org/tiny-pubmedbert"
# BiomedCLIP's open_clip_config.json, shrunk: timm's smallest ViT (160 px, as timm builds it)
# and a BERT tower named by hub id.
BIOMED_SIZE = 160
BIOMED_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                   "timm_pool": "", "timm_proj": "linear", "image_size": BIOMED_SIZE},
    "text_cfg": {"hf_model_name": TOWER, "hf_tokenizer_name": TOWER, "hf_proj_type": "mlp",
                 "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16},
}
# The adversarial check sized for a plumbing test: the gradients must flow, nothing more.
QUICK_ATTACKS = ["--set", "adversarial.n_images=4", "--set", 'adversarial.attacks=["fgsm","pgd_linf"]',
                 "--set", 'adversarial.eps=["2/255"]', "--set", "adversarial.steps=2"]


# -- building the layouts ----------------------------------------------------------------------
def write_bert_tower(folder: Path) -> Path:
    """A tiny BERT config with its WordPiece vocabulary, as the BiomedBERT repository has."""
    from transformers import BertConfig, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "normal", "opacity",
             "chest", "x", "-", "ray", "showing", ".", "an", "image"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(folder)
    return folder


def save_biomedclip_folder(model, folder: Path, with_tower: Path | None = None) -> Path:
    """open_clip_config.json + open_clip_pytorch_model.bin, optionally with the tower's files."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": BIOMED_CFG, "preprocess_cfg": {"mean": MEAN, "std": STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_pytorch_model.bin")
    if with_tower is not None:
        for path in with_tower.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny BiomedCLIP-style model, its BERT tower files and a self-contained folder."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("biomedclip")
    tower = write_bert_tower(root / "tower")
    torch.manual_seed(0)
    model = build_model(BIOMED_CFG, tower).eval()
    return {
        "tower": tower,
        "model": model,
        "hub_layout": save_biomedclip_folder(model, root / "BiomedCLIP-tiny"),
        "self_contained": save_biomedclip_folder(model, root / "BiomedCLIP-tiny-local", with_tower=tower),
    }


@pytest.fixture(autouse=True)
def offline(offline_hub):
    """Every test here runs with the network refused and an empty Hugging Face cache."""
    return offline_hub


def load(spec, checkpoint=None, allow_network=False):
    manager = make_plugin_manager(autoload=False)
    request = ModelRequest(checkpoint=Path(checkpoint) if checkpoint else None, allow_network=allow_network)
    adapter = manager.hook.mcaudit_load_model(spec=str(spec), request=request)
    assert adapter is not None, f"no loader claims {spec}"
    return adapter.eval()


def images_uint8(n=3, seed=0, size=(45, 61)):
    """Random 8-bit images, by default of a size no model here takes: the resize must count."""
    height, width = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def mcaudit_logits(adapter, imgs, prompts=PROMPTS):
    """Logits along the audit's own path: the adapter's preprocessing, then its encoders."""
    pixels = torch.stack([adapter.pixel_transform(i.astype(np.float32) / 255) for i in imgs])
    with torch.no_grad():
        return adapter.logit_scale * adapter.encode_image(pixels) @ adapter.encode_text(prompts).T


def open_clip_logits(name: str, model_cfg: dict, weights: Path, imgs, preprocess_cfg: dict | None, tmp_path: Path):
    """Logits from open_clip's own factory, transforms and tokenizer for the same weights."""
    import open_clip
    from PIL import Image

    cfg_file = tmp_path / f"{name}.json"
    cfg_file.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfg_file)
    kwargs = {"image_mean": preprocess_cfg["mean"], "image_std": preprocess_cfg["std"]} if preprocess_cfg else {}
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights), **kwargs)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    pixels = torch.stack([preprocess(Image.fromarray(i)) for i in imgs])
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
        return model.logit_scale.exp() * image @ text.T


def audit(tmp_path, *args, out="out"):
    return run_cli(["run", "--quiet", *map(str, args)], tmp_path / out)


def checks_to_run():
    from importlib.util import find_spec

    if find_spec("mcaudit.plugins.checks.adversarial") is None:
        return ["--checks", "performance"]
    return ["-p", "mcaudit.plugins.checks.adversarial", "--checks", "performance,adversarial", *QUICK_ATTACKS]


def assert_audited(outcome, loader="openclip"):
    """Every check ran to the end; the untrained model is not passed on performance."""
    assert outcome.exit_code == 0, outcome.output
    results = outcome.results
    assert results["model"]["loader"] == loader
    checks = results["checks"]
    assert all(c["execution"] == "completed" for c in checks.values()), {n: c.get("summary") for n, c in checks.items()}
    assert checks["performance"]["status"] in ("fail", "inconclusive"), checks["performance"]
    return results


# -- BiomedCLIP: open_clip with a Hugging Face BERT tower --------------------------------------
def test_biomedclip_folder_with_its_tower_matches_open_clip(built, tmp_path):
    adapter = load(built["self_contained"])
    imgs = images_uint8(size=(BIOMED_SIZE + 37, BIOMED_SIZE - 21))
    # open_clip itself, with the tower named by its local folder (a hub id would go online).
    cfg = copy.deepcopy(BIOMED_CFG)
    cfg["text_cfg"].update(hf_model_name=str(built["tower"]), hf_tokenizer_name=str(built["tower"]))
    theirs = open_clip_logits("mcaudit-test-biomedclip", cfg, built["self_contained"] / "open_clip_pytorch_model.bin",
                              imgs, {"mean": MEAN, "std": STD}, tmp_path)
    ours = mcaudit_logits(adapter, imgs)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.allclose(adapter.pixel_mean.flatten(), torch.tensor(MEAN))
    # BERT's tokenizer, not CLIP's: [CLS] first and [SEP] closing the prompt.
    ids = adapter.tokenizer(["a photo of normal."])[0]
    assert ids[:7].tolist() == [2, 5, 6, 7, 8, 15, 3] and ids.shape[0] == 16
    # The learned-context path the backdoor check uses works on this tower too.
    with torch.no_grad():
        spliced = adapter.encode_text_with_context(adapter.token_embeddings("a photo of"), ["normal", "opacity"])
        plain = adapter.encode_text(["a photo of normal.", "a photo of opacity."])
    assert torch.allclose(spliced, plain, atol=1e-5)


def test_biomedclip_hub_layout_audits_offline_from_the_cache(built, offline, tmp_path):
    # As published: the model repository has no tower files; the tower is its own repository.
    snapshot = put_in_hub_cache(offline, "tiny-org/BiomedCLIP-tiny", built["hub_layout"])
    put_in_hub_cache(offline, TOWER, built["tower"])
    adapter = load("hf-hub:tiny-org/BiomedCLIP-tiny")
    imgs = images_uint8(seed=1, size=(BIOMED_SIZE - 9, BIOMED_SIZE + 50))
    assert torch.allclose(mcaudit_logits(adapter, imgs), mcaudit_logits(load(built["self_contained"]), imgs), atol=1e-6)

    results = assert_audited(audit(tmp_path, "--model", "hf-hub:tiny-org/BiomedCLIP-tiny", "--data", "phantom:n=24", *checks_to_run()))
    assert results["model"]["weights_sha256"] == openclip_loader.sha256_file(snapshot / "open_clip_pytorch_model.bin")
    # The downloaded folder itself, passed as --model, finds the tower in the cache too.
    assert_audited(audit(tmp_path, "--model", snapshot, "--data", "phantom:n=16", "--checks", "performance", out="out2"))


def test_biomedclip_without_its_tower_says_where_it_looked(built, offline, tmp_path):
    put_in_hub_cache(offline, "tiny-org/BiomedCLIP-tiny", built["hub_layout"])
    out = audit(tmp_path, "--model", "hf-hub:tiny-org/BiomedCLIP-tiny", "--data", "phantom:n=8")
    assert out.exit_code == 2
    assert f"text tower {TOWER}" in out.output
    assert str(offline / "models--tiny-org--tiny-pubmedbert") in out.output
    assert "--allow-network" in out.output and f"hf download {TOWER}" in out.output


def test_tower_files_are_downloaded_only_when_allowed_and_never_its_weights(built, offline, monkeypatch):
    import huggingface_hub

    put_in_hub_cache(offline, "tiny-org/BiomedCLIP-tiny", built["hub_layout"])
    real = huggingface_hub.snapshot_download
    fetched = []

    def fake_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        fetched.append((repo_id, kwargs.get("allow_patterns")))
        return str(put_in_hub_cache(offline, repo_id, built["tower"]))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(InputError, match="not available offline"):
        load("hf-hub:tiny-org/BiomedCLIP-tiny")
    assert fetched == []
    assert load("hf-hub:tiny-org/BiomedCLIP-tiny", allow_network=True).image_size == (BIOMED_SIZE, BIOMED_SIZE)
    assert [repo for repo, _ in fetched] == [TOWER]
    patterns = fetched[0][1]
    assert "config.json" in patterns and "vocab.txt" in patterns
    assert not any(p.endswith((".bin", ".safetensors")) for p in patterns)


def test_hf_tower_without_transformers_gives_the_install_hint(built, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError, match=r'pip install "mcaudit\[hf\]"'):
        load(built["self_contained"])


# -- QuiltNet: a plain open_clip model on the hub ---------------------------------------------
def test_quiltnet_style_folder_matches_open_clip_and_audits(offline, tmp_path):
    model = tiny_openclip(3)
    folder = save_openclip_folder(model, tmp_path / "QuiltNet-tiny", mean=MEAN, std=STD, fmt="bin")
    imgs = images_uint8(seed=2)
    theirs = open_clip_logits("mcaudit-test-quilt", TINY_MODEL_CFG, folder / "open_clip_pytorch_model.bin",
                              imgs, {"mean": MEAN, "std": STD}, tmp_path)
    assert torch.allclose(mcaudit_logits(load(folder), imgs), theirs, atol=1e-5)

    put_in_hub_cache(offline, "tiny-org/QuiltNet-tiny", folder)
    assert_audited(audit(tmp_path, "--model", "hf-hub:tiny-org/QuiltNet-tiny", "--data", "phantom:n=24", *checks_to_run()))


def test_hub_model_missing_from_the_cache(offline, tmp_path):
    out = audit(tmp_path, "--model", "hf-hub:tiny-org/not-downloaded", "--data", "phantom:n=8")
    assert out.exit_code == 2
    assert str(offline / "models--tiny-org--not-downloaded") in out.output
    assert "--allow-network" in out.output and "pass the downloaded folder as --model" in out.output


def test_hf_hub_spec_for_a_transformers_repo_points_to_the_bare_id(offline, tmp_path):
    folder = tmp_path / "plip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    put_in_hub_cache(offline, "tiny-org/plip", folder)
    with pytest.raises(InputError, match="use --model tiny-org/plip"):
        load("hf-hub:tiny-org/plip")


# -- a fine-tuned open_clip: ARCH --checkpoint FILE --------------------------------------------
@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """TINY_MODEL_CFG registered in open_clip under a name, as ViT-B-16 is."""
    import open_clip

    path = tmp_path_factory.mktemp("arch") / "mcaudit-tiny-vit.json"
    path.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(path)
    return "mcaudit-tiny-vit"


@pytest.mark.parametrize("fmt", ["ddp-pt", "safetensors"])
def test_architecture_name_with_a_fine_tuned_checkpoint(fmt, tiny_arch, tmp_path):
    model = tiny_openclip(4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "ddp-pt":  # what a DDP training script writes: nested, with module. prefixes
        ckpt = tmp_path / "epoch_10.pt"
        torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, ckpt)
    else:
        from safetensors.torch import save_file

        ckpt = tmp_path / "finetuned.safetensors"
        save_file(state, str(ckpt))
    imgs = images_uint8(seed=6)
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    theirs = open_clip_logits(tiny_arch, TINY_MODEL_CFG, plain, imgs, None, tmp_path)
    assert torch.allclose(mcaudit_logits(load(tiny_arch, checkpoint=ckpt), imgs), theirs, atol=1e-5)
    if fmt == "ddp-pt":
        assert_audited(audit(tmp_path, "--model", tiny_arch, "--checkpoint", ckpt, "--data", "phantom:n=16", "--checks", "performance"))


def test_checkpoint_that_does_not_fit_lists_missing_and_unexpected_keys(tiny_arch, tmp_path):
    state = tiny_openclip(0).state_dict()
    state["text_proj.weight"] = state.pop("text_projection")
    ckpt = tmp_path / "wrong.pt"
    torch.save(state, ckpt)
    out = audit(tmp_path, "--model", tiny_arch, "--checkpoint", ckpt, "--data", "phantom:n=8")
    assert out.exit_code == 2
    assert "1 missing keys (text_projection)" in out.output and "1 unexpected keys (text_proj.weight)" in out.output


class Payload:
    """Anything that is not a tensor: torch.load(weights_only=True) must refuse it."""


def test_pickled_object_in_a_checkpoint_is_refused(tiny_arch, tmp_path):
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_openclip(0).state_dict(), "payload": Payload()}, ckpt)
    out = audit(tmp_path, "--model", tiny_arch, "--checkpoint", ckpt, "--data", "phantom:n=8")
    assert out.exit_code == 2 and "refused to unpickle" in out.output


def test_architecture_without_checkpoint_asks_for_one(tiny_arch, tmp_path):
    out = audit(tmp_path, "--model", tiny_arch, "--data", "phantom:n=8")
    assert out.exit_code == 2 and "--checkpoint" in out.output


# -- which loader claims what ------------------------------------------------------------------
def test_open_clip_loader_leaves_bare_hub_ids_and_other_schemes_alone():
    request = ModelRequest()
    for spec in ("vinid/plip", "flaviagiammarino/pubmed-clip-vit-base-patch32", "medclip:vit"):
        assert openclip_loader.mcaudit_load_model(spec=spec, request=request) is None
    with pytest.raises(InputError, match="no such file or folder"):
        openclip_loader.mcaudit_load_model(spec="models/ft.pt", request=request)


def test_plugins_lists_every_loader_with_its_spec_forms():
    out = run_cli(["plugins", "-p", "mcaudit.plugins.loaders.hf_clip", "-p", str(MEDCLIP_EXAMPLE)])
    assert out.exit_code == 0, out.output
    section = out.output.split("Model loaders:")[1].split("Data formats:")[0]
    for form in ("--model ARCH --checkpoint FILE", "--model hf-hub:ORG/NAME", "--model demo",
                 "--model ORG/NAME", "--model medclip:vit"):
        assert form in section, form
    for name in ("openclip", "hf-clip", "medclip"):
        assert f"  {name} (" in section


def test_medclip_example_plugin_claims_only_its_specs_and_explains_a_missing_package(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("medclip_loader_plugin_under_test", MEDCLIP_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    request = ModelRequest()
    for other in ("demo", "vinid/plip", "hf-hub:org/name", str(tmp_path)):
        assert module.mcaudit_load_model(spec=other, request=request) is None
    with pytest.raises(InputError, match="medclip:vit or medclip:resnet"):
        module.mcaudit_load_model(spec="medclip:swin", request=request)
    if importlib.util.find_spec("medclip") is None:
        out = audit(tmp_path, "-p", MEDCLIP_EXAMPLE, "--model", "medclip:vit", "--data", "phantom:n=8")
        assert out.exit_code == 2 and "pip install medclip" in out.output


def test_loading_stays_offline_even_when_the_hub_library_is_not_told_to(built, offline, monkeypatch):
    # HF_HUB_OFFLINE off: only mcaudit's own discipline keeps the sockets closed.
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    put_in_hub_cache(offline, "tiny-org/BiomedCLIP-tiny", built["hub_layout"])
    with pytest.raises(InputError, match="not available offline"):
        load("hf-hub:tiny-org/BiomedCLIP-tiny")
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        load("hf-hub:tiny-org/elsewhere")
    put_in_hub_cache(offline, TOWER, built["tower"])
    assert load("hf-hub:tiny-org/BiomedCLIP-tiny").loader == "openclip"
    assert NETWORK_ATTEMPTS == []


def test_weights_file_given_as_the_model_is_explained(tmp_path):
    ckpt = tmp_path / "ft.pt"
    torch.save(tiny_openclip(0).state_dict(), ckpt)
    with pytest.raises(InputError, match="name the architecture with --model .* --checkpoint"):
        load(ckpt)
