"""What the interactive figures share (plotly), for ``melayer report --interactive``.

The page inlines plotly's own bundled JavaScript (the plotly wheel ships ``plotly.min.js``): no CDN, no
network. Each figure is a JSON spec that a small inline script hands to ``Plotly.newPlot``; the static SVG
stays in the page for print. The figures themselves live with their analysis (``magnitude_map_plotly`` in
:mod:`melayer.reporting.scan`, ``dose_response_plotly`` in :mod:`melayer.reporting.compare`).
"""

from __future__ import annotations

from typing import Any

from melayer.util.console import plain
from melayer.util.errors import MelayerError


def plotly_objects():
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise MelayerError("--interactive needs plotly: pip install 'melayer[report]'") from None
    return go


def plotly_js() -> str:
    """plotly.js as shipped inside the installed plotly package (no download)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise MelayerError("--interactive needs plotly: pip install 'melayer[report]'") from None
    return get_plotlyjs()


def to_json(fig: Any) -> str:
    """The figure's JSON, safe inside an HTML ``<script>`` element."""
    return fig.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def label(text: Any) -> str:
    """``text`` as literal plotly text: plotly renders a subset of HTML in titles, legends and hover labels
    (links, ``style``), fills ``%{...}`` in hover templates and takes ``$...$`` for LaTeX, so ``& < > % $``
    become entities (plotly shows them as the characters) and controls become visible ``\\uXXXX`` escapes."""
    return (plain(str(text)).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("%", "&#37;").replace("$", "&#36;"))
