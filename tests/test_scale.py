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
