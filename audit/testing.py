"""Fixtures and helpers for testing mcaudit plugins (a pytest plugin, loaded automatically).

Fixtures:

* ``mcaudit_demo_model``: the embedded demo model (trained on phantoms), on the CPU.
* ``mcaudit_tiny_model``: a tiny untrained open_clip model, for plumbing tests.
* ``mcaudit_phantoms``: a function ``(n=120, seed=1, groups=("site", "sex")) -> AuditDataset``.
* ``mcaudit_context``: a function ``(model, dataset, **settings) -> AuditContext`` that runs
  the shared forward pass, so a check's ``run`` can be called directly.
* ``mcaudit_run``: a function ``(*args) -> RunOutcome`` that runs ``mcaudit run`` in-process
  with ``--out`` in a temporary folder (and ``--profile quick`` unless the arguments name a
  profile) and returns the exit code, output and parsed results.
* ``mcaudit_encoder_calls``: a list that receives the batch size of every image-encoder call,
  to prove that a forward-only check adds no pass over the images.

Helpers: ``run_torchrun(args, out_dir)`` runs ``mcaudit run`` under torchrun with the gloo
backend, to compare a sharded run with a single-process one. ``derive_status(CheckClass,
result)`` gives the status, its reason and the threshold outcomes the host would derive for a
``CheckResult`` under the check's default thresholds, so a known-answer test can call
``run`` directly and still assert the verdict a user would see.

Nothing heavy is imported until a fixture is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


def tiny_openclip(seed: int = 0, cfg: dict[str, Any] | None = None):
    """A randomly initialised tiny open_clip model (not an adapter) from ``cfg``."""
    import torch

    from mcaudit.plugins.loaders.openclip import build_model

    torch.manual_seed(seed)
    return build_model(cfg or TINY_MODEL_CFG, None).eval()


def save_openclip_folder(model, folder: Path, cfg: dict[str, Any] | None = None, mean=None, std=None, fmt: str = "safetensors") -> Path:
    """Save ``model`` in the hub layout (open_clip_config.json + weights), as BiomedCLIP ships."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": cfg or TINY_MODEL_CFG, "preprocess_cfg": {}}
    if mean is not None:
        config["preprocess_cfg"] = {"mean": list(mean), "std": list(std)}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "open_clip_model.safetensors"))
    else:
        import torch

        torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


def load_adapter(spec: str, checkpoint: str | Path | None = None, device: str = "cpu"):
    """Load a model through the plugin hooks, as ``mcaudit run`` does."""
    from mcaudit.plugin_manager import make_plugin_manager
    from mcaudit.hook_types import ModelRequest

    manager = make_plugin_manager(autoload=False)
    request = ModelRequest(checkpoint=Path(checkpoint) if checkpoint else None, device=device)
    adapter = manager.hook.mcaudit_load_model(spec=spec, request=request)
    assert adapter is not None, f"no loader claims {spec}"
    return adapter.eval()


def phantom_dataset(n: int = 120, seed: int = 1, groups=("site", "sex"), image_size=(64, 64)):
    from mcaudit.demo.phantoms import PhantomDataset
    from mcaudit.hook_types import DataRequest

    return PhantomDataset.from_spec(f"phantom:n={n},seed={seed}", DataRequest(image_size=tuple(image_size), groups=tuple(groups)))


def demo_prompts():
    from importlib import resources

    from mcaudit.prompts import load_prompts

    return load_prompts(Path(str(resources.files("mcaudit.demo") / "prompts.toml")))


def hook_model_loader(device: str = "cpu"):
    """``(spec, checkpoint) -> model or None`` through the built-in loader hooks, as
    ``ctx.load_model`` loads a reference model in a run (None: no loader claims the spec)."""
    from mcaudit.hook_types import ModelRequest
    from mcaudit.plugin_manager import make_plugin_manager

    manager = make_plugin_manager(autoload=False)

    def load(spec: str, checkpoint: str | None = None):
        request = ModelRequest(checkpoint=Path(checkpoint) if checkpoint else None, device=str(device))
        adapter = manager.first_result("mcaudit_load_model", spec=spec, request=request)
        return None if adapter is None else adapter.eval()

    return load


def make_context(model, dataset, prompts=None, seed: int = 0, batch_size: int = 64, precision: str = "fp32", options=None,
                 open_dataset=None, model_loader=None):
    """Run the shared forward pass and return the :class:`AuditContext` a check receives;
    ``ctx.load_model`` goes through ``model_loader`` (default: the built-in loader hooks)."""
    import torch

    from mcaudit.context import AuditContext
    from mcaudit.forward import run_forward
    from mcaudit.prompts import PromptSet

    prompts = prompts or (demo_prompts() if dataset.format_name == "phantom" else PromptSet())
    with torch.inference_mode():
        class_features = model.class_text_features(prompts.class_prompts(dataset.classes)).float()
    forward = run_forward(model, dataset, class_features, batch_size=batch_size, precision=precision)
    return AuditContext(
        model=model, dataset=dataset, prompts=prompts, class_features=class_features, forward=forward,
        device=model.device, precision=precision, batch_size=batch_size, seed=seed,
        options=dict(options or {}), open_dataset=open_dataset,
        model_loader=model_loader or hook_model_loader(str(model.device)),
    )


@dataclass
class RunOutcome:
    exit_code: int
    output: str
    out_dir: Path

    @property
    def results(self) -> dict[str, Any]:
        return json.loads((self.out_dir / "results.json").read_text())

    @property
    def html(self) -> str:
        return (self.out_dir / "index.html").read_text()


def run_cli(args: list[str], out_dir: Path | None = None) -> RunOutcome:
    """Invoke the ``mcaudit`` CLI in-process; adds ``--out`` when ``args`` starts with ``run``."""
    from click.testing import CliRunner

    from mcaudit.cli import cli

    args = [str(a) for a in args]
    if out_dir is not None and args and args[0] == "run" and "--out" not in args:
        args += ["--out", str(out_dir)]
    if args and args[0] == "run" and "--profile" not in args:
        args += ["--profile", "quick"]  # tests size their own samples; quick keeps the rest small
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return RunOutcome(result.exit_code, result.output, Path(out_dir) if out_dir else Path("."))


def derive_status(check_cls, result) -> tuple[str, str, dict[str, dict[str, Any]], dict[str, Any]]:
    """(status, reason, default thresholds' outcomes by name, results.json entry) for one
    check's result, derived exactly as ``mcaudit run`` derives them."""
    from mcaudit.gating import apply_gate, collect_thresholds
    from mcaudit.results import result_entry

    name = check_cls.name
    entry = result_entry(result) | {"declared_metrics": list(check_cls.metrics)}
    results = {"checks": {name: entry}}
    defaults = {f"{name}.{m}": v for m, v in check_cls.default_thresholds.items()}
    gate = apply_gate(results, collect_thresholds(None, {}, defaults), gated=False)
    entry = results["checks"][name]
    return entry["status"], entry["status_reason"], {o["name"]: o for o in gate["results"]}, entry


def run_torchrun(args: list[str], out_dir: Path, nproc: int = 2, timeout: int = 300) -> dict[str, Any]:
    """Run ``mcaudit run ARGS --out OUT_DIR`` under torchrun (gloo on the CPU); parsed results."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MCAUDIT_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "mcaudit", "run", *map(str, args), "--out", str(out_dir)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(out_dir) / "results.json").read_text())


@pytest.fixture
def mcaudit_encoder_calls(monkeypatch):
    from mcaudit.models.adapter import ModelAdapter

    calls: list[int] = []
    original = ModelAdapter.encode_image

    def counting(self, pixels):
        calls.append(len(pixels))
        return original(self, pixels)

    monkeypatch.setattr(ModelAdapter, "encode_image", counting)
    return calls


@pytest.fixture(scope="session")
def mcaudit_demo_model():
    return load_adapter("demo")


@pytest.fixture(scope="session")
def mcaudit_tiny_model(tmp_path_factory):
    folder = save_openclip_folder(tiny_openclip(0), tmp_path_factory.mktemp("tiny-model"))
    return load_adapter(str(folder))


@pytest.fixture
def mcaudit_phantoms():
    return phantom_dataset


@pytest.fixture
def mcaudit_context():
    return make_context


@pytest.fixture
def mcaudit_run(tmp_path):
    def run(*args) -> RunOutcome:
        return run_cli(["run", "--quiet", *args], tmp_path / "out")

    return run
