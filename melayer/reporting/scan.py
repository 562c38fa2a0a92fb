"""Rendering of ``melayer scan`` (``scan.json``): the console summary, the per-layer magnitudes and the massive
token over layers x dims (PNG, and interactive in the report), and the report's sections."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from melayer.reporting.blocks import Figures, Section, model_line, p, table
from melayer.reporting.format import num, pct
from melayer.reporting.plotting import log_layer_axes, plt, png, save, tex_safe, titled
from melayer.reporting.results import KINDS
from melayer.util.console import out


def print_scan(d: dict[str, Any]) -> None:
    me = d["me_layer"]
    cons = d["me_layer_consistency"]
    out.print(f"[bold]{d['model']}[/] ({d['arch']}, {d['num_layers']} layers, hidden {d['hidden_size']}, {d['dtype']})")
    out.print(f"criterion: {d['threshold']['rule']}")
    voters = sum(p["votes"] for p in d["prompts"])
    if me is None:
        out.print(f"[yellow]no persistent massive activations found[/] ({voters} voting prompts)")
    else:
        out.print(f"[bold green]ME layer: {me}[/] (0-based decoder layer; {cons:.0%} of {voters} voting prompts agree)")
    toks = ", ".join(f"pos {t['position']} {t['token']!r} ({t['prompts']} prompts)" for t in d["massive_tokens"][:5])
    if toks:
        out.print(f"massive tokens at the ME layer: {toks}")
    if d["massive_dims"]:
        sup = d["massive_dim_support"]
        dims = ", ".join(f"{k} ({v:.0%})" for k, v in sorted(sup.items(), key=lambda kv: -kv[1])[:8])
        out.print(f"massive dims (share of prompts): {dims}")
    pk = d.get("peak")
    if pk:
        ratio = pk.get("ratio_to_median")
        out.print(f"peak |a| = {abs(pk['value']):.4g} at layer {pk['layer']}, dim {pk['dim']}, token {pk['token']!r}"
                  + (f" = {ratio:.3g} x the layer median" if ratio else ""))
    if d["precursors"]:
        layers = sorted({r["layer"] for r in d["precursors"]})
        out.print(f"precursors (transient massive values before the ME layer): layers {layers}")
    t = Table("layer", "median |a|", "top-1 |a|", "massive in", title="per layer (mean over prompts)")
    for r in d["per_layer"]:
        mark = " <- ME" if r["layer"] == me else ""
        t.add_row(f"{r['layer']}{mark}", f"{r['median']:.3g}", f"{r['top1_mean']:.4g}", f"{r['massive_share']:.0%}")
    out.print(t)


def layer_magnitudes_figure(scan: dict[str, Any]) -> Any:
    """Per-layer mean top-1/2/3 |a| vs the median |a| (log scale), ME layer marked."""
    rows = scan["per_layer"]
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("top1_mean", "top-1", "-o"), ("top2_mean", "top-2", "-s"), ("top3_mean", "top-3", "-^")):
        ax.plot(layers, [max(r[key], 1e-6) for r in rows], style, ms=3, label=label)
    ax.plot(layers, [max(r["median"], 1e-6) for r in rows], "-", color="gray", label="median")
    if scan.get("me_layer") is not None:
        ax.axvline(scan["me_layer"], color="red", ls="--", lw=1, label=f"ME layer {scan['me_layer']}")
    return log_layer_axes(ax, "decoder layer (output)", "|activation| (mean over prompts)",
                          f"{tex_safe(scan['model'])}: layer-wise magnitudes", fig)


layer_magnitudes = png(layer_magnitudes_figure)


def profile_dims(scan: dict[str, Any], limit: int = 6) -> list[tuple[int, str]]:
    """The dims worth drawing for the profiled token: persistent massive dims, then precursor and transient
    dims seen on that token's position (most frequent first), then (if none) the largest dims."""
    prof = scan["massive_token_profile"]
    pos = prof["position"]
    picked: list[tuple[int, str]] = [(int(d), "persistent") for d in scan.get("massive_dims") or []]
    for key, kind in (("precursors", "precursor"), ("transient", "transient")):
        counts = Counter(r["dim"] for r in scan.get(key) or [] if r["position"] == pos)
        for d, _ in counts.most_common():
            if all(d != p for p, _ in picked):
                picked.append((int(d), kind))
    if not picked:
        grid = _grid(prof)
        picked = [(int(d), "largest") for d in np.argsort(-np.nanmax(grid, axis=0))[:3]]
    return picked[:limit]


def _grid(prof: dict[str, Any]) -> np.ndarray:
    return np.array([[np.nan if v is None else abs(v) for v in row] for row in prof["abs"]], dtype=float)


def magnitude_map(scan: dict[str, Any]) -> Any:
    """Left: log-colour heatmap of the profiled token's |a| (rows: layers, columns: hidden dims), dims of
    interest ticked on top. Right: those dims' |a| per layer (log) with the massive and persistence
    thresholds of the criterion; the ME layer dashed."""
    prof = scan["massive_token_profile"]
    grid = _grid(prof)
    n_layers = grid.shape[0]
    crit = scan.get("threshold") or {}
    dims = profile_dims(scan)
    me = scan.get("me_layer")
    positive = grid[np.isfinite(grid) & (grid > 0)]
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = max(float(np.percentile(positive, 5)) if positive.size else 1e-3, vmax * 1e-7)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.6, 0.2 * n_layers + 1.8)), gridspec_kw={"width_ratios": [1.6, 1]})
    ax = axes[0]
    im = ax.imshow(np.clip(np.nan_to_num(grid, nan=vmin), vmin, None), aspect="auto", cmap="magma",
                   norm=LogNorm(vmin=vmin, vmax=vmax), interpolation="none", origin="upper")
    fig.colorbar(im, ax=ax, label="|a| (log scale)", pad=0.01)
    ax.set_xlabel("hidden dim")
    ax.set_ylabel("decoder layer (output)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if me is not None:
        ax.axhline(me - 0.5, color="cyan", lw=1, ls="--")
    top = ax.secondary_xaxis("top")
    top.set_xticks([d for d, _ in dims], [f"{d}\n{k[:4]}." for d, k in dims], fontsize=7)
    ax.set_title(f"token {tex_safe(repr(prof['token']))} (prompt {prof['prompt']}, position {prof['position']})",
                 fontsize=9, pad=22)
    ax = axes[1]
    layers = np.arange(n_layers)
    colors = {"persistent": "tab:red", "precursor": "tab:blue", "transient": "tab:green", "largest": "tab:gray"}
    styles = {"persistent": "-", "precursor": "--", "transient": ":", "largest": "-"}
    for d, kind in dims:
        ax.plot(layers, np.maximum(grid[:, d], vmin), styles[kind], marker="o", ms=3, color=colors[kind],
                label=f"dim {d} ({kind})")
    ax.plot(layers, np.maximum(np.nanmedian(grid, axis=1), vmin), color="gray", lw=1, label="median over dims")
    per_layer = scan.get("per_layer") or []
    if crit and len(per_layer) == n_layers:
        med = np.array([r["median"] for r in per_layer], dtype=float)
        ax.plot(layers, np.maximum(crit["abs_min"], crit["median_ratio"] * med), color="black", lw=1, ls="--",
                label=f"massive: >{crit['abs_min']:g} and >{crit['median_ratio']:g}x layer median")
        ax.plot(layers, np.maximum(crit["abs_min"], crit["persist_ratio"] * med), color="black", lw=0.8, ls=":",
                label=f"persists: >{crit['persist_ratio']:g}x layer median")
    if me is not None:
        ax.axvline(me, color="red", ls="--", lw=1)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer (output)")
    ax.set_ylabel("|a| of the profiled token")
    ax.set_title("dims that matter vs the criterion" + (f" (ME layer {me})" if me is not None else ""), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return titled(fig, scan["model"], fontsize=10)


def token_surface(scan: dict[str, Any], path: str | Path) -> Path | None:
    """The massive token's |a| over layers x dims on a log scale, next to the dims that matter against the
    criterion (see :func:`magnitude_map`); None without a profile."""
    if not scan.get("massive_token_profile"):
        return None
    return save(magnitude_map(scan), path)


def magnitude_map_plotly(scan: dict[str, Any]) -> Any:
    """Hoverable heatmap of log10 |a| of the profiled token over layers x dims (plotly)."""
    from melayer.reporting.interactive import label, plotly_objects

    go = plotly_objects()
    prof = scan["massive_token_profile"]
    grid = _grid(prof)
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


def criterion_words(c: dict[str, Any]) -> dict[str, Any]:
    return p("A value is <b>massive</b> if |a| &gt; {} and |a| &gt; {}&times; the median |a| of that layer's output. "
             "The <b>ME layer</b> is the first decoder layer (0-based, the layer's raw output) holding a massive "
             "(token, dim) that <b>persists</b>: it stays above {} and above {}&times; the layer median in the next "
             "layer and in at least {} of all later layers. Massive values before the ME layer are "
             "<i>precursors</i>, later ones on a (token, dim) that does not persist are <i>transient</i>. Each "
             "prompt with at least {} tokens votes for its own ME layer; the consensus is the mode.",
             num(c["abs_min"]), num(c["median_ratio"]), num(c["abs_min"]), num(c["persist_ratio"]),
             pct(c["persist_frac"], 0), c.get("min_tokens", "-"))


def _spread(records: list[dict[str, Any]], n_prompts: int, limit: int = 12) -> list[list[Any]]:
    """Group massive records by (dim, position, token): layers, prompts, largest |a|."""
    groups: dict[tuple[int, int, str], dict[str, Any]] = {}
    for r in records:
        g = groups.setdefault((r["dim"], r["position"], r["token"]), {"layers": set(), "prompts": set(), "max": 0.0})
        g["layers"].add(r["layer"])
        g["prompts"].add(r["prompt"])
        g["max"] = max(g["max"], abs(r["value"]))
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]["prompts"]), -kv[1]["max"]))[:limit]
    return [[d, pos, repr(tok), _layers(sorted(g["layers"])), f"{len(g['prompts'])}/{n_prompts}", num(g["max"])]
            for (d, pos, tok), g in ranked]


def _layers(layers: list[int]) -> str:
    if not layers:
        return "-"
    spans: list[str] = []
    start: int | None = layers[0]
    bounds: list[int | None] = [*layers[1:], None]
    for a, b in zip(layers, bounds):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans)


def scan_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    me = d["me_layer"]
    n = len(d["prompts"])
    voters = sum(1 for q in d["prompts"] if q.get("votes"))
    blocks: list[dict[str, Any]] = [p("Model: {}.", model_line(d)), criterion_words(d["threshold"])]
    if me is None:
        blocks.append(p("<b>No persistent massive activation</b> was found in {} prompts ({} voting): this model has "
                        "no ME layer under this criterion.", n, voters))
    else:
        blocks.append(p("<b class=\"headline\">ME layer {}</b> (0-based decoder layer): {} of {} voting prompts agree.",
                        me, pct(d["me_layer_consistency"]), voters))
    rows = [[t["position"], repr(t["token"]), f"{t['prompts']}/{n}"] for t in d["massive_tokens"][:10]]
    if rows:
        blocks.append(table("Massive tokens at the ME layer", ["position", "token", "prompts"], rows))
    sup = d.get("massive_dim_support") or {}
    if sup:
        blocks.append(table("Massive dims (persistent), share of voting prompts in which each is massive",
                            ["dim", "support"], [[k, pct(v)] for k, v in sorted(sup.items(), key=lambda kv: -kv[1])[:10]]))
    pk = d.get("peak")
    if pk:
        blocks.append(p("Peak |a| = <b>{}</b> at layer {}, dim {}, token {} (prompt {}), {}&times; that layer's median.",
                        num(abs(pk["value"])), pk["layer"], pk["dim"], repr(pk["token"]), pk["prompt"],
                        num(pk.get("ratio_to_median"), 3)))
    for key, what in (("precursors", "Precursors: massive values before each prompt's ME layer"),
                      ("transient", "Transient: massive at or after the ME layer on a (token, dim) that does not persist")):
        if d.get(key):
            blocks.append(table(what, ["dim", "position", "token", "layers", "prompts", "max |a|"],
                                _spread(d[key], n), note="the most widespread (dim, token) pairs first"))
    if not d.get("precursors"):
        blocks.append(p("No precursors: nothing is massive before the ME layer."))
    sections = [{"id": "", "title": KINDS["scan"].title, "blocks": blocks}]

    per = d["per_layer"]
    rows = [[f"{r['layer']}" + (" (ME)" if r["layer"] == me else ""), num(r["median"], 3), num(r["top1_mean"]),
             num(r["top2_mean"]), num(r["top3_mean"]), pct(r["massive_share"], 0)] for r in per]
    mag = [
        figs.figure(lambda: layer_magnitudes_figure(d), f"Per-layer magnitudes of {d['model']}: the mean over prompts of the "
                    "largest three |a| of each layer's output against the median |a| (log scale); the ME layer dashed.",
                    f"Line chart of the top-1, top-2, top-3 and median absolute activation per layer of {d['model']}, "
                    f"log scale; ME layer {me}."),
        table("Per layer (mean over prompts)", ["layer", "median |a|", "top-1 |a|", "top-2 |a|", "top-3 |a|",
                                                "prompts with a massive value"], rows,
              highlight={i for i, r in enumerate(per) if r["layer"] == me}),
    ]
    sections.append({"id": "", "title": "Per-layer magnitudes", "blocks": mag})
    prof = d.get("massive_token_profile")
    if prof:
        dims = profile_dims(d)
        names = ", ".join(f"dim {dd} ({k})" for dd, k in dims)
        sections.append({"id": "", "title": "The massive token over layers and dims", "blocks": [
            figs.figure(lambda: magnitude_map(d),
                        f"Left: |a| of token {prof['token']!r} (prompt {prof['prompt']}, position {prof['position']}) "
                        "at every layer (rows) and hidden dim (columns), log colour scale, so precursors and the "
                        "persistent dim both show; ME layer dashed. Right: the dims that matter per layer against "
                        f"the criterion's thresholds ({names}).",
                        f"Heatmap of the massive token's absolute activation over layers and hidden dims on a log "
                        f"scale, and a line chart of {names} per layer with the massive and persistence thresholds.",
                        plotly=lambda: magnitude_map_plotly(d)),
        ]})
    return sections
