"""Rendering of ``melayer explain`` (``explain.json``): the console summary, the mechanism, norm-gain and ablation
figures, and the report's sections."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from melayer.reporting.blocks import Figures, Section, model_line, p, table
from melayer.reporting.format import num, pct
from melayer.reporting.plotting import plt, png, tex_safe, tight_layout, titled
from melayer.util.console import out

_KIND_STYLE = {"none": ("black", "-"), "norm": ("tab:blue", "--"), "ffn": ("tab:red", "-"), "both": ("tab:purple", ":"),
               "random": ("tab:gray", "-"), "expert": ("tab:green", "-"), "norm+expert": ("tab:olive", ":")}


def print_explain(d: dict[str, Any]) -> None:
    out.print(f"[bold]{d['model']}[/] ({d['arch']}, {d['num_layers']} layers): [bold green]ME layer {d['me_layer']}[/], "
              f"massive dims {d['massive_dims']}, tokens "
              + ", ".join(f"pos {t['position']} {t['token']!r}" for t in d["massive_tokens"][:3]))
    for r in d["decomposition"]:
        extra = ""
        if "post_ffn_norm_realised_gain" in r:
            extra = f" (raw FFN {r['mlp_raw']:.4g} x post-FFN norm {r['post_ffn_norm_realised_gain']:.4g})"
        out.print(f"  dim {r['dim']}: residual in {r['residual_in']:.4g} + attention {r['attn_branch']:.4g} + "
                  f"FFN {r['ffn_branch']:.4g}{extra} = out {r['residual_out']:.4g}")
    shares = d["selected_share_of_ffn_output"]
    out.print(f"top FFN neurons {d['selected_neurons']} cover "
              + ", ".join(f"{v:.1%} of dim {k}" for k, v in shares.items()) + " of the FFN output")
    for sw in d["super_weights"][:6]:
        out.print(f"  super weight: layer {sw['layer']} down row {sw['row']} col {sw['column']} = {sw['value']:.4g} "
                  f"({num(sw['ratio_to_median_abs_weight'], spec='.3g')} x median |w|, {sw['share_of_ffn_output']:.1%} of the FFN output)")
    if d["driving_dims"]:
        out.print(f"FFN-input dims driving those neurons: {d['driving_dims']}")
    for n in d["norm_gains"]:
        dims = ", ".join(f"{e['kind'][0]}{e['dim']}={e['gain']:.3g} ({num(e['ratio_to_median'], spec='.3g')}x)" for e in n["dims"][:6])
        sc = n["token_inv_scale"]
        out.print(f"  {n['role']}: median gain {n['median_gain']:.3g}; {dims}; massive token 1/scale "
                  f"{num(sc['massive'], spec='.3g')} vs others {num(sc['others_median'], spec='.3g')}")
    t = Table("ablation", "layer", "downstream max", "vs none", "per-layer ratio", "ME layer", "ppl",
              title="causal ablations (massive token, massive dims, ME layer onward)")
    base = d["ablations"][0]
    for r in d["ablations"] + d["controls"]["layers"]:
        t.add_row(r["ablate"], f"{r['layer']} ({r['role']})", f"{r['downstream_max']:.4g}", num(r["downstream_ratio"], spec=".2%"),
                  num(r.get("downstream_mean_ratio"), spec=".2%"), r["outcome"], f"{r['ppl']:.4g}")
    rnd = d["controls"].get("random") or {}
    if rnd.get("draws"):
        dm, pp = rnd["downstream_max"], rnd["ppl"]
        t.add_row(f"random x{rnd['draws']}", f"{d['me_layer']} (random)", f"{dm['mean']:.4g} ± {dm['std']:.2g}",
                  num(rnd.get("downstream_ratio_mean"), spec=".2%"),
                  num(float(sum(r["downstream_mean_ratio"] for r in rnd["runs"]) / len(rnd["runs"])), spec=".2%"),
                  ", ".join(sorted({r["outcome"] for r in rnd["runs"]})),
                  f"{pp['mean']:.4g} ± {pp['std']:.2g}")
    for role, rows in _expert_controls(d).items():
        dm = [r["downstream_max"] for r in rows]
        t.add_row(f"{role} x{len(rows)}", f"{d['me_layer']} (control)", f"{min(dm):.4g}-{max(dm):.4g}",
                  num(min(r["downstream_ratio"] for r in rows), spec=".2%"), "-",
                  ", ".join(sorted({r["outcome"] for r in rows})), f"{sum(r['ppl'] for r in rows) / len(rows):.4g}")
    out.print(t)
    if "experts" in d["controls"]:
        out.print(f"named expert(s) at layer {d['me_layer']}: {d['controls']['experts']['named']}")
    sup = d.get("super_experts")
    if sup is not None:
        t = Table("layer", "expert", "max |down output|", "channel", "super", "named by melayer",
                  title=f"super experts (Su et al. 2025; threshold {sup['threshold']:.4g}, layers 0-{sup['last_layer']})")
        chosen = {(r["layer"], r["expert"]) for r in sup["super_experts"]}
        named = {(sup["melayer"]["layer"], e) for e in sup["melayer"]["experts"]}
        for r in sup["largest"][:5]:
            key = (r["layer"], r["expert"])
            t.add_row(str(r["layer"]), str(r["expert"]), f"{r['max_abs_output']:.4g}", str(r["dim"]),
                      "yes" if key in chosen else "", "yes" if key in named else "")
        out.print(t)
    out.print(f"baseline perplexity {base['ppl']:.4g} on {d['settings']['perplexity']['tokens']} tokens; "
              f"model bit-identical afterwards: {d['model_check']['bit_identical']}")


def _expert_controls(d: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """An MoE ME layer's expert controls, grouped by kind."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in d["controls"].get("experts", {}).get("runs", []):
        groups.setdefault(r["role"], []).append(r)
    return groups


def _floor(values: list[float | None], eps: float = 1e-3) -> list[float]:
    return [max(eps, v) if v is not None else np.nan for v in values]


def explain_mechanism_figure(d: dict[str, Any]) -> Any:
    """ME-layer decomposition (residual in / attention / FFN / out) and the top neurons' contributions."""
    dims = d["decomposition"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    parts = ("residual_in", "attn_branch", "ffn_branch", "residual_out")
    width = 0.8 / max(1, len(dims))
    for i, row in enumerate(dims[:6]):
        vals = [abs(row[p]) for p in parts]
        ax.bar(np.arange(len(parts)) + i * width, _floor(vals), width, label=f"dim {row['dim']}")
    ax.set_xticks(np.arange(len(parts)) + width * (min(len(dims), 6) - 1) / 2)
    ax.set_xticklabels(["residual in", "attention\nbranch", "FFN\nbranch", "residual out"])
    ax.set_yscale("log")
    ax.set_ylabel("|value| on massive dim (massive token)")
    ax.set_title(f"ME layer {d['me_layer']}: who writes the massive value")
    ax.legend(fontsize=8)
    ax = axes[1]
    top = [t for t in d["top_neurons"] if t["dim"] == d["massive_dims"][0]][:10]
    labels = [str(t["neuron"]) for t in top]
    shares = [t["share"] or 0.0 for t in top]
    colors = ["tab:red" if t["selected"] else "tab:gray" for t in top]
    ax.bar(labels, shares, color=colors)
    ax.set_xlabel("FFN neuron (red: ablated as top neurons)")
    ax.set_ylabel(f"share of FFN output on dim {d['massive_dims'][0]}")
    ax.set_title("per-neuron attribution (activation x down column)")
    return titled(fig, d["model"])


explain_mechanism = png(explain_mechanism_figure)


def explain_norm_gains_figure(d: dict[str, Any]) -> Any | None:
    """Each ME-layer norm's gain on the relevant dims, as a multiple of its median gain."""
    norms = d["norm_gains"]
    if not norms:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(norms) + 3), 4))
    labels, vals, colors = [], [], []
    for n in norms:
        for e in n["dims"]:
            labels.append(f"{n['role']}\n{e['kind']} {e['dim']}")
            r = e["ratio_to_median"]
            vals.append(abs(r) if r is not None else np.nan)
            colors.append("tab:red" if e["kind"] == "massive" else "tab:blue")
    ax.bar(range(len(vals)), _floor(vals, 1e-9), color=colors)
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("|gain| / median gain of that norm")
    ax.set_title(f"{tex_safe(d['model'])}: norm gains in ME layer {d['me_layer']} (red: massive dims, blue: driving dims)")
    tight_layout(fig)
    return fig


explain_norm_gains = png(explain_norm_gains_figure)


def explain_ablations_figure(d: dict[str, Any]) -> Any:
    """Massive-token magnitude per layer under each ablation, and downstream max / perplexity per run."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    for r in d["ablations"]:
        color, ls = _KIND_STYLE[r["ablate"]]
        ax.plot(_floor(r["downstream_profile"]), ls=ls, color=color, marker="o", ms=3, label=f"{r['ablate']} @ {r['layer']}")
    rand = d["controls"].get("random", {}).get("runs", [])
    for i, r in enumerate(rand):
        ax.plot(_floor(r["downstream_profile"]), color="tab:gray", lw=0.8, alpha=0.6,
                label="random neurons @ ME" if i == 0 else None)
    ax.axvline(d["me_layer"], color="red", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (output)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("max |a| on massive dims, massive token")
    ax.set_title("ablations at the ME layer")
    ax.legend(fontsize=7)
    ax = axes[1]
    runs = d["ablations"] + d["controls"]["layers"]
    labels = [f"{r['ablate']}@{r['layer']}" + ("" if r["role"] == "me" else f" ({r['role']})") for r in runs]
    vals = [r["downstream_max"] for r in runs]
    ppl = [r["ppl"] for r in runs]
    if rand:
        labels.append(f"random@{d['me_layer']} (n={len(rand)})")
        vals.append(float(np.mean([r["downstream_max"] for r in rand])))
        ppl.append(float(np.mean([r["ppl"] for r in rand])))
    colors = [_KIND_STYLE.get(r["ablate"], ("tab:gray", "-"))[0] for r in runs] + (["tab:gray"] if rand else [])
    x = np.arange(len(vals))
    ax.bar(x, _floor(vals), color=colors)
    if rand:
        sd = float(np.std([r["downstream_max"] for r in rand]))
        ax.errorbar([x[-1]], [vals[-1]], yerr=[[min(sd, vals[-1] * 0.999)], [sd]], color="black", capsize=3)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("downstream max |a| (massive dims, token)")
    ax2 = ax.twinx()
    ax2.plot(x, ppl, "k^", ms=5, label="perplexity")
    ax2.set_ylabel("perplexity (shipped text)")
    ax2.legend(fontsize=7, loc="upper right")
    ax.set_title("full-factorial ablation + controls")
    return titled(fig, d["model"])


explain_ablations = png(explain_ablations_figure)


OUTCOMES = [
    ("stays", "the re-run scan still finds the ME layer at the same layer: the ablation did not remove the mechanism"),
    ("moves to N", "a persistent massive activation now first appears at layer N: another layer can produce it"),
    ("no ME layer", "no persistent massive activation anywhere: the ablation removed it"),
]


def explain_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    me = d["me_layer"]
    blocks: list[dict[str, Any]] = [
        p("Model: {}. ME layer <b>{}</b> ({} of {} prompts agree), massive dims {}, massive token(s) {}.",
          model_line(d), me, pct(d.get("me_layer_consistency")), d["settings"]["prompts"], d["massive_dims"],
          ", ".join(f"{t['token']!r} at position {t['position']}" for t in d["massive_tokens"][:3])),
    ]
    rows = []
    for r in d["decomposition"]:
        rows.append([r["dim"], num(r["residual_in"]), num(r["attn_branch"]), num(r["ffn_branch"]), num(r["residual_out"]),
                     pct(r.get("ffn_share_of_update")), num(r.get("mlp_raw")), num(r.get("post_ffn_norm_realised_gain"))])
    blocks.append(table(f"Branch decomposition at layer {me} (massive token): residual in + attention + FFN = residual out",
                        ["dim", "residual in", "attention branch", "FFN branch", "residual out", "FFN share of update",
                         "raw FFN output", "post-FFN norm gain"], rows,
                        note="raw FFN output and post-FFN norm gain only where a norm follows the FFN (e.g. Gemma)"))
    main_dim = d["massive_dims"][0] if d["massive_dims"] else None
    rows = [[t["neuron"], t["dim"], num(t["contribution"]), pct(t["share"]), num(t["activation"]), num(t["down_weight"]),
             "yes" if t["selected"] else ""] for t in d["top_neurons"] if t["dim"] == main_dim][:10]
    blocks.append(table(f"Top FFN neurons on dim {main_dim} (activation x down-projection entry)",
                        ["neuron", "dim", "contribution", "share of FFN output", "activation", "down weight", "ablated"],
                        rows))
    rows = [[sw["tensor"], f"[{sw['row']}, {sw['column']}]", num(sw["value"]), num(sw["ratio_to_median_abs_weight"], 3),
             pct(sw["share_of_ffn_output"])] for sw in d["super_weights"][:8]]
    if rows:
        blocks.append(table("Super weights", ["tensor", "[row, column]", "value", "x median |w|", "share of FFN output"], rows))
    if d.get("driving_dims"):
        blocks.append(p("FFN-input dims driving the top neurons: {}.", ", ".join(map(str, d["driving_dims"]))))
    rows = []
    for nrm in d["norm_gains"]:
        for e in nrm["dims"]:
            rows.append([nrm["role"], f"{e['kind']} {e['dim']}", num(e["gain"]), num(e["ratio_to_median"], 3),
                         e.get("rank_by_abs_gain", "-"), num(nrm["median_gain"], 3)])
    if rows:
        blocks.append(table(f"Norm gains in layer {me} on the massive and driving dims", ["norm", "dim", "gain",
                            "x median gain", "rank by |gain|", "median gain"], rows))
    blocks.append(figs.figure(lambda: explain_mechanism_figure(d),
                              f"Who writes the massive value at layer {me}: |residual in|, |attention|, |FFN| and "
                              "|residual out| on each massive dim (log), and each top neuron's share of the FFN output.",
                              "Bar charts of the branch decomposition on the massive dims and of per-neuron shares."))
    sup = d.get("super_experts")
    if sup is not None:
        chosen = {(r["layer"], r["expert"]) for r in sup["super_experts"]}
        named = {(sup["melayer"]["layer"], e) for e in sup["melayer"]["experts"]}
        rows = [[r["layer"], r["expert"], num(r["max_abs_output"]), r["dim"], "yes" if (r["layer"], r["expert"]) in chosen else "",
                 "yes" if (r["layer"], r["expert"]) in named else ""] for r in sup["largest"]]
        blocks.append(table("Super experts by Su et al.'s criterion, beside the expert(s) explain names",
                            ["layer", "expert", "max |down output|", "channel", "super expert", "named by explain"], rows,
                            note=sup["criterion"]))
    sections = [{"id": "", "title": "Branch decomposition, top neurons and super weights", "blocks": blocks}]

    runs = d["ablations"] + d["controls"]["layers"]
    rows, hl = [], set()
    for i, r in enumerate(runs):
        rows.append([r["ablate"], f"{r['layer']} ({r['role']})", num(r["downstream_max"]), pct(r["downstream_ratio"]),
                     pct(r.get("downstream_mean_ratio")), r["outcome"], num(r["ppl"]), num(r.get("ppl_ratio"), 3)])
        if r["role"] == "me":
            hl.add(i)
    rnd = d["controls"].get("random") or {}
    if rnd.get("draws"):
        dm, pp = rnd["downstream_max"], rnd["ppl"]
        rows.append([f"random neurons x{rnd['draws']} ({rnd['neurons_per_draw']} each)", f"{me} (random)",
                     f"{num(dm['mean'])} ± {num(dm['std'], 2)}", pct(rnd.get("downstream_ratio_mean")), "-",
                     ", ".join(sorted({r["outcome"] for r in rnd["runs"]})), f"{num(pp['mean'])} ± {num(pp['std'], 2)}",
                     "-"])
    for r in d["controls"].get("experts", {}).get("runs", []):
        what = f"experts {r['experts']}" if r.get("experts") else f"neurons {r['neurons']}"
        rows.append([f"{r['ablate']} ({what})", f"{r['layer']} (control)", num(r["downstream_max"]),
                     pct(r["downstream_ratio"]), pct(r.get("downstream_mean_ratio")), r["outcome"], num(r["ppl"]),
                     num(r.get("ppl_ratio"), 3)])
    st = d["settings"]
    ab = [p("Each run edits the model temporarily, re-runs the scan and the perplexity of a fixed shipped text; "
            "the model was bit-identical afterwards: <b>{}</b>.", d.get("model_check", {}).get("bit_identical")),
          table("Full-factorial ablation at the ME layer, with controls at other layers and random neurons",
                ["ablation", "layer (role)", "downstream max |a|", "vs none", "per-layer ratio", "ME layer after",
                 "perplexity", "ppl ratio"], rows, highlight=hl),
          {"kind": "dl", "items": [
              ("norm", st.get("norm_ablation", "")), ("ffn", st.get("ffn_ablation", "")),
              ("both", "norm and ffn together"),
              *([("expert controls", d["controls"]["experts"]["meaning"])] if "experts" in d["controls"] else []),
              ("downstream max", st.get("downstream_max", "")),
              ("per-layer ratio", st.get("downstream_mean_ratio", "")),
              *[(k, v) for k, v in OUTCOMES]]},
          p("{}", ablation_reading(d))]
    ab.append(figs.figure(lambda: explain_ablations_figure(d),
                          "Left: the massive token's largest |a| on the massive dims per layer under each ablation at "
                          "the ME layer (log). Right: downstream maximum (bars, log) and perplexity (triangles) of every "
                          "run, controls included.",
                          "Line chart of per-layer magnitudes under each ablation and a bar chart of the downstream "
                          "maximum and perplexity of every ablation run."))
    sections.append({"id": "", "title": "Full-factorial ablation", "blocks": ab})
    return sections


def ablation_reading(d: dict[str, Any]) -> str:
    """One sentence read off the ablation table (no judgement beyond what the outcomes say)."""
    at_me = {r["ablate"]: r for r in d["ablations"] if r["role"] == "me"}
    parts = [f"{k}: {at_me[k]['outcome']} ({pct(at_me[k]['downstream_ratio'], 0)} of the downstream maximum)"
             for k in ("norm", "ffn", "both", "expert") if k in at_me]
    ctrl = [r["downstream_ratio"] for r in d["controls"]["layers"] if r.get("downstream_ratio") is not None]
    text = f"At the ME layer {d['me_layer']}: " + "; ".join(parts) + "."
    if ctrl:
        moved = sorted({r["outcome"] for r in d["controls"]["layers"]})
        text += (f" The same ablations at control layers keep {pct(min(ctrl), 0)}-{pct(max(ctrl), 0)} of it "
                 f"(outcomes: {', '.join(moved)}).")
    rnd = d["controls"].get("random") or {}
    if rnd.get("draws"):
        text += f" Random neurons at the ME layer keep {pct(rnd.get('downstream_ratio_mean'), 0)}."
    expert_runs = d["controls"].get("experts", {}).get("runs", [])
    if expert_runs:
        kept = [r["downstream_ratio"] for r in expert_runs if r.get("downstream_ratio") is not None]
        text += (f" Removing other routed experts of the layer, or the named neurons' counterparts in them, keeps "
                 f"{pct(min(kept), 0)}-{pct(max(kept), 0)}." if kept else "")
    return text
