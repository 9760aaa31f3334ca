"""What the page says, rendered from a results.json: plain titles and sentences, glossary
links, long content folded, a third-party check's own words, the script's CSP hash."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest

from mcaudit.reports import glossary
from mcaudit.reports.html import render_html, script
from mcaudit.testing import run_cli


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = run_cli(["run", "--quiet", "--model", "demo", "--data", "phantom:n=60", "--checks", "performance,calibration"],
                  tmp_path_factory.mktemp("r") / "o")
    assert out.exit_code == 0, out.output
    return json.loads((out.out_dir / "results.json").read_text()), out.out_dir


def test_plain_words_and_glossary(results):
    r, folder = results
    html = render_html(r, folder=folder)
    assert "How often the model is right" in html and "Whether its confidence can be trusted" in html
    acc = round(100 * r["checks"]["performance"]["metrics"]["accuracy"])
    assert f"The model names the right class for {acc}% of the images" in html
    for term, anchor in glossary.terms_for("calibration"):
        assert f'href="#{anchor}"' in html and f'id="{anchor}"' in html, term
    checks = re.sub(r"<[^>]+>", " ", html.split("<h3>Checks</h3>")[1].split("</table>")[0])
    assert "How often the model is right" in checks  # the summary table leads with words, the name after


def test_long_content_is_folded_and_own_words_are_used(results):
    r, folder = results
    r = json.loads(json.dumps(r))
    entry = r["checks"]["performance"]
    entry["tables"] = [{"title": f"table {i}", "columns": ["group", "n"], "rows": [["a", 1]], "note": ""} for i in range(9)]
    entry["warnings"] = [f"caveat {i}" for i in range(7)]
    entry["findings"] = [{"status": "warn", "message": f"finding {i}", "metric": None, "severity": 1.0} for i in range(5)]
    figure = dict(entry["figures"][0])
    entry["figures"] = [dict(figure, title=f"figure {i}") for i in range(7)]
    entry["details"] = {"title": "Our own title", "plain_summary": "Our own plain sentence."}
    html = render_html(r, folder=folder)
    start = html.index('id="check-performance"')
    section = html[start:html.index("</section>", start)]
    assert "Our own title" in section and "Our own plain sentence." in section
    assert "5 more tables</summary>" in section and "4 more caveats</summary>" in section
    assert section.index("table 3") < section.index("5 more tables") < section.index("table 4")
    # the first three findings and four figures open, the rest one click away (and printed)
    assert section.index("finding 2") < section.index("2 more findings</summary>") < section.index("finding 3")
    assert section.index("figure 3<") < section.index("3 more figures</summary>") < section.index("figure 4<")
    assert section.count('<figure class="plot"><img') == 7


def test_the_script_is_allowed_by_its_hash_only(results):
    r, folder = results
    html = render_html(r, folder=folder)
    text, digest = script()
    expected = "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    assert digest == expected and f"script-src '{expected}'" in html
    assert html.count("<script") == 1 and f"<script>{text}</script>" in html
    assert "unsafe-inline'; script-src" in html and "script-src 'unsafe" not in html
