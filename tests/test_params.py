"""Check parameters: declarative bounds checked before the model loads, comma lists, and an
InputError from a check's run() being a usage error."""

from __future__ import annotations

import pytest

from mcaudit import InputError, Param
from mcaudit.testing import run_cli


def test_bounds_choices_and_element_types():
    assert Param([0.25], "sigmas", min=0).coerce("0.1,0.2", "c.sigmas") == [0.1, 0.2]
    assert Param([0.25], "sigmas").coerce([1, 2], "c.sigmas") == [1.0, 2.0]
    with pytest.raises(InputError, match=r"c.sigmas\[1\]: -1.0 is below the minimum 0"):
        Param([0.25], "sigmas", min=0).coerce("0.1,-1", "c.sigmas")
    with pytest.raises(InputError, match=r"c.sigmas\[0\]: expected a float"):
        Param([0.25], "sigmas").coerce(["a"], "c.sigmas")
    with pytest.raises(InputError, match="above the maximum 1"):
        Param(0.5, "fraction", min=0, max=1).coerce(1.5, "c.fraction")
    with pytest.raises(InputError, match="expected a float"):
        Param(0.5, "fraction").coerce(float("nan"), "c.fraction")
    with pytest.raises(InputError, match="not one of"):
        Param(["a"], "methods", choices=("a", "b")).coerce(["a", "c"], "c.methods")

    def even(v):
        if v % 2:
            raise ValueError("must be even")

    with pytest.raises(InputError, match="c.n: must be even"):
        Param(2, "n", validate=even).coerce(3, "c.n")


PLUGIN = """
from mcaudit import Check, CheckResult, InputError, Param, hookimpl
class Bounded(Check):
    name = "bounded"
    description = "a parameter with bounds"
    params = {"n_bins": Param(10, "bins", min=2)}
    metrics = {"x": "a number"}
    default_thresholds = {"x": ">= 0"}
    def run(self, ctx, params):
        if ctx.options.get("raise_input_error"):
            raise InputError("bounded: planted bad input")
        return CheckResult(metrics={"x": 1.0})
class RaisesInput(Check):
    name = "raises_input"
    description = "raises InputError inside run"
    def run(self, ctx, params):
        raise InputError("raises_input: the data lack what this check needs")
@hookimpl
def mcaudit_register_checks(register):
    register(Bounded)
    register(RaisesInput)
"""


def test_out_of_bounds_parameter_stops_before_the_model_loads(tmp_path, monkeypatch, mcaudit_encoder_calls):
    (tmp_path / "bounded_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = run_cli(["run", "--quiet", "-p", "bounded_plugin", "--model", "demo", "--data", "phantom:n=12",
                   "--checks", "bounded", "--set", "bounded.n_bins=0"], tmp_path / "o")
    assert out.exit_code == 2 and "bounded.n_bins: 0 is below the minimum 2" in out.output
    assert mcaudit_encoder_calls == []


def test_input_error_inside_run_is_a_usage_error(tmp_path, monkeypatch):
    (tmp_path / "bounded_plugin2.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = run_cli(["run", "--quiet", "-p", "bounded_plugin2", "--model", "demo", "--data", "phantom:n=12",
                   "--checks", "raises_input"], tmp_path / "o")
    assert out.exit_code == 2 and "mcaudit: error: raises_input: the data lack" in out.output
    assert "Traceback" not in out.output


def test_exclusive_bounds_and_nonempty_lists():
    from mcaudit import InputError, Param

    rate = Param(0.1, "a learning rate", above=0)
    assert rate.coerce(0.5, "x.lr") == 0.5
    with pytest.raises(InputError, match=r"x.lr: 0.0 must be above 0"):
        rate.coerce(0.0, "x.lr")
    share = Param(0.5, "a fraction", above=0, below=1)
    with pytest.raises(InputError, match=r"must be below 1"):
        share.coerce(1.0, "x.share")
    sigmas = Param([0.25], "noise levels", above=0, nonempty=True)
    assert sigmas.coerce("0.1,0.5", "x.sigmas") == [0.1, 0.5]
    with pytest.raises(InputError, match=r"x.sigmas\[1\]: -0.5 must be above 0"):
        sigmas.coerce([0.1, -0.5], "x.sigmas")
    with pytest.raises(InputError, match="give at least one value"):
        sigmas.coerce([], "x.sigmas")
