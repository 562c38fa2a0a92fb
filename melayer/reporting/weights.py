"""Rendering of a ``melayer.weights/2`` result: the console summary, the first token's path per layer and the
report's section."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from melayer.reporting.blocks import Figures, Section, model_line, p, table
from melayer.reporting.format import num
from melayer.reporting.plotting import log_layer_axes, plt, png
from melayer.reporting.results import KINDS
from melayer.util.console import out


def headline(d: dict[str, Any]) -> str:
    """One line: the prediction, its neuron and super weight, and how many first tokens agree."""
    if d["me_layer"] is None:
        return "no ME layer predicted: no first token's path holds a persistent massive value"
    sw = d.get("super_weight") or {}
    text = f"predicted ME layer {d['me_layer']}, massive dim {d['massive_dim']}, creating neurons {d['neurons']}"
    if sw:
        text += (f"; super weight {sw['tensor']}[{sw['row']}, {sw['col']}] = {sw['value']:.4g} "
                 f"({sw['ratio_to_median']:.3g} x the median |w|)")
    v = d["vote"]
    return text + f"; {v['agree']} of {v['tokens']} first tokens agree ({v['first_tokens']})"


def print_weights(d: dict[str, Any]) -> None:
    out.print(f"[bold]{d['model']}[/] ({d['arch']}, {d['format']}, {d['num_layers']} layers, hidden {d['hidden_size']}, "
              f"{d['intermediate_size']} FFN neurons) -- from the weights alone: the first token's path")
    out.print(f"rule: {escape(d['rule'])}")
    out.print(f"attention at position 0: {escape(d['attention'])}")
    out.print(f"[bold green]{escape(headline(d))}[/]")
    for note in d["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")
    if d["precursors"]:
        out.print("precursors: " + ", ".join(f"layer {p['layer']} dim {p['dim']}" for p in d["precursors"]))
    if d["removers"]:
        out.print("removers: " + ", ".join(f"layer {r['layer']} neuron {r['neuron']} ({r['write']:+.4g})" for r in d["removers"]))
    t = Table("layer", "top dim", "|x|", "median |x|", "write on dim", "attention", "FFN", "role", "neuron",
              title="the first token's path (medians over the agreeing tokens)")
    for r in d["layers"]:
        mark = " <- ME" if r["layer"] == d["me_layer"] else ""
        t.add_row(f"{r['layer']}{mark}", str(r["top_dim"]), f"{r['top_value']:.4g}", f"{r['median']:.3g}",
                  f"{r['write']:+.4g}", f"{r['attn_write']:+.3g}", f"{r['ffn_write']:+.3g}", r["role"],
                  str(r["neuron"]) if r["neuron"] >= 0 else "")
    out.print(t)
    c = d["cost"]
    out.print(f"read {c['tensors_read']} tensors ({c['bytes_read_mb']} MB from the files) in {c['seconds']} s with "
              f"{c['threads']} threads; peak RSS {c['peak_rss_mb']} MB")
    conf = d.get("confirm")
    if conf:
        colour = "green" if conf["held"] else "red"
        out.print(f"[bold {colour}]confirm ({conf['prompts']} prompts, layers {conf['layers']}): {escape(conf['verdict'])}[/]")


def score_figure(d: dict[str, Any]) -> Any:
    """|x| of the massive dim and the token's median |x| per layer (log scale), creating and removing layers
    marked."""
    rows = d["layers"]
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 4))
    ax.plot(layers, [max(r["top_value"], 1e-12) for r in rows], "-o", ms=4, color="tab:blue", label="largest |x|")
    ax.plot(layers, [max(r["median"], 1e-12) for r in rows], "-", color="0.5", label="median |x|")
    for r in rows:
        colour = "red" if r["layer"] == d["me_layer"] else ("tab:orange" if r["role"] == "removes" else "0.3")
        ax.annotate(str(r["top_dim"]), (r["layer"], max(r["top_value"], 1e-12)), textcoords="offset points",
                    xytext=(0, 5), ha="center", fontsize=7, color=colour)
    if d["me_layer"] is not None:
        ax.axvline(d["me_layer"], color="red", ls="--", lw=1,
                   label=f"predicted ME layer {d['me_layer']} (dim {d['massive_dim']}, neuron {d['neurons'][0] if d['neurons'] else '-'})")
    for i, r in enumerate(d["removers"]):
        ax.axvline(r["layer"], color="tab:orange", ls=":", lw=1, label="removes the value" if i == 0 else None)
    conf = d.get("confirm") or {}
    if conf.get("first_held") is not None and conf["first_held"] != d["me_layer"]:
        ax.axvline(conf["first_held"], color="green", ls=":", lw=1.5,
                   label=f"--confirm: dim {d['massive_dim']} becomes massive at layer {conf['first_held']}")
    return log_layer_axes(ax, "decoder layer (labels: the top dim)", "|x| on the first token's path",
                          f"{d['model']}: the first token's path, from the weights", fig, legend_size=7)


score_plot = png(score_figure)


def weights_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    blocks: list[dict[str, Any]] = [
        p("Model: {}. From the weights alone (the first token's path): <b>{}</b>.", model_line(d), headline(d)),
        {"kind": "dl", "items": [("rule", d.get("rule", "")), ("attention at position 0", d.get("attention", "")),
                                 *[("assumes", a) for a in d.get("assumptions", [])]]},
    ]
    conf = d.get("confirm")
    if conf:
        blocks.append(p("Checked with a short scan ({} prompts, layers {}): <b>{}</b>.", conf["prompts"],
                        ", ".join(map(str, conf["layers"])), conf["verdict"]))
    rows = [[c["rank"], c["layer"], c["role"], num(c["write"]), c["neuron"]] for c in d["candidates"]]
    blocks.append(table("Layers writing most into the massive dim", ["rank", "layer", "role", "write", "neuron"], rows,
                        highlight={i for i, c in enumerate(d["candidates"]) if c["layer"] == d["me_layer"]}))
    if d.get("precursors"):
        blocks.append(p("Precursors (massive, not persistent) at layers {}.", ", ".join(str(x["layer"]) for x in d["precursors"])))
    if d.get("removers"):
        blocks.append(p("Removed again at layers {}.", ", ".join(str(x["layer"]) for x in d["removers"])))
    blocks.append({"kind": "list", "items": list(d.get("notes") or [])})
    blocks.append(figs.figure(lambda: score_figure(d),
                              "The largest |x| and the median |x| of the first token per layer (log scale), each "
                              "point labelled with its top dim; the predicted ME layer dashed, removing layers dotted.",
                              f"Line chart of the first token's largest and median activation per layer of {d['model']} "
                              "computed from the weights, with the top dim of each layer as labels."))
    return [{"id": "", "title": KINDS["weights"].title, "blocks": blocks}]
