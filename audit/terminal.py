"""What mcaudit prints in the terminal: the summary after a run and the ``mcaudit plugins``
listing (plugins, checks with their parameters, metrics, thresholds and profiles, loaders,
data formats, output formats)."""

from __future__ import annotations

import click


def print_summary(results) -> None:
    from mcaudit.reports.verdicts import caveats, policy_words, status_word

    d = results["dataset"]
    click.echo(f"{results['model']['spec']} on {d['spec']}: {d['images']} images scored, {d['skipped']} skipped "
               f"(profile {results.get('config', {}).get('profile') or 'standard'})")
    for name, check in results["checks"].items():
        click.echo(f"  {name:<20} {status_word(check['status']):<14} {check.get('status_reason', '')}")
    verdict = results.get("verdict") or {}
    outcomes = (results.get("gate") or {}).get("results", [])
    if outcomes:
        click.echo("thresholds:")
        for o in outcomes:
            click.echo(f"  {status_word(o['status']):<14} {o['sentence']}")
    findings = verdict.get("findings", [])
    if findings:
        click.echo("findings, worst first:")
        for f in findings[:12]:
            click.echo(f"  {status_word(f['status']):<14} {f['text']}")
        if len(findings) > 12:
            click.echo(f"  ... and {len(findings) - 12} more in the report")
    notes = caveats(results)
    if notes:
        click.echo(f"caveats ({len(notes)}):")
        for check, text in notes[:10]:
            click.echo(f"  {check}: {text}")
        if len(notes) > 10:
            click.echo(f"  ... and {len(notes) - 10} more in the report")
    click.echo(f"verdict: {verdict.get('headline', '')}")
    gate = results.get("gate") or {}
    if gate.get("applied"):
        click.echo(f"gate: {'passed' if gate['passed'] else 'FAILED'} ({policy_words(gate['policy'])})")
    else:
        click.echo("not gated: the exit code ignores the verdict (add --gate to make it fail CI)")


def plugin_listing(manager, catalog) -> dict:
    """What ``mcaudit plugins --json`` prints, and the text listing is made from."""
    pm = manager.pm
    return {
        "plugins": [
            {
                "name": name,
                "source": manager.sources.get(name, ""),
                "hooks": sorted({hc.name for hc in (pm.get_hookcallers(plugin) or [])}),
            }
            for name, plugin in pm.list_name_plugin()
            if plugin is not None
        ],
        "failed": [{"name": f.name, "source": f.source, "error": f.error} for f in manager.failed],
        "warnings": list(manager.warnings),
        "checks": [cls.describe() | {"plugin": catalog.check_plugins[name]} for name, cls in catalog.checks.items()],
        "loaders": [{"plugin": p, "name": i.name, "spec_forms": list(i.spec_forms), "description": i.description} for p, i in catalog.loaders],
        "formats": [{"plugin": p, "name": i.name, "spec_forms": list(i.spec_forms), "description": i.description} for p, i in catalog.formats],
        "outputs": [{"plugin": p, "name": f.name, "description": f.description} for p, f in catalog.outputs.values()],
    }


def print_plugin_listing(info: dict) -> None:
    click.echo("Plugins:")
    for p in info["plugins"]:
        click.echo(f"  {p['name']:<22} {p['source']}")
    for f in info["failed"]:
        click.echo(f"  {f['name']:<22} FAILED to load: {f['error']}")
    for note in info["warnings"]:
        click.echo(f"  warning: {note}")
    click.echo("\nChecks:")
    for c in info["checks"]:
        _print_check(c)
    for title, key, option in (("Model loaders", "loaders", "--model"), ("Data formats", "formats", None),
                               ("Output formats (--output NAME=PATH)", "outputs", None)):
        click.echo(f"\n{title}:")
        for item in info[key]:
            click.echo(f"  {item['name']} ({item['plugin']}): {item['description']}")
            for form in item.get("spec_forms", []) if option else []:
                click.echo(f"      {option} {form}")


def _print_check(c: dict) -> None:
    click.echo(f"  {c['name']} ({c['plugin']}): {c['description']}")
    for k, p in c["params"].items():
        click.echo(f"      --set {c['name']}.{k}={p['default']!r}  {p['help']}")
    for k, m in c["metrics"].items():
        click.echo(f"      metric {k}: {m}")
    for k, t in c["default_thresholds"].items():
        rule = t if isinstance(t, str) else t.get("rule", "") + "".join(
            f", {key} {t[key]}" for key in ("on", "severity") if key in t)
        reason = c.get("threshold_reasons", {}).get(k)
        click.echo(f"      default threshold {c['name']}.{k} {rule}" + (f"  ({reason})" if reason else ""))
    for name, values in c.get("profiles", {}).items():
        click.echo(f"      --profile {name}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
