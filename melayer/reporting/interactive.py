"""Interactive versions of the key figures (plotly), for ``melayer report --interactive``.

The page inlines plotly's own bundled JavaScript (the plotly wheel ships ``plotly.min.js``): no CDN, no
network. Each figure is a JSON spec that a small inline script hands to ``Plotly.newPlot``; the static SVG
stays in the page for print.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from melayer.reporting import figures as F
from melayer.util.console import plain
from melayer.util.errors import MelayerError


def _go():
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


def magnitude_map(scan: dict[str, Any]) -> Any:
    """Hoverable heatmap of log10 |a| of the profiled token over layers x dims."""
    go = _go()
    prof = scan["massive_token_profile"]
    grid = F._grid(prof)
    logs = np.log10(np.clip(np.nan_to_num(grid, nan=0.0), 1e-6, None))
    custom = np.vectorize(lambda v: f"{v:.4g}")(grid)
    fig = go.Figure(go.Heatmap(z=logs, customdata=custom, colorscale="Magma",
                               colorbar={"title": {"text": "log10 |a|"}},
                               hovertemplate="layer %{y}, dim %{x}<br>|a| = %{customdata}<extra></extra>"))
    me = scan.get("me_layer")
    if me is not None:
        fig.add_hline(y=me - 0.5, line={"color": "cyan", "dash": "dash", "width": 1})
    fig.update_layout(title=f"{label(scan['model'])}: token {label(repr(prof['token']))} over layers x dims (log10 |a|)",
                      xaxis_title="hidden dim", yaxis={"title": "decoder layer", "autorange": "reversed"},
                      height=420, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def dose_response(data: dict[str, Any]) -> Any:
    """Paired difference to rate 0 per metric with its CI, hover shows the values and McNemar's p."""
    go = _go()
    rows = data["per_rate"]
    fig = go.Figure()
    labels = [f"{r['rate']:g} (k={r.get('wemask', {}).get('k', 0)})" for r in rows]
    for name in rows[0]["metrics"]:
        y, lo, hi, text = [], [], [], []
        for r in rows:
            m = r["metrics"][name]
            vs = m.get("vs_baseline") or {"diff": 0.0, "ci95": [0.0, 0.0]}
            d, (a, b) = vs["diff"], vs["ci95"]
            y.append(d)
            lo.append(0.0 if a is None or d is None else d - a)
            hi.append(0.0 if b is None or d is None else b - d)
            mc = m.get("mcnemar")
            text.append(f"value {m['value']:.4g}" + (f", McNemar p {mc['p']:.3g}" if mc else ""))
        fig.add_trace(go.Scatter(x=labels, y=y, name=label(name), mode="lines+markers", text=text,
                                 error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
                                 hovertemplate="%{x}: diff %{y:.4g}<br>%{text}<extra>" + label(name) + "</extra>"))
    fig.add_hline(y=0, line={"color": "gray", "dash": "dash", "width": 1})
    fig.update_layout(title=f"{label(data['model'])} - {label(data['task'])}: difference to rate 0 (paired 95% CI)",
                      xaxis_title="WeMask rate", yaxis_title="difference to rate 0", height=380,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig
