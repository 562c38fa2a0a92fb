"""Rendering of ``melayer rigidity`` (``rigidity.json``): the console summary, the three-panel figure and the
report's section."""

from __future__ import annotations

from typing import Any

from matplotlib.ticker import MaxNLocator

from melayer.reporting.blocks import Figures, Section, model_line, p, table
from melayer.reporting.format import num
from melayer.reporting.plotting import plt, png, titled
from melayer.reporting.results import KINDS
from melayer.util.console import out


def print_rigidity(d: dict[str, Any]) -> None:
    s = d["summary"]
    out.print(f"[bold]{d['model']}[/]: ME layer {d['me_layer']}, massive dims {d['massive_dims']}")
    out.print(f"after the ME layer, cos(h_l-1, h_l): massive token {num(s['after_me_layer_consecutive_cos_massive'], spec='.4f')} "
              f"vs ordinary tokens {num(s['after_me_layer_consecutive_cos_ordinary'], spec='.4f')}")
    out.print(f"cross-prompt similarity (layers >= ME): massive token {num(s['cross_input_massive_all_pairs'], spec='.4f')}"
              + (" (trivial: same BOS at position 0)" if d["cross_input_trivially_identical"] else "")
              + f"; differing massive tokens {num(s['cross_input_massive_nontrivial_pairs'], spec='.4f')}"
              + f"; first token without BOS {num(s['cross_input_no_bos_first_token'], spec='.4f')}"
              + f"; last-token baseline {num(s['cross_input_last_token_baseline'], spec='.4f')}")
    out.print(f"attention input after the ME layer: effective rank {num(s['after_me_layer_erank_with'], spec='.3f')} with the massive "
              f"token, {num(s['after_me_layer_erank_without'], spec='.3f')} without it, {num(s['after_me_layer_erank_drop_other'], spec='.3f')} "
              f"without another token instead; mean cos {num(s['after_me_layer_attn_input_cos_with'], spec='.3f')} / "
              f"{num(s['after_me_layer_attn_input_cos_without'], spec='.3f')} / {num(s['after_me_layer_attn_input_cos_drop_other'], spec='.3f')}")
    for n in d["notes"]:
        out.print(f"[yellow]note[/]: {n}")


def _per_layer_panel(ax: Any, me: int, xlabel: str, ylabel: str, title: str) -> None:
    """The ME layer dashed, the labels, the title and the legend of one panel."""
    ax.axvline(me, color="red", ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def rigidity_figure(d: dict[str, Any]) -> Any:
    me = d["me_layer"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    layers = [r["layer"] for r in d["consecutive"]]
    ax.plot(layers, [r["massive_cos"] for r in d["consecutive"]], "-o", ms=3, color="tab:red", label="massive token")
    ax.plot(layers, [r["ordinary_cos"] for r in d["consecutive"]], "-s", ms=3, color="tab:blue", label="ordinary tokens")
    if d.get("no_bos"):
        ax.plot(layers, [r["first_token_consecutive_cos"] for r in d["no_bos"]["per_layer"]], ":", color="tab:orange",
                label="first token, no BOS")
    _per_layer_panel(ax, me, "layer l", "cos(h[l-1], h[l])", "consecutive-layer similarity")
    ax = axes[1]
    ci = d["cross_input"]
    ax.plot(layers, [r["massive_all_pairs"] for r in ci], "-o", ms=3, color="tab:red",
            label="massive token" + (" (trivial: same BOS)" if d["cross_input_trivially_identical"] else ""))
    if any(r["massive_nontrivial_pairs"] is not None for r in ci):
        ax.plot(layers, [r["massive_nontrivial_pairs"] for r in ci], "-^", ms=3, color="darkred", label="massive, differing tokens")
    if d.get("no_bos"):
        ax.plot(layers, [r["first_token_distinct_pairs"] for r in d["no_bos"]["per_layer"]], "-d", ms=3, color="tab:orange",
                label="first token, no BOS (different words)")
    ax.plot(layers, [r["last_token_pairs"] for r in ci], "-s", ms=3, color="tab:blue", label="last token (baseline)")
    _per_layer_panel(ax, me, "layer", "mean pairwise cos across prompts", "cross-input invariance")
    ax = axes[2]
    dv = d["attention_input_diversity"]
    ax.plot(layers, [r["erank_with"] for r in dv], "-o", ms=3, color="tab:red", label="eff. rank, with massive")
    ax.plot(layers, [r["erank_without"] for r in dv], "-s", ms=3, color="tab:blue", label="eff. rank, without massive")
    ax.plot(layers, [r["erank_drop_other"] for r in dv], "-", lw=0.8, color="tab:green", label="eff. rank, without another token")
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank of attention input")
    ax.axvline(me, color="red", ls="--", lw=1)
    ax3 = ax.twinx()
    ax3.plot(layers, [r["mean_cos_with"] for r in dv], ":", color="tab:red", label="mean cos, with")
    ax3.plot(layers, [r["mean_cos_without"] for r in dv], ":", color="tab:blue", label="mean cos, without")
    ax3.set_ylabel("mean pairwise cos (dotted)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    ax.set_title("diversity of attention inputs")
    for a in axes:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    return titled(fig, f"{d['model']}: rigidity (ME layer {me})")


rigidity_plot = png(rigidity_figure)


def rigidity_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    s = d["summary"]
    rows = [
        ["consecutive-layer cosine, massive token", num(s["after_me_layer_consecutive_cos_massive"])],
        ["consecutive-layer cosine, ordinary tokens", num(s["after_me_layer_consecutive_cos_ordinary"])],
        ["cross-prompt similarity, massive token" + (" (trivial: same token at position 0)"
                                                    if d.get("cross_input_trivially_identical") else ""),
         num(s["cross_input_massive_all_pairs"])],
        ["cross-prompt similarity, differing massive tokens", num(s["cross_input_massive_nontrivial_pairs"])],
        ["cross-prompt similarity, first token without BOS", num(s["cross_input_no_bos_first_token"])],
        ["cross-prompt similarity, last token (baseline)", num(s["cross_input_last_token_baseline"])],
        ["effective rank of attention input, with the massive token", num(s["after_me_layer_erank_with"])],
        ["... without it", num(s["after_me_layer_erank_without"])],
        ["... without another token (same-size control)", num(s["after_me_layer_erank_drop_other"])],
    ]
    blocks = [p("Model: {}. ME layer {}, massive dims {}, {} prompts.", model_line(d), d["me_layer"], d["massive_dims"],
                d["settings"]["prompts"]),
              table("After the ME layer (mean over layers >= the ME layer)", ["measure", "value"], rows),
              {"kind": "list", "items": list(d.get("notes") or [])},
              figs.figure(lambda: rigidity_figure(d),
                          "Left: cosine between consecutive layers' states. Middle: similarity of the same position "
                          "across prompts. Right: effective rank of the attention inputs with and without the massive "
                          "token (and without another token as control). ME layer dashed.",
                          "Three line charts of rigidity measures per layer.")]
    return [{"id": "", "title": KINDS["rigidity"].title, "blocks": blocks}]
