"""Nothing lost: the output set is replaced whole, locked, checked before the run, and a
failing report section costs only that section."""

from __future__ import annotations

import os

import pytest

from mcaudit.errors import InputError
from mcaudit.reports import atomic
from mcaudit.testing import run_cli

SMALL = ["--model", "demo", "--data", "phantom:n=20", "--checks", "performance"]


def test_folder_is_replaced_whole_and_a_kill_between_renames_is_recovered(tmp_path, monkeypatch):
    out = tmp_path / "report"
    atomic.replace_folder(out, {"results.json": "old", "samples.csv": "old", "index.html": "old"})
    atomic.replace_folder(out, {"results.json": "new", "samples.csv": "new", "index.html": "new"})
    assert {p.name: p.read_text() for p in out.iterdir()} == {"results.json": "new", "samples.csv": "new", "index.html": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging or old folders left

    # Without an atomic exchange, a kill after moving the old set aside leaves no --out; the
    # next run (holding the lock) restores the old set whole before doing anything else.
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def killed_after_first(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(atomic.os, "rename", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_folder(out, {"results.json": "newer", "samples.csv": "newer", "index.html": "newer"})
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert not out.exists()
    with atomic.output_lock(out):
        pass
    assert {p.name: p.read_text() for p in out.iterdir()} == {"results.json": "new", "samples.csv": "new", "index.html": "new"}
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".staging-" in p.name]


def test_stale_temporaries_are_cleaned(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / ".results.json.abc.tmp").write_text("half")
    (tmp_path / ".report.staging-xyz").mkdir()
    with atomic.output_lock(out):
        pass
    assert not (out / ".results.json.abc.tmp").exists() and not (tmp_path / ".report.staging-xyz").exists()


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "report"
    with atomic.output_lock(out):
        with pytest.raises(InputError, match="another mcaudit run is writing this folder"):
            with atomic.output_lock(out):
                pass


@pytest.mark.parametrize("make_bad,option,message", [
    (lambda t: (t / "file").write_text("x") and ["--out", t / "file"], "--out", "is a file"),
    (lambda t: (t / "file").write_text("x") and ["--out", t / "file" / "sub"], "--out", "is a file"),
    (lambda t: (t / "d").mkdir() or ["--junit-xml", t / "d"], "--junit-xml", "is a folder"),
    (lambda t: ["--markdown", "/proc/mcaudit-no-such/summary.md"], "--markdown", "cannot write there"),
    (lambda t: ["--out", "/proc/mcaudit-no-such/report"], "--out", "cannot write there"),
    (lambda t: (t / "full").mkdir() or (t / "full" / "notes.txt").write_text("mine") and ["--out", t / "full"],
     "--out", "holds files mcaudit did not write"),
])
def test_unwritable_outputs_are_found_before_the_audit(tmp_path, mcaudit_encoder_calls, make_bad, option, message):
    extra = make_bad(tmp_path)
    out = run_cli(["run", "--quiet", *SMALL, *extra], tmp_path / "o")
    assert out.exit_code == 2 and message in out.output and option in out.output, out.output
    assert mcaudit_encoder_calls == []  # the model never ran


def test_a_failing_report_section_costs_only_that_section(tmp_path, monkeypatch):
    (tmp_path / "bad_section.py").write_text(
        "from mcaudit import hookimpl\n"
        "@hookimpl\ndef mcaudit_report_sections(results):\n    raise RuntimeError('planted section failure')\n")
    (tmp_path / "wrong_type_section.py").write_text(
        "from mcaudit import hookimpl\n"
        "@hookimpl\ndef mcaudit_report_sections(results):\n    return 'not a list'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = run_cli(["run", "--quiet", *SMALL, "-p", "bad_section", "-p", "wrong_type_section"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    assert out.results["checks"]["performance"]["execution"] == "completed"
    assert (out.out_dir / "samples.csv").exists()
    html = out.html
    assert "Section of plugin bad_section (failed)" in html and "planted section failure" in html
    assert "Section of plugin wrong_type_section (failed)" in html and "not a list of ReportSection" in html


SARIF_PLUGIN = """
import json
from mcaudit import OutputFormat, hookimpl

def sarif(results):
    findings = results["verdict"]["findings"]
    return json.dumps({"version": "2.1.0", "runs": [{"results": [
        {"level": "error" if f["status"] in ("fail", "error") else "warning", "message": {"text": f["text"]}}
        for f in findings]}]})

@hookimpl
def mcaudit_register_output_formats(register):
    register(OutputFormat("sarif", "SARIF for code-scanning dashboards", sarif))
"""


def test_output_format_plugin_writes_through_the_hook(tmp_path, monkeypatch):
    import json

    (tmp_path / "sarif_output.py").write_text(SARIF_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    target = tmp_path / "ci" / "audit.sarif"
    gate = tmp_path / "g.toml"
    gate.write_text('"performance.accuracy" = { rule = "<= 0.01", on = "value" }\n')
    out = run_cli(["run", "--quiet", *SMALL, "-p", "sarif_output", "--output", f"sarif={target}",
                   "--output", f"junit={tmp_path / 'j.xml'}", "--gate", gate], tmp_path / "o")
    assert out.exit_code == 1, out.output
    sarif = json.loads(target.read_text())
    first = sarif["runs"][0]["results"][0]
    assert first["level"] == "error" and first["message"]["text"] == out.results["verdict"]["findings"][0]["text"]
    assert (tmp_path / "j.xml").read_text().startswith("<?xml")
    unknown = run_cli(["run", "--quiet", *SMALL, "--output", f"sarif={target}"], tmp_path / "o2")
    assert unknown.exit_code == 2 and "--output sarif: no output format 'sarif' (formats: junit, markdown)" in unknown.output
    listed = run_cli(["plugins", "-p", "sarif_output"])
    assert "sarif (sarif_output): SARIF for code-scanning dashboards" in listed.output
    regate = run_cli(["gate", str(tmp_path / "o" / "results.json"), "--thresholds", str(gate), "-p", "sarif_output",
                      "--output", f"sarif={tmp_path / 'again.sarif'}"])
    assert regate.exit_code == 1 and json.loads((tmp_path / "again.sarif").read_text())["runs"][0]["results"]


FINALIZER_INTERRUPT = """
import gc, os, signal
from mcaudit import Check, CheckResult, hookimpl

class Interrupts:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arriving while a finalizer runs

class Finalizes(Check):
    name = "finalizes"
    description = "a Ctrl-C lands in a finalizer"
    metrics = {"x": "a number"}
    default_thresholds = {"x": ">= 0"}
    def run(self, ctx, params):
        Interrupts()
        gc.collect()
        return CheckResult(metrics={"x": 1.0})

@hookimpl
def mcaudit_register_checks(register):
    register(Finalizes)
"""


def test_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run(tmp_path):
    import subprocess
    import sys

    (tmp_path / "finalizer_interrupt.py").write_text(FINALIZER_INTERRUPT)
    out = tmp_path / "report"
    atomic.replace_folder(out, {"results.json": "old", "samples.csv": "old", "index.html": "old"})
    env = dict(os.environ, PYTHONPATH=str(tmp_path), MCAUDIT_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, "-m", "mcaudit", "run", "--quiet", "-p", "finalizer_interrupt", *SMALL[:4],
                           "--checks", "finalizes", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert (out / "results.json").read_text() == "old"  # the old report stands


def test_report_to_an_unwritable_place_is_a_usage_error(tmp_path):
    run = run_cli(["run", "--quiet", *SMALL], tmp_path / "o")
    (tmp_path / "afile").write_text("x")
    out = run_cli(["report", str(run.out_dir / "results.json"), "--out", str(tmp_path / "afile" / "r.html")])
    assert out.exit_code == 2 and "--out" in out.output and "Traceback" not in out.output
