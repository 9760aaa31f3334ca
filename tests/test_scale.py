"""docs/scale.md, tested: one job per model, each a two-process gloo torchrun run (as one
Slurm array task would start it), gives the results of a single-process run of that model,
so the per-model results.json files can be merged later."""

from __future__ import annotations

import pytest

from mcaudit.testing import run_cli, run_torchrun, save_openclip_folder, tiny_openclip


@pytest.mark.slow
def test_one_torchrun_job_per_model_equals_single_process_runs(tmp_path):
    args = ["--quiet", "--data", "phantom:n=40", "--checks", "performance", "--seed", "3"]
    for seed in (0, 1):  # two models, one job after the other as a Slurm array runs them
        model = save_openclip_folder(tiny_openclip(seed), tmp_path / f"model-{seed}")
        single = run_cli(["run", "--model", model, *args], tmp_path / f"single-{seed}")
        assert single.exit_code in (0, 1), single.output
        multi = run_torchrun(["--model", model, *args], tmp_path / f"multi-{seed}")
        assert multi["environment"]["world_size"] == 2
        assert multi["model"]["weights_sha256"] == single.results["model"]["weights_sha256"]
        for key in ("metrics", "intervals", "status"):
            assert multi["checks"]["performance"][key] == single.results["checks"]["performance"][key], (seed, key)
        assert (tmp_path / f"multi-{seed}" / "samples.csv").read_text() == (single.out_dir / "samples.csv").read_text()


@pytest.mark.slow
def test_multi_model_audit_under_torchrun_equals_single_process_runs(tmp_path):
    """Several models in one torchrun job: each model's folder equals its single-process run,
    and only rank 0 writes the comparison."""
    import json

    args = ["--quiet", "--data", "phantom:n=40", "--checks", "performance", "--seed", "3"]
    models = [save_openclip_folder(tiny_openclip(seed), tmp_path / f"model-{seed}") for seed in (0, 1)]
    top = run_torchrun([a for i, m in enumerate(models) for a in ("--model", m, "--label", f"m{i}")] + args,
                       tmp_path / "multi")
    assert top["kind"] == "models" and list(top["models"]) == ["m0", "m1"]
    assert top["comparison"]["paired"]
    for i, model in enumerate(models):
        single = run_cli(["run", "--model", model, *args], tmp_path / f"single-{i}")
        inside = json.loads((tmp_path / "multi" / "models" / f"m{i}" / "results.json").read_text())
        assert inside["environment"]["world_size"] == 2
        for key in ("metrics", "intervals", "status"):
            assert inside["checks"]["performance"][key] == single.results["checks"]["performance"][key], (i, key)
        assert (tmp_path / "multi" / "models" / f"m{i}" / "samples.csv").read_text() == (single.out_dir / "samples.csv").read_text()
