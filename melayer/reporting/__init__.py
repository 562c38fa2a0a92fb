"""Rendering only: console summaries, PNG plots, and the HTML report (``melayer.reporting.html(...)``)."""

from typing import Any


def __getattr__(name: str) -> Any:
    # ``melayer.reporting.html`` without importing jinja2 and matplotlib for every user of this package
    if name == "html":
        from melayer.reporting.page import html

        return html
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
