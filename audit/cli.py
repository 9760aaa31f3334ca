"""The ``mcaudit`` command line: run, plugins, gate, report."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

import click

from mcaudit import __version__
from mcaudit.errors import ExitCode, InputError
from mcaudit.output_targets import check_outputs_writable, requested_outputs, write_extra_outputs
from mcaudit.terminal import print_summary


class McauditGroup(click.Group):
    """Turns mcaudit's exceptions into the documented exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"mcaudit: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            # `mcaudit plugins | head`: the reader has gone; nothing more to say to it
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit flush from raising again
            ctx.exit(ExitCode.OK)
        except KeyboardInterrupt:
            click.echo("mcaudit: interrupted", err=True)
            ctx.exit(ExitCode.INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - anything else is a bug worth a traceback
            click.echo(traceback.format_exc(), err=True)
            click.echo(f"mcaudit: internal error: {type(exc).__name__}: {exc}", err=True)
            ctx.exit(ExitCode.INTERNAL)


plugin_option = click.option(
    "-p", "plugin_args", multiple=True, metavar="MODULE|no:NAME",
    help="Load a plugin module (dotted name or .py file), or block one with no:NAME.",
)


def split_plugin_args(args) -> tuple[list[str], list[str]]:
    load = [a for a in args if not a.startswith("no:")]
    block = [a[3:] for a in args if a.startswith("no:")]
    return load, block


@click.group(cls=McauditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mcaudit")
def cli():
    """Audit medical CLIP models for robustness and trustworthiness."""


@cli.command()
@click.option("--model", "models", multiple=True,
              help="Model spec: ARCH, arch.json, FOLDER, hf-hub:ORG/NAME, demo, or a plugin's form. Repeat to audit and compare several models.")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False),
              help="Weights (.safetensors/.pt/.pth/.bin); with several --model, one per model in the same order.")
@click.option("--label", "labels", multiple=True, help="The model's name in reports; with several --model, one per model.")
@click.option("--models", "models_file", type=click.Path(dir_okay=False),
              help="A models TOML ([[model]] tables: label, spec, checkpoint, reference_model): audit and compare them.")
@click.option("--data", help="Data: manifest.csv, an image folder, a MedMNIST .npz, or phantom:.")
@click.option("--prompts", type=click.Path(dir_okay=False), help="Prompt TOML: class phrasings and templates.")
@click.option("--group", "groups", multiple=True, help="Subgroup column for fairness (repeatable).")
@click.option("--checks", help="Comma-separated checks to run (default: all).")
@click.option("--out", help="Output folder (default mcaudit-report).")
@click.option("--gate", is_flag=False, flag_value="", default=None, metavar="[FILE]",
              help="Apply thresholds (from FILE, else mcaudit.toml / pyproject.toml, plus check defaults).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps (default auto).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Autocast precision (default fp32).")
@click.option("--batch-size", type=int, help="Images per batch (default 64).")
@click.option("--seed", type=int, help="Seed for subsampling and attacks (default 0).")
@click.option("--workers", type=int, help="DataLoader worker processes (default 0).")
@click.option("--threads", type=int, help="CPU threads for torch (default 0: automatic; one for tiny models).")
@click.option("--split", help="Split of a MedMNIST .npz (default test).")
@click.option("--profile", type=click.Choice(["quick", "standard", "thorough"]),
              help="Sample sizes, steps and restarts of every check together (default standard; quick for the demo).")
@click.option("--ood", help="Out-of-distribution data for the anomaly check (any data format).")
@click.option("--reference-model", help="The public model the audited one was fine-tuned from (any --model spec), for checks that compare against it.")
@click.option("--reference-checkpoint", type=click.Path(dir_okay=False), help="Weights for --reference-model.")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE", help="Format option, e.g. dicom_frame=middle.")
@click.option("--set", "set_params", multiple=True, metavar="CHECK.PARAM=VALUE", help="Check parameter.")
@click.option("--strict", is_flag=True, default=None,
              help="Nothing passes unseen: stop at the first unreadable image, and under --gate fail on any threshold or check not evaluated.")
@click.option("--allow-network", is_flag=True, default=None, help="Allow downloading model files.")
@click.option("--output", "output_args", multiple=True, metavar="FORMAT=PATH",
              help="Also write an output format (junit, markdown, or a plugin's; see `mcaudit plugins`).")
@click.option("--junit-xml", "junit_file", type=click.Path(), help="Same as --output junit=FILE (one test per threshold and finding).")
@click.option("--markdown", "markdown_file", type=click.Path(), help="Same as --output markdown=FILE (also appended to $GITHUB_STEP_SUMMARY when set).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Forward cache folder (default $XDG_CACHE_HOME/mcaudit or ~/.cache/mcaudit).")
@click.option("--no-cache", is_flag=True, default=None, help="Neither read nor write the forward cache.")
@click.option("--resume", is_flag=True, default=None, help="Take checks that an earlier, interrupted run of the same audit finished.")
@click.option("--quiet", "-q", is_flag=True, default=False, help="No progress bars or summary.")
@plugin_option
@click.pass_context
def run(ctx, config_file, set_params, data_options, plugin_args, quiet, junit_file, markdown_file, output_args,
        models, checkpoints, labels, models_file, **options):
    """Audit a model on a labelled image set; with no --model and --data, run the demo.
    With several models (--model repeated, or --models FILE) each is audited on the same
    images and settings, and the output folder's report compares them with paired statistics."""
    from mcaudit.multi_model import apply_model_options, audit_model_set
    from mcaudit.plugin_manager import make_plugin_manager
    from mcaudit.reports.writer import write_outputs
    from mcaudit.runner import apply_demo_defaults, run_audit

    cfg = run_config(config_file, options, data_options, set_params)
    entries = apply_model_options(cfg, list(models), list(checkpoints), list(labels), models_file)
    cfg.quiet = quiet
    demo = apply_demo_defaults(cfg)
    load, block = split_plugin_args(plugin_args)
    manager = make_plugin_manager(load=load, block=block)
    manager.quiet = quiet
    if not quiet:
        for failed in manager.failed:
            click.echo(f"mcaudit: warning: plugin {failed.name} failed to load and was skipped: {failed.error}", err=True)
        for note in manager.warnings:
            click.echo(f"mcaudit: warning: {note}", err=True)
        if demo:
            click.echo("mcaudit: no --model/--data given: auditing the embedded demo model on synthetic phantoms", err=True)
    from mcaudit.distributed import barrier, shutdown
    from mcaudit.reports.atomic import check_writable, output_lock

    out = Path(cfg.out)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes
    # Outputs that cannot be written are found now, not after the audit has run.
    extra_outputs = requested_outputs(manager, output_args, junit_file, markdown_file)
    if is_main:
        check_writable(out)
        check_outputs_writable(extra_outputs)
    if entries:
        with output_lock(out) if is_main else contextlib.nullcontext(), interrupt_guard() as interrupted:
            code = audit_model_set(cfg, manager, entries, out, extra_outputs, interrupted)
        ctx.exit(code)
    with output_lock(out) if is_main else contextlib.nullcontext(), interrupt_guard() as interrupted:
        audit = run_audit(cfg, manager)
        if interrupted():
            # A Ctrl-C that landed in a finalizer was swallowed by Python; it still stops the run.
            raise KeyboardInterrupt
        if audit.world.is_main:
            write_outputs(audit, out, manager)
            write_extra_outputs(audit.results, extra_outputs)
            if not quiet:
                print_summary(audit.results)
            click.echo(f"report: {out / 'index.html'}")
    barrier(audit.world)
    shutdown(audit.world)
    ctx.exit(audit.exit_code)


def run_config(config_file, options, data_options, set_params):
    """The run's settings: the config file's, then the options given."""
    from mcaudit.config import RunConfig, apply_config_file, default_config_file, parse_data_options, parse_set

    cfg = RunConfig()
    source = Path(config_file) if config_file else default_config_file()
    if config_file and not Path(config_file).is_file():
        raise InputError(f"--config {config_file}: no such file")
    if source is not None:
        apply_config_file(cfg, source)
    for key, value in options.items():
        if value is None or value == ():
            continue
        if key == "checks":
            value = [c.strip() for c in value.split(",") if c.strip()]
        elif key == "groups":
            value = list(value)
        setattr(cfg, key, value)
    cfg.data_options.update(parse_data_options(list(data_options)))
    for check, params in parse_set(list(set_params)).items():
        cfg.check_params.setdefault(check, {}).update(params)
    return cfg


@contextlib.contextmanager
def interrupt_guard():
    """Remember any Ctrl-C during the run, even one raised inside a finalizer (where Python
    prints it and carries on), so the run cannot go on to replace the report and exit 0."""
    import signal
    import threading

    seen = {"interrupt": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def on_sigint(signum, frame):
        seen["interrupt"] = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: seen["interrupt"]
    finally:
        signal.signal(signal.SIGINT, previous)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@plugin_option
def plugins(as_json, plugin_args):
    """List plugins, checks (with metrics and parameters), model loaders and data formats."""
    from mcaudit.catalog import build_catalog
    from mcaudit.plugin_manager import make_plugin_manager
    from mcaudit.terminal import plugin_listing, print_plugin_listing

    load, block = split_plugin_args(plugin_args)
    manager = make_plugin_manager(load=load, block=block)
    manager.quiet = True  # the listing shows the plugins that failed
    info = plugin_listing(manager, build_catalog(manager))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        print_plugin_listing(info)


def read_results(path: str) -> dict:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a results.json file ({exc})") from exc
    if isinstance(results, dict) and results.get("kind") == "models":
        labels = ", ".join(results.get("models") or {})
        raise InputError(f"{path}: the results of a multi-model audit ({labels}); use each model's "
                         "models/LABEL/results.json, or `mcaudit compare` on them")
    if not isinstance(results, dict) or "checks" not in results:
        raise InputError(f"{path}: not a mcaudit results.json (no 'checks')")
    from mcaudit.reports.compare import check_numbers

    check_numbers(results, path)
    return results


@cli.command()
@click.argument("results_file", type=click.Path(dir_okay=False))
@click.option("--thresholds", type=click.Path(dir_okay=False), help="Threshold TOML (default: mcaudit.toml / pyproject.toml).")
@click.option("--no-defaults", is_flag=True, help="Ignore the checks' default thresholds.")
@click.option("--strict", is_flag=True, help="Fail on any threshold or check not evaluated.")
@click.option("--output", "output_args", multiple=True, metavar="FORMAT=PATH", help="Also write an output format (junit, markdown, a plugin's).")
@click.option("--junit-xml", "junit_file", type=click.Path(), help="Same as --output junit=FILE.")
@click.option("--markdown", "markdown_file", type=click.Path(), help="Same as --output markdown=FILE.")
@plugin_option
@click.pass_context
def gate(ctx, results_file, thresholds, no_defaults, strict, junit_file, markdown_file, output_args, plugin_args):
    """Re-apply thresholds to a results.json without running anything."""
    from mcaudit.catalog import build_catalog
    from mcaudit.gating import apply_gate, collect_thresholds, gate_policy, recorded_defaults
    from mcaudit.plugin_manager import make_plugin_manager
    from mcaudit.runner import exit_code

    results = read_results(results_file)
    load, block = split_plugin_args(plugin_args)
    manager = make_plugin_manager(load=load, block=block)
    extra_outputs = requested_outputs(manager, output_args, junit_file, markdown_file)
    check_outputs_writable(extra_outputs)
    defaults = {}
    recorded = None if no_defaults else recorded_defaults(results)
    if recorded is not None:
        defaults = recorded  # the defaults the run was judged by, whatever plugins are installed now
    elif not no_defaults:
        catalog = build_catalog(manager)
        for name in results["checks"]:
            cls = catalog.checks.get(name)
            if cls is not None:
                defaults.update({f"{name}.{m}": v for m, v in cls.default_thresholds.items()})
    policy_table: dict = {}
    found = collect_thresholds(thresholds or "", {}, defaults, policy_out=policy_table)
    if not found:
        raise InputError("no thresholds: pass --thresholds FILE or add [thresholds] to mcaudit.toml")
    apply_gate(results, found, gated=True, policy=gate_policy(policy_table, strict=strict))
    write_extra_outputs(results, extra_outputs)
    print_summary(results)
    ctx.exit(exit_code(results))


@cli.command()
@click.argument("results_file", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="HTML file to write (default: index.html beside results.json).")
@plugin_option
def report(results_file, out, plugin_args):
    """Re-render the HTML report from a results.json."""
    from mcaudit.plugin_manager import make_plugin_manager
    from mcaudit.reports.atomic import check_file_writable, write_files_atomically
    from mcaudit.reports.html import render_html
    from mcaudit.reports.writer import plugin_sections

    results = read_results(results_file)
    target = Path(out) if out else Path(results_file).parent / "index.html"
    check_file_writable(target, "--out")  # before anything is rendered
    load, block = split_plugin_args(plugin_args)
    manager = make_plugin_manager(load=load, block=block)
    if "verdict" not in results:
        # A results.json from before the status model: derive statuses from the checks' defaults.
        from mcaudit.catalog import build_catalog
        from mcaudit.gating import apply_gate, collect_thresholds

        catalog = build_catalog(manager)
        defaults = {f"{n}.{m}": v for n in results["checks"] if n in catalog.checks
                    for m, v in catalog.checks[n].default_thresholds.items()}
        apply_gate(results, collect_thresholds(None, {}, defaults), gated=False)
    # Figures, thumbnails and the images table come from the run folder beside results.json.
    folder = Path(results_file).parent
    samples = folder / "samples.csv"
    page = render_html(results, plugin_sections(manager, results), folder=folder,
                       samples=samples.read_text(encoding="utf-8") if samples.is_file() else None)
    write_files_atomically(target.parent, {target.name: page})
    click.echo(f"report: {target}")


@cli.command()
@click.argument("run_files", nargs=-1, required=True, type=click.Path())
@click.option("--max-drop", type=float, default=None, help="Fail (exit 1) when a metric of the last run is worse than the first's by more than this.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Also write the comparison as HTML.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), help="Also write the paired comparison as JSON.")
@click.option("--label", "labels", multiple=True, help="A name for each run, in order (default: its folder's name).")
@click.pass_context
def compare(ctx, run_files, max_drop, html_file, json_file, labels):
    """Compare runs (results.json files or run folders): metric deltas from the first to the
    last and, when the runs share their images, seed and settings (several models audited
    the same way), the paired comparison of every pair of models with the ranking."""
    from mcaudit.comparison import compare_runs, comparison_text, load_runs
    from mcaudit.reports.atomic import check_file_writable, write_files_atomically
    from mcaudit.reports.compare import check_numbers, compare_html, compare_results, compare_text, regressions
    from mcaudit.reports.writer import results_json

    if labels and len(labels) != len(run_files):
        raise InputError(f"--label given {len(labels)} times for {len(run_files)} runs: give one per run")
    if max_drop is not None and max_drop < 0:
        raise InputError(f"--max-drop {max_drop}: must be zero or positive")
    for target, option in ((html_file, "--html"), (json_file, "--json")):
        if target:
            check_file_writable(Path(target), option)
    runs = load_runs(run_files, labels)
    if len(runs) < 2:
        raise InputError("compare: give at least two runs (results.json files, run folders or a multi-model audit's folder)")
    for run in runs:
        check_numbers(run.results, run.source)
    first, last = runs[0].results, runs[-1].results
    deltas = compare_results(first, last)
    click.echo(compare_text(deltas, max_drop), nl=False)
    comparison = compare_runs(runs)
    click.echo(comparison_text(comparison), nl=False)
    if html_file:
        target = Path(html_file)
        page = compare_html(first, runs[1].results, deltas, max_drop, more=[r.results for r in runs[2:]],
                            comparison=comparison)
        write_files_atomically(target.parent, {target.name: page})
    if json_file:
        target = Path(json_file)
        write_files_atomically(target.parent, {target.name: results_json(comparison)})
    if max_drop is not None:
        bad = regressions(deltas, max_drop)
        click.echo(f"{len(bad)} regression(s) beyond {max_drop:g}")
        ctx.exit(ExitCode.FAILED if bad else ExitCode.OK)


def main() -> None:
    cli(prog_name="mcaudit")


if __name__ == "__main__":
    main()
