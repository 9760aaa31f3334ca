"""The transformers CLIPModel loader (PLIP, PubMedCLIP): layouts, offline cache, exactness.

Every model here is a tiny CLIPModel with its own byte-level BPE tokenizer, saved the way
PLIP and PubMedCLIP are published, and loaded without network access.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NETWORK_ATTEMPTS, put_in_hub_cache

from mcaudit.errors import InputError
from mcaudit.plugin_manager import make_plugin_manager
from mcaudit.hook_types import ModelRequest
from mcaudit.testing import run_cli

transformers = pytest.importorskip("transformers")

HF_PLUGIN = "mcaudit.plugins.loaders.hf_clip"
PROMPTS = ["a photo of normal.", "a chest x-ray showing opacity.", "an image"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
# The adversarial check sized for a plumbing test: the gradients must flow, nothing more.
QUICK_ATTACKS = ["--set", "adversarial.n_images=4", "--set", 'adversarial.attacks=["fgsm","pgd_linf"]',
                 "--set", 'adversarial.eps=["2/255"]', "--set", "adversarial.steps=2"]


# -- building the layouts ----------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 byte values (GPT-2/CLIP)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    codes = keep + [256 + i for i in range(len(extra))]
    return [chr(c) for c in codes]


def write_clip_bpe(folder: Path) -> int:
    """A tiny CLIP vocabulary (bytes, a few whole words, start/end last) and its merges."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in ["a", "photo", "of", "normal", "opacity", "chest", "x-ray", "showing", "an", "image"]:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            if current + nxt not in vocab:
                merges.append(f"{current} {nxt}")
                vocab.append(current + nxt)
            current += nxt
    # CLIP keeps start/end as the two largest ids; old configs pool at argmax(input_ids).
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tiny_clip_config(vocab_size: int, legacy_eos: bool = False):
    eos = 2 if legacy_eos else vocab_size - 1
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=vocab_size - 2,
                         eos_token_id=eos, pad_token_id=vocab_size - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )


def save_modern(folder: Path, seed: int = 0) -> Path:
    """CLIPModel.save_pretrained + CLIPProcessor.save_pretrained, as transformers 5 writes them."""
    bpe = folder.parent / f"{folder.name}-bpe"
    vocab_size = write_clip_bpe(bpe)
    tokenizer = transformers.CLIPTokenizer(str(bpe / "vocab.json"), str(bpe / "merges.txt"))
    torch.manual_seed(seed)
    transformers.CLIPModel(tiny_clip_config(vocab_size)).save_pretrained(folder)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                             image_mean=MEAN, image_std=STD)
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_plip_style(folder: Path, seed: int = 1) -> Path:
    """The layout PLIP and PubMedCLIP ship: pytorch_model.bin, preprocessor_config.json,
    vocab.json + merges.txt, and a config from before transformers 4.31 (eos_token_id 2)."""
    vocab_size = write_clip_bpe(folder)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(tiny_clip_config(vocab_size, legacy_eos=True))
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # Checkpoints of that time still carried the position_ids buffers.
    state["text_model.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    state["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    torch.save(state, folder / "pytorch_model.bin")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True, "size": 32,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN, "image_std": STD, "resample": 3,
    }))
    return folder


@pytest.fixture(scope="module")
def modern_folder(tmp_path_factory):
    return save_modern(tmp_path_factory.mktemp("hf") / "tiny-clip")


@pytest.fixture(scope="module")
def plip_folder(tmp_path_factory):
    return save_plip_style(tmp_path_factory.mktemp("hf") / "tiny-plip")


@pytest.fixture(autouse=True)
def offline(offline_hub):
    """Every test here runs with the network refused and an empty Hugging Face cache."""
    return offline_hub


def load(spec, checkpoint=None, allow_network=False):
    manager = make_plugin_manager(load=[HF_PLUGIN], autoload=False)
    request = ModelRequest(checkpoint=Path(checkpoint) if checkpoint else None, allow_network=allow_network)
    adapter = manager.hook.mcaudit_load_model(spec=str(spec), request=request)
    assert adapter is not None, f"no loader claims {spec}"
    return adapter.eval()


def images_uint8(n=3, seed=0, size=(45, 61)):
    """Random 8-bit images of a size the tiny models do not take: the processor's resize counts."""
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def mcaudit_logits(adapter, imgs, prompts=PROMPTS):
    """Logits along the audit's own path: the adapter's preprocessing, then its encoders."""
    pixels = torch.stack([adapter.pixel_transform(i.astype(np.float32) / 255) for i in imgs])
    with torch.no_grad():
        return adapter.logit_scale * adapter.encode_image(pixels) @ adapter.encode_text(prompts).T


def library_logits(folder, imgs, prompts=PROMPTS, state=None):
    """The logits transformers itself gives: CLIPModel + CLIPProcessor from the same folder."""
    from PIL import Image

    model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    processor = transformers.CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    inputs = processor(text=prompts, images=[Image.fromarray(i) for i in imgs], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits_per_image


def audit(tmp_path, *args):
    return run_cli(["run", "--quiet", "-p", HF_PLUGIN, *map(str, args)], tmp_path / "out")


# -- the same logits as transformers -----------------------------------------------------------
@pytest.mark.parametrize("layout", ["modern", "plip"])
def test_logits_match_transformers(layout, modern_folder, plip_folder):
    folder = modern_folder if layout == "modern" else plip_folder
    adapter = load(folder)
    imgs = images_uint8()
    ours, theirs = mcaudit_logits(adapter, imgs), library_logits(folder, imgs)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert adapter.loader == "hf-clip" and adapter.image_size == (32, 32)
    assert torch.allclose(adapter.pixel_mean.flatten(), torch.tensor(MEAN))


def test_processor_without_normalisation_or_rescale_is_mapped_to_pixel_space(tmp_path, plip_folder):
    folder = tmp_path / "raw-pixels"
    folder.mkdir()
    for path in plip_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    cfg.update(do_normalize=False, rescale_factor=1 / 127.5)  # the model saw values in [0, 2]
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    adapter = load(folder)
    imgs = images_uint8(seed=3)
    ours, theirs = mcaudit_logits(adapter, imgs), library_logits(folder, imgs)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(adapter.pixel_std.flatten(), torch.full((3,), 0.5))


# -- learned context ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["modern", "plip"])
def test_learned_context_reproduces_the_prompt_and_is_differentiable(layout, modern_folder, plip_folder):
    adapter = load(modern_folder if layout == "modern" else plip_folder)
    names = ["normal", "opacity", "chest x-ray"]
    context = adapter.token_embeddings("a photo of")
    assert context.shape == (3, adapter.text_width)  # "a", "photo", "of" are whole words here
    with torch.no_grad():
        spliced = adapter.encode_text_with_context(context, names)
        plain = adapter.encode_text([f"a photo of {n}." for n in names])
    assert torch.allclose(spliced, plain, atol=1e-5)

    learned = torch.randn(4, adapter.text_width, requires_grad=True)
    feats = adapter.encode_text_with_context(learned, names)
    assert feats.shape == (3, 16) and torch.allclose(feats.norm(dim=-1), torch.ones(3))
    feats[:, 0].sum().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        adapter.encode_text_with_context(torch.zeros(2, adapter.text_width + 1), names)


# -- the hub cache, offline --------------------------------------------------------------------
def test_hub_id_loads_from_the_local_cache(offline, plip_folder):
    put_in_hub_cache(offline, "tiny-org/plip-tiny", plip_folder)
    adapter = load("tiny-org/plip-tiny")
    imgs = images_uint8(seed=5)
    assert torch.allclose(mcaudit_logits(adapter, imgs), library_logits(plip_folder, imgs), atol=1e-5)


def test_hub_id_missing_from_the_cache_says_where_it_looked(offline, tmp_path):
    out = audit(tmp_path, "--model", "tiny-org/not-here", "--data", "phantom:n=8")
    assert out.exit_code == 2
    assert str(offline / "models--tiny-org--not-here") in out.output
    assert "--allow-network" in out.output and "hf download tiny-org/not-here" in out.output


def test_allow_network_is_what_lets_the_loader_download(offline, monkeypatch, plip_folder):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise FileNotFoundError(repo_id)
        return str(put_in_hub_cache(offline, repo_id, plip_folder))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        load("tiny-org/remote-plip")
    assert all(c.get("local_files_only") for c in calls)
    adapter = load("tiny-org/remote-plip", allow_network=True)
    assert adapter.image_size == (32, 32)
    assert not calls[-1].get("local_files_only") and "*.h5" not in calls[-1]["allow_patterns"]


def test_open_clip_repo_under_a_bare_id_points_to_hf_hub(offline, tmp_path):
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    put_in_hub_cache(offline, "tiny-org/quilt-tiny", folder)
    with pytest.raises(InputError, match="use --model hf-hub:tiny-org/quilt-tiny"):
        load("tiny-org/quilt-tiny")


# -- end to end --------------------------------------------------------------------------------
def test_audit_end_to_end_from_a_folder_and_from_the_cache(offline, tmp_path, modern_folder, plip_folder):
    from importlib.util import find_spec

    checks = ["--checks", "performance"]
    if find_spec("mcaudit.plugins.checks.adversarial") is not None:
        checks = ["-p", "mcaudit.plugins.checks.adversarial", "--checks", "performance,adversarial", *QUICK_ATTACKS]
    out = audit(tmp_path, "--model", modern_folder, "--data", "phantom:n=24", *checks)
    assert out.exit_code == 0, out.output
    results = out.results
    assert results["model"]["loader"] == "hf-clip" and len(results["model"]["weights_sha256"]) == 64
    assert all(c["execution"] == "completed" for c in results["checks"].values()), results["checks"]
    # an untrained model is never passed on performance
    assert results["checks"]["performance"]["status"] in ("fail", "inconclusive"), results["checks"]["performance"]
    assert results["checks"]["performance"]["metrics"]["accuracy"] >= 0

    put_in_hub_cache(offline, "tiny-org/plip-tiny", plip_folder)
    out = run_cli(["run", "--quiet", "-p", HF_PLUGIN, "--model", "tiny-org/plip-tiny", "--data", "phantom:n=16",
                   "--checks", "performance"], tmp_path / "out2")
    assert out.exit_code == 0, out.output
    assert out.results["model"]["spec"] == "tiny-org/plip-tiny"


# -- fine-tuned weights and untrusted files ----------------------------------------------------
def test_checkpoint_overrides_the_folder_weights(tmp_path, modern_folder):
    torch.manual_seed(7)
    tuned = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in transformers.CLIPModel.from_pretrained(str(modern_folder)).state_dict().items()}
    ckpt = tmp_path / "finetuned.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tuned.items()}, "epoch": 3}, ckpt)
    adapter = load(modern_folder, checkpoint=ckpt)
    imgs = images_uint8(seed=2)
    ours = mcaudit_logits(adapter, imgs)
    assert torch.allclose(ours, library_logits(modern_folder, imgs, state=tuned), atol=1e-5)
    assert not torch.allclose(ours, library_logits(modern_folder, imgs), atol=1e-3)


def test_checkpoint_that_does_not_fit_lists_the_keys(tmp_path, modern_folder):
    state = transformers.CLIPModel.from_pretrained(str(modern_folder)).state_dict()
    state["head.weight"] = state.pop("text_projection.weight")
    ckpt = tmp_path / "wrong.pt"
    torch.save(state, ckpt)
    out = audit(tmp_path, "--model", modern_folder, "--checkpoint", ckpt, "--data", "phantom:n=8")
    assert out.exit_code == 2
    assert "missing keys (text_projection.weight)" in out.output and "unexpected keys (head.weight)" in out.output


class Payload:
    """Anything that is not a tensor: torch.load(weights_only=True) must refuse it."""


def test_pickled_object_in_a_folder_is_refused(tmp_path, plip_folder):
    folder = tmp_path / "evil"
    folder.mkdir()
    for path in plip_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({"state_dict": state, "payload": Payload()}, folder / "pytorch_model.bin")
    out = audit(tmp_path, "--model", folder, "--data", "phantom:n=8")
    assert out.exit_code == 2 and "refused to unpickle" in out.output


def test_folder_without_pytorch_weights(tmp_path, modern_folder):
    folder = tmp_path / "tf-only"
    folder.mkdir()
    for path in modern_folder.iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "tf_model.h5").write_bytes(b"\0")
    with pytest.raises(InputError, match="no PyTorch weights .* found tf_model.h5"):
        load(folder)


def test_sharded_checkpoint_is_read_from_its_index(tmp_path, modern_folder):
    from safetensors.torch import save_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    for path in modern_folder.iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    state = transformers.CLIPModel.from_pretrained(str(modern_folder)).state_dict()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, part in shards.items() for k in part}}))
    imgs = images_uint8(seed=4)
    assert torch.allclose(mcaudit_logits(load(folder), imgs), mcaudit_logits(load(modern_folder), imgs), atol=1e-6)


# -- claiming specs and the optional dependency ------------------------------------------------
def test_specs_of_other_loaders_are_left_alone(tmp_path):
    from mcaudit.plugins.loaders import hf_clip as hf_clip_loader

    request = ModelRequest()
    for spec in ("demo", "ViT-B-16", "hf-hub:org/name", "medclip:vit", "configs/arch.json"):
        assert hf_clip_loader.mcaudit_load_model(spec=spec, request=request) is None
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="'bert' model"):
        hf_clip_loader.mcaudit_load_model(spec=str(other), request=request)


def test_missing_transformers_gives_the_install_hint(monkeypatch, modern_folder):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(InputError, match=r'pip install "mcaudit\[hf\]"'):
        load(modern_folder)


def test_plugins_lists_the_loader_and_its_spec_forms():
    out = run_cli(["plugins", "-p", HF_PLUGIN])
    assert out.exit_code == 0
    assert "hf-clip" in out.output and "--model ORG/NAME" in out.output and "--model FOLDER" in out.output
    assert "--model hf-hub:ORG/NAME" in out.output  # the open_clip loader's forms are listed too


def test_loading_stays_offline_even_when_the_hub_library_is_not_told_to(offline, monkeypatch, plip_folder):
    # HF_HUB_OFFLINE off: only mcaudit's own discipline keeps the sockets closed.
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        load("tiny-org/plip-tiny")
    put_in_hub_cache(offline, "tiny-org/plip-tiny", plip_folder)
    assert load("tiny-org/plip-tiny").loader == "hf-clip"
    assert NETWORK_ATTEMPTS == []


def test_the_network_guard_of_these_tests_works(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(Exception):
        huggingface_hub.snapshot_download("tiny-org/anything", local_files_only=False)
    assert NETWORK_ATTEMPTS, "the guard saw no attempt: the offline tests would prove nothing"
