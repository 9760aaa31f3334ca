"""The built-in output formats, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from mcaudit.hookimpl import hookimpl
from mcaudit.hook_types import OutputFormat


def _junit(results):
    from mcaudit.reports.junit import junit_xml

    return junit_xml(results)


def _markdown(results):
    from mcaudit.reports.markdown import markdown_summary

    return markdown_summary(results)


@hookimpl
def mcaudit_register_output_formats(register):
    register(OutputFormat("junit", "JUnit XML: one test case per threshold and finding; not evaluated is <skipped>", _junit))
    register(OutputFormat("markdown", "Markdown summary for pull requests and $GITHUB_STEP_SUMMARY", _markdown))
