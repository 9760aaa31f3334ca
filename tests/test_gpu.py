"""The GPU habits of the shared pass and the checks, on a real CUDA device.

Skipped where there is no GPU (CI has none); ``benchmarks/gpu_session.sh`` runs them
together with the GPU benchmarks in one go on a machine that has one.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from mcaudit.forward import encode_with_backoff, run_forward
from mcaudit.testing import demo_prompts, load_adapter, phantom_dataset, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def demo_forward(device: str, precision: str = "fp32", workers: int = 0, n: int = 256):
    model = load_adapter("demo", device=device)
    dataset = phantom_dataset(n, image_size=model.image_size)
    with torch.inference_mode():
        text = model.class_text_features(demo_prompts().class_prompts(dataset.classes)).float()
    return run_forward(model, dataset, text, batch_size=64, precision=precision, workers=workers)


def test_cuda_pass_equals_the_cpu_pass():
    cpu, gpu = demo_forward("cpu"), demo_forward("cuda")
    assert np.array_equal(cpu.indices, gpu.indices)
    assert gpu.image_features.device.type == "cpu"  # outputs come back to the host
    assert torch.allclose(cpu.image_features, gpu.image_features, atol=1e-4)
    assert torch.allclose(cpu.logits, gpu.logits, atol=1e-2)
    assert (cpu.preds == gpu.preds).mean() >= 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_stays_close_to_fp32(precision):
    full, half = demo_forward("cuda"), demo_forward("cuda", precision)
    cosine = (full.image_features * half.image_features).sum(dim=1)
    assert cosine.min() > 0.99, cosine.min()
    assert (full.preds == half.preds).mean() >= 0.97
    assert half.image_features.dtype == torch.float32  # features are stored in fp32 either way


def test_decoding_workers_and_pinned_memory_change_nothing():
    inline, workers = demo_forward("cuda"), demo_forward("cuda", workers=2)
    assert np.array_equal(inline.indices, workers.indices)
    assert torch.allclose(inline.image_features, workers.image_features, atol=1e-6)


def test_out_of_memory_halves_the_batch_and_gives_the_same_features():
    model = load_adapter("demo", device="cuda")
    chunk = 512  # large enough that the allocator's segment sizes do not blur the budget
    pixels = torch.rand(16 * chunk, 3, *model.image_size, device="cuda")
    with torch.inference_mode():
        expected = torch.cat([model.encode_image(part) for part in pixels.split(chunk)])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_reserved()
        model.encode_image(pixels[:chunk])
        per_chunk = torch.cuda.max_memory_reserved() - base
        torch.cuda.empty_cache()
        # Room for about three chunks on top of what is held now: 16 at once cannot fit.
        budget = base + 3 * per_chunk + 64 * 2**20
        torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.get_device_properties(0).total_memory)
        calls = []
        real = model.encode_image

        def counting(x):
            calls.append(len(x))
            return real(x)

        model.encode_image = counting
        try:
            got = encode_with_backoff(model, pixels)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            del model.encode_image
    assert calls[0] == len(pixels) and len(calls) > 3 and min(calls) <= 2 * chunk, calls[:8]
    assert torch.allclose(got, expected, atol=1e-4)


def test_full_demo_audit_on_cuda(tmp_path):
    cpu = run_cli(["run", "--quiet", "--device", "cpu"], tmp_path / "cpu")
    gpu = run_cli(["run", "--quiet", "--device", "cuda"], tmp_path / "gpu")
    assert cpu.exit_code == gpu.exit_code == 0, gpu.output
    results = gpu.results
    assert results["environment"]["device"].startswith("cuda")
    assert {name: c["status"] for name, c in results["checks"].items()} == {
        name: "ok" for name in cpu.results["checks"]}
    for metric in ("accuracy", "balanced_accuracy", "auroc_macro"):
        assert results["checks"]["performance"]["metrics"][metric] == pytest.approx(
            cpu.results["checks"]["performance"]["metrics"][metric], abs=0.01)
    with open(tmp_path / "gpu" / "samples.csv") as f:
        assert len(list(csv.DictReader(f))) == results["dataset"]["images"]
