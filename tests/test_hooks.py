"""Third-party data formats, loader descriptions and report sections through the hooks."""

from __future__ import annotations

import json
import textwrap

from mcaudit.testing import run_cli

PLUGIN = textwrap.dedent(
    '''
    import hashlib
    import numpy as np
    from markupsafe import escape
    from mcaudit import AuditDataset, FormatInfo, LoaderInfo, Record, ReportSection, hookimpl

    class StripesDataset(AuditDataset):
        def load_pixels(self, index):
            label = self.records[index].label
            img = np.zeros((16, 16, 3), np.float32)
            if label:
                img[::4] = 1.0
            return img, True

    @hookimpl
    def mcaudit_register_data_formats(register):
        register(FormatInfo("stripes", ("stripes:N",), "synthetic stripes"))

    @hookimpl
    def mcaudit_register_model_loaders(register):
        register(LoaderInfo("nothing", ("nothing:",), "describes a loader it never loads"))

    @hookimpl
    def mcaudit_load_dataset(spec, request):
        if not spec.startswith("stripes:"):
            return None
        n = int(spec.split(":")[1])
        records = [Record(source=f"s{i}", label=i % 2) for i in range(n)]
        return StripesDataset(spec=spec, records=records, classes=["plain", "striped"],
                              image_size=request.image_size,
                              fingerprint=hashlib.sha256(spec.encode()).hexdigest(), format_name="stripes")

    @hookimpl
    def mcaudit_report_sections(results):
        spec = results["dataset"]["spec"]
        return [ReportSection("Site notes", f"<p class=note>data: {escape(spec)}</p>", "site-notes")]
    '''
)


def test_data_format_loader_info_and_report_section(tmp_path, monkeypatch):
    (tmp_path / "stripes_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    info = json.loads(run_cli(["plugins", "--json", "-p", "stripes_plugin"]).output)
    assert {"plugin": "stripes_plugin", "name": "stripes", "spec_forms": ["stripes:N"], "description": "synthetic stripes"} in info["formats"]
    assert any(ld["name"] == "nothing" and ld["plugin"] == "stripes_plugin" for ld in info["loaders"])
    out = run_cli(["run", "--quiet", "-p", "stripes_plugin", "--model", "demo", "--data", "stripes:10", "--checks", "performance"], tmp_path / "o")
    assert out.exit_code == 0, out.output
    assert out.results["dataset"]["format"] == "stripes" and out.results["dataset"]["images"] == 10
    assert '<section id="site-notes"><h2>Site notes</h2><p class=note>data: stripes:10</p>' in out.html
