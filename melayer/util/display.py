"""Notebook display of result objects, without a dependency from the analysis stages on ``report/``.

Result classes mix in :class:`HtmlRepr`; their ``_repr_html_`` asks the renderer registered here. The
package root (``melayer/__init__.py``) registers :func:`melayer.reporting.page.repr_html` lazily, so jinja2
and matplotlib are imported only when a notebook actually displays a result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_renderer: Callable[[Any], str] | None = None


def set_renderer(fn: Callable[[Any], str] | None) -> None:
    """Install the function that turns a result object (with ``to_dict()``) into an HTML fragment."""
    global _renderer
    _renderer = fn


class HtmlRepr:
    """Mixin: Jupyter shows the result as the report's sections for it (plain ``repr`` when none is set)."""

    def _repr_html_(self) -> str | None:
        return None if _renderer is None else _renderer(self)
