"""The building blocks of the report's sections, shared by every analysis's ``sections`` builder.

A section is a plain dict the template renders: ``{"id", "title", "kind", "source", "blocks": [...]}``; a
block is a paragraph (``p``, markup-safe text), a ``table`` (caption, header, rows), a ``figure`` (inline SVG,
caption, alt text, optionally a plotly spec), a ``list``, ``details`` or a ``dl`` (key -> value). Nothing here
computes results: every number comes from the JSON a melayer command wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from markupsafe import Markup

from melayer.reporting.format import num
from melayer.reporting.plotting import to_svg

Section = dict[str, Any]


def p(text: str, *args: Any) -> dict[str, Any]:
    """A paragraph; ``text`` is trusted markup from this module, ``args`` are escaped into it."""
    return {"kind": "p", "html": Markup(text).format(*args)}


def table(caption: str, header: list[str], rows: list[list[Any]], note: str | None = None,
          numeric: bool = True, highlight: set[int] | None = None) -> dict[str, Any]:
    return {"kind": "table", "caption": caption, "header": header, "rows": [[str(c) for c in r] for r in rows],
            "note": note, "numeric": numeric, "highlight": highlight or set()}


class Figures:
    """Renders figures to inline SVG with ids unique in the page; keeps plotly specs when interactive."""

    def __init__(self, interactive: bool = False, prefix: str = "fig") -> None:
        self.n = 0
        self.interactive = interactive
        self.prefix = prefix  # notebook fragments get a unique one: many may share one page

    def figure(self, build: Callable[[], Any], caption: str, alt: str, plotly: Callable[[], Any] | None = None,
               wide: bool = True) -> dict[str, Any]:
        self.n += 1
        fig_id = f"{self.prefix}{self.n}"
        spec = None
        if self.interactive and plotly is not None:
            from melayer.reporting import interactive as I

            spec = I.to_json(plotly())
        return {"kind": "figure", "id": fig_id, "svg": Markup(to_svg(build(), f"melayer-{fig_id}", alt)),
                "caption": caption, "alt": alt, "number": self.n, "plotly": spec, "wide": wide}


def model_line(d: dict[str, Any]) -> Markup:
    parts = []
    if d.get("arch"):
        parts.append(str(d["arch"]))
    if d.get("num_layers"):
        parts.append(f"{d['num_layers']} decoder layers")
    if d.get("hidden_size"):
        parts.append(f"hidden size {d['hidden_size']}")
    if d.get("dtype"):
        parts.append(str(d["dtype"]))
    return Markup("<b>{}</b>{}").format(d.get("model", "?"), f" ({', '.join(parts)})" if parts else "")


def plain_sections(d: dict[str, Any], figs: Figures, title: str) -> list[Section]:
    """An analysis registered without sections of its own: a table of its top-level values (numbers, text)."""
    rows = [[k, num(v)] for k, v in d.items() if k != "schema" and (v is None or isinstance(v, (int, float, str)))]
    return [{"id": "", "title": title, "blocks": [table("Values", ["field", "value"], rows, numeric=False)]}]
