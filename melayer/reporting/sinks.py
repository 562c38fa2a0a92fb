"""Rendering of ``melayer sinks`` (``sinks.json``): the console summary, the layer x head heatmap and the report's
section."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from melayer.reporting.blocks import Figures, Section, model_line, p, table
from melayer.reporting.format import num, pct
from melayer.reporting.plotting import plt, png, titled
from melayer.reporting.results import KINDS
from melayer.util.console import out


def print_sinks(d: dict[str, Any]) -> None:
    st = d["settings"]
    out.print(f"[bold]{d['model']}[/]: sink rate (first token, eps={st['epsilon']:g}) = [bold]{d['sink_rate']:.1%}[/] "
              f"over {d['num_layers']} layers x {d['num_heads']} heads, {st['prompts']} prompts "
              f"({d['tokens_per_prompt']['min']}-{d['tokens_per_prompt']['max']} tokens"
              + (f"; {st['prompts_skipped_too_short']} shorter than {st['min_tokens']} skipped" if st.get("prompts_skipped_too_short") else "")
              + ")")
    out.print(f"a uniformly attending head would give the first token alpha_1 = {d['uniform_attention_alpha_first']:.3f} here")
    if d.get("sink_rate_massive") is not None and any(p != 0 for p in d.get("massive_token_positions") or []):
        out.print(f"sink rate on the massive token: {d['sink_rate_massive']:.1%}")
    out.print(f"ME layer {d['me_layer']}; first layer with sinks: {d['first_sink_layer']} "
              f"(any head: {d['first_sink_layer_any_head']})")
    t = Table("layer", "sink rate", "mean alpha_1", "max-head alpha_1", title="per layer")
    for i, rate in enumerate(d["sink_rate_per_layer"]):
        row = d["alpha_first"][i]
        mark = " <- ME" if i == d["me_layer"] else ""
        t.add_row(f"{i}{mark}", f"{rate:.0%}", f"{sum(row) / len(row):.3f}", f"{max(row):.3f}")
    out.print(t)


def sinks_heatmap_figure(d: dict[str, Any]) -> Any:
    """Layer x head heatmap of the first token's importance score, ME layer and first sink layer marked."""
    a = np.array(d["alpha_first"], dtype=float)
    show_massive = "alpha_massive" in d and d.get("massive_token_positions") and any(p != 0 for p in d["massive_token_positions"])
    panels = 3 if show_massive else 2
    fig, axes = plt.subplots(1, panels, figsize=(4 + 3.5 * panels, max(4, 0.28 * a.shape[0] + 1.5)),
                             gridspec_kw={"width_ratios": [1.4] + [1] * (panels - 1)})
    ax = axes[0]
    im = ax.imshow(a, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="upper")
    fig.colorbar(im, ax=ax, label="alpha (mean attention received)")
    if a.shape[1] <= 16 and a.shape[0] <= 40:
        for (i, j), v in np.ndenumerate(a):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if d.get("me_layer") is not None:
        ax.axhline(d["me_layer"] + 0.5, color="cyan", lw=1.5, label=f"below ME layer {d['me_layer']}")
    ax.set_title(f"first-token score alpha_1 (eps={d['settings']['epsilon']:g})")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    layers = np.arange(a.shape[0])
    ax.plot(d["sink_rate_per_layer"], layers, "-o", ms=3, label="sink rate, first token")
    if show_massive:
        ax.plot(d["sink_rate_massive_per_layer"], layers, "--", label="sink rate, massive token")
    ax.plot(d["first_token_is_top_sink_per_layer"], layers, ":", label="first token is top sink")
    ax.invert_yaxis()
    if d.get("me_layer") is not None:
        ax.axhline(d["me_layer"], color="red", ls="--", lw=1, label="ME layer")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("share of (prompt, head) pairs")
    ax.set_ylabel("layer")
    ax.set_title(f"sink rate {d['sink_rate']:.1%}")
    ax.legend(fontsize=7)
    if show_massive:
        ax = axes[2]
        m = np.array(d["alpha_massive"], dtype=float)
        im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax)
        ax.set_title("massive-token score")
        ax.set_xlabel("head")
    return titled(fig, d["model"])


sinks_heatmap = png(sinks_heatmap_figure)


def sinks_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    st = d["settings"]
    me, first = d.get("me_layer"), d.get("first_sink_layer")
    if me is None or first is None:
        rel = "cannot be compared (one of them is missing)"
    elif first < me:
        rel = f"sinks appear {me - first} layer(s) <b>before</b> the ME layer: here the sink does not follow the massive activation"
    elif first == me:
        rel = "sinks appear at the ME layer itself"
    else:
        rel = f"sinks appear {first - me} layer(s) after the ME layer"
    blocks = [
        p("Model: {}. Sink rate (first token, &epsilon; = {}) <b>{}</b> of {} layers x {} heads over {} prompts; a "
          "uniformly attending head would give the first token &alpha;<sub>1</sub> = {}.", model_line(d),
          num(st["epsilon"]), pct(d["sink_rate"]), d["num_layers"], d["num_heads"], st["prompts"],
          num(d["uniform_attention_alpha_first"], 3)),
        p("First sink layer ({}): <b>{}</b> (any head: {}); ME layer <b>{}</b>: " + rel + ".",
          st.get("first_sink_layer_rule", ""), first, d.get("first_sink_layer_any_head"), me),
        figs.figure(lambda: sinks_heatmap_figure(d),
                    "Left: layer x head heatmap of the first token's score alpha_1 (mean attention it receives); the "
                    "line marks the ME layer. Right: the share of heads that sink per layer.",
                    f"Heatmap of attention-sink scores over {d['num_layers']} layers and {d['num_heads']} heads, and a "
                    "line chart of the sink rate per layer."),
    ]
    rows = [[f"{i}" + (" (ME)" if i == me else ""), pct(r, 0), num(sum(a) / len(a), 3), num(max(a), 3)]
            for i, (r, a) in enumerate(zip(d["sink_rate_per_layer"], d["alpha_first"]))]
    blocks.append({"kind": "details", "summary": "per-layer table",
                   "blocks": [table("Sinks per layer", ["layer", "sink rate", "mean alpha_1", "max-head alpha_1"], rows,
                                    highlight={me} if me is not None else None)]})
    if st.get("metric"):
        blocks.append({"kind": "dl", "items": [("metric", st["metric"]), ("sink rate", st.get("sink_rate", ""))]})
    return [{"id": "", "title": KINDS["sinks"].title, "blocks": blocks}]
