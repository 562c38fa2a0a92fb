"""Rendering only: console summaries, PNG plots, and the HTML report (``melayer.report.html(...)``)."""

from typing import Any


def __getattr__(name: str) -> Any:
    # ``melayer.report.html`` without importing jinja2 and matplotlib for every user of this package
    if name == "html":
        from melayer.report.page import html

        return html
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
