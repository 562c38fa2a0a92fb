"""Short human summaries printed by the CLI (rich tables on stdout)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

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
