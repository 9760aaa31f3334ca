"""The plugin host: built-ins as plugins, -p / -p no:, entry points guarded, early failures."""

from __future__ import annotations

import json
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from mcaudit import hookspecs
from mcaudit.catalog import build_catalog
from mcaudit.errors import PluginError
from mcaudit.plugin_manager import DEFAULT_PLUGINS, make_plugin_manager
from mcaudit.testing import run_cli

EXTRA_CHECK = textwrap.dedent(
    '''
    from mcaudit import Check, CheckResult, Param, hookimpl

    class MeanConfidence(Check):
        name = "mean_confidence"
        description = "Mean top-class probability"
        params = {"scale": Param(1.0, "multiplier")}
        metrics = {"mean_confidence": "mean of the top-class probability"}

        def run(self, ctx, params):
            value = float(ctx.forward.probs.max(axis=1).mean()) * params["scale"]
            return CheckResult(metrics={"mean_confidence": value}, summary=f"mean confidence {value:.3f}")

    @hookimpl
    def mcaudit_register_checks(register):
        register(MeanConfidence)
    '''
)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_mcaudit_plugin.py").write_text(EXTRA_CHECK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_mcaudit_plugin"
    sys.modules.pop("my_mcaudit_plugin", None)


def test_nothing_is_loaded_at_import_time():
    import mcaudit

    assert not hasattr(mcaudit, "pm")
    a, b = make_plugin_manager(autoload=False), make_plugin_manager(autoload=False)
    assert a.pm is not b.pm  # a fresh manager per run


def test_builtins_are_registered_as_plugins():
    manager = make_plugin_manager(autoload=False)
    names = manager.plugin_names()
    assert [n for n, _ in DEFAULT_PLUGINS] == names
    catalog = build_catalog(manager)
    assert "performance" in catalog.checks
    assert any(info.name == "openclip" for _, info in catalog.loaders)
    assert {info.name for _, info in catalog.formats} >= {"csv", "imagefolder", "medmnist", "phantom"}


def test_block_a_builtin():
    manager = make_plugin_manager(block=["performance"], autoload=False)
    assert "performance" not in build_catalog(manager).checks


def test_p_loads_a_module_and_its_check_is_listed(plugin_module):
    out = run_cli(["plugins", "--json", "-p", plugin_module])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    check = next(c for c in info["checks"] if c["name"] == "mean_confidence")
    assert check["plugin"] == plugin_module
    assert check["params"]["scale"]["default"] == 1.0
    assert check["metrics"] == {"mean_confidence": "mean of the top-class probability"}


def test_third_party_check_runs_and_appears_in_report(plugin_module, tmp_path):
    out = run_cli(["run", "--quiet", "-p", plugin_module, "--checks", "performance,mean_confidence",
                   "--data", "phantom:n=40", "--model", "demo", "--set", "mean_confidence.scale=2"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    results = out.results
    value = results["checks"]["mean_confidence"]["metrics"]["mean_confidence"]
    assert 1.0 <= value <= 2.0  # twice a probability that is at least 1/2 for two classes
    assert 'id="check-mean_confidence"' in out.html


def test_unknown_hook_fails_early(tmp_path, monkeypatch):
    (tmp_path / "typo_plugin.py").write_text(
        "from mcaudit import hookimpl\n@hookimpl\ndef mcaudit_register_chekcs(register):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="mcaudit_register_chekcs"):
        make_plugin_manager(load=["typo_plugin"], autoload=False)
    out = run_cli(["plugins", "-p", "typo_plugin"])
    assert out.exit_code == 2
    assert "Traceback" not in out.output


def test_broken_entry_point_is_reported_and_skipped(monkeypatch, tmp_path, plugin_module):
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('missing dependency xyz')\n")
    eps = [
        EntryPoint("broken", "broken_plugin", "mcaudit"),
        EntryPoint("good", plugin_module, "mcaudit"),
    ]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [e for e in eps if e.group == group])
    monkeypatch.delenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    manager = make_plugin_manager()
    assert [f.name for f in manager.failed] == ["broken"]
    assert "missing dependency xyz" in manager.failed[0].error
    assert "mean_confidence" in build_catalog(manager).checks
    # the kill switch turns entry-point loading off
    monkeypatch.setenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "good" not in make_plugin_manager().plugin_names()
    # and -p no:NAME blocks one entry point
    monkeypatch.delenv("MCAUDIT_DISABLE_PLUGIN_AUTOLOAD")
    assert "good" not in make_plugin_manager(block=["good"]).plugin_names()


def test_first_result_wins_for_model_loading(tmp_path, monkeypatch):
    (tmp_path / "claim_plugin.py").write_text(textwrap.dedent(
        """
        from mcaudit import InputError, hookimpl

        @hookimpl
        def mcaudit_load_model(spec, request):
            if spec.startswith("medclip:"):
                raise InputError("medclip: claimed by claim_plugin")
            return None
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = run_cli(["run", "-p", "claim_plugin", "--model", "medclip:vit", "--data", "phantom:n=4"], tmp_path / "o")
    assert out.exit_code == 2
    assert "claimed by claim_plugin" in out.output
    out = run_cli(["run", "--model", "medclip:vit", "--data", "phantom:n=4"], tmp_path / "o")
    assert out.exit_code == 2 and "no loader claims" in out.output


def test_every_hook_is_documented_and_typed():
    import inspect

    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("mcaudit_")]
    assert len(specs) >= 6
    for spec in specs:
        assert spec.__doc__ and len(spec.__doc__.strip()) > 40, spec.__name__
        sig = inspect.signature(spec)
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), spec.__name__
