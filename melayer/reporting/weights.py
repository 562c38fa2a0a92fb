"""Rendering of a ``melayer.weights/1`` result: the console summary and the score-per-layer plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from melayer.util.console import out


def print_weights(d: dict[str, Any]) -> None:
    out.print(f"[bold]{d['model']}[/] ({d['arch']}, {d['format']}, {d['num_layers']} layers, hidden {d['hidden_size']}, "
              f"{d['intermediate_size']} FFN neurons) -- from the weights alone, no forward pass")
    out.print(f"score: {escape(d['score'])}")
    out.print(f"rule: {escape(d['rule'])}")
    sw = d["super_weight"]
    where = escape(f"{sw['tensor']}[{sw['row']}, {sw['col']}]")
    out.print(f"[bold green]predicted ME layer {d['me_layer']}, massive dim {d['massive_dim']}, neurons "
              f"{d['neurons']}[/]; super weight {where} = {sw['value']:.4g} "
              f"({sw['ratio_to_median']:.3g} x the median |w|)")
    for note in d["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")
    if d["precursors"]:
        pre = ", ".join(f"layer {p['layer']} dim {p['dim']} neuron {p['neuron']}" for p in d["precursors"])
        out.print(f"precursor candidates: {pre}")
    t = Table("layer", "dim", "neuron", "score", "down", "post", "drive", title="top (dim, neuron) per layer")
    for r in d["layers"]:
        mark = " <- ME" if r["layer"] == d["me_layer"] else ""
        t.add_row(f"{r['layer']}{mark}", str(r["dim"]), str(r["neuron"]), f"{r['score']:.4g}", f"{r['down']:.3g}",
                  f"{r['post']:.3g}", f"{r['drive']:.3g}")
    out.print(t)
    c = d["cost"]
    out.print(f"read {c['tensors_read']} tensors ({c['bytes_read_mb']} MB as float32) in {c['seconds']} s; at most "
              f"{c['max_live_tensors']} alive at once; peak RSS {c['peak_rss_mb']} MB")
    conf = d.get("confirm")
    if conf:
        colour = "green" if conf["held"] else "red"
        out.print(f"[bold {colour}]confirm ({conf['prompts']} prompts, layers {conf['layers']}): {escape(conf['verdict'])}[/]")


def score_figure(d: dict[str, Any]) -> Any:
    """Best score per layer (log scale), each point labelled with its dim; the ME layer and precursors marked."""
    from melayer.reporting.plots import log_layer_axes, plt

    rows = d["layers"]
    layers = [r["layer"] for r in rows]
    scores = [max(r["score"], 1e-12) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 4))
    ax.plot(layers, scores, "-o", ms=4, color="tab:blue", label="best score in the layer")
    pre = {p["layer"] for p in d["precursors"]}
    for r, s in zip(rows, scores):
        colour = "red" if r["layer"] == d["me_layer"] else ("tab:orange" if r["layer"] in pre else "0.3")
        ax.annotate(str(r["dim"]), (r["layer"], s), textcoords="offset points", xytext=(0, 5), ha="center",
                    fontsize=7, color=colour)
    ax.axvline(d["me_layer"], color="red", ls="--", lw=1,
               label=f"predicted ME layer {d['me_layer']} (dim {d['massive_dim']}, neuron {d['neurons'][0]})")
    conf = d.get("confirm") or {}
    if conf.get("first_held") is not None and conf["first_held"] != d["me_layer"]:
        ax.axvline(conf["first_held"], color="green", ls=":", lw=1.5,
                   label=f"--confirm: dim {d['massive_dim']} becomes massive at layer {conf['first_held']}")
    if pre:
        ax.plot(sorted(pre), [scores[i] for i in sorted(pre)], "o", color="tab:orange", ms=6, label="precursor candidates")
    return log_layer_axes(ax, "decoder layer (labels: the top dim)", "down x post x drive (ratios to the layer medians)",
                          f"{d['model']}: data-free ME-layer candidates", fig, legend_size=7)


def score_plot(d: dict[str, Any], path: str | Path) -> Path:
    from melayer.reporting.plots import save

    return save(score_figure(d), path)
