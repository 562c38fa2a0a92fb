"""Figures for ``melayer explain``, ``melayer rigidity`` and ``melayer sinks`` (from their JSON dicts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from melayer.reporting.plots import plt, save, tex_safe, tight_layout

_KIND_STYLE = {"none": ("black", "-"), "norm": ("tab:blue", "--"), "ffn": ("tab:red", "-"), "both": ("tab:purple", ":"),
               "random": ("tab:gray", "-"), "expert": ("tab:green", "-"), "norm+expert": ("tab:olive", ":")}


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
    fig.suptitle(tex_safe(d["model"]))
    tight_layout(fig)
    return fig


def explain_mechanism(d: dict[str, Any], path: str | Path) -> Path:
    fig = explain_mechanism_figure(d)
    return save(fig, path)


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


def explain_norm_gains(d: dict[str, Any], path: str | Path) -> Path | None:
    fig = explain_norm_gains_figure(d)
    return None if fig is None else save(fig, path)


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
    fig.suptitle(tex_safe(d["model"]))
    tight_layout(fig)
    return fig


def explain_ablations(d: dict[str, Any], path: str | Path) -> Path:
    fig = explain_ablations_figure(d)
    return save(fig, path)


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
    ax.axvline(me, color="red", ls="--", lw=1)
    ax.set_xlabel("layer l")
    ax.set_ylabel("cos(h[l-1], h[l])")
    ax.set_title("consecutive-layer similarity")
    ax.legend(fontsize=7)
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
    ax.axvline(me, color="red", ls="--", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean pairwise cos across prompts")
    ax.set_title("cross-input invariance")
    ax.legend(fontsize=7)
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
    fig.suptitle(f"{tex_safe(d['model'])}: rigidity (ME layer {me})")
    tight_layout(fig)
    return fig


def rigidity_plot(d: dict[str, Any], path: str | Path) -> Path:
    fig = rigidity_figure(d)
    return save(fig, path)


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
    fig.suptitle(tex_safe(d["model"]))
    tight_layout(fig)
    return fig


def sinks_heatmap(d: dict[str, Any], path: str | Path) -> Path:
    fig = sinks_heatmap_figure(d)
    return save(fig, path)
