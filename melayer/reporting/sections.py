"""The report's sections, built from melayer's JSON dicts (one builder per schema kind).

A section is a plain dict the template renders: ``{"id", "title", "kind", "source", "blocks": [...]}``; a
block is a paragraph (``p``, markup-safe text), a ``table`` (caption, header, rows), a ``figure`` (inline SVG,
caption, alt text, optionally a plotly spec), a ``list`` or a ``dl`` (key -> value). Nothing here computes
results: every number comes from the JSON a melayer command wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from markupsafe import Markup

from melayer.reporting import figures as F
from melayer.reporting.format import ci, conditions, num, pct
from melayer.reporting.results import KINDS

Section = dict[str, Any]

TITLES = {k: kind.title for k, kind in KINDS.items()}


# --------------------------------------------------------------------------------------------------
# formatting


def p(text: str, *args: Any) -> dict[str, Any]:
    """A paragraph; ``text`` is trusted markup from this module, ``args`` are escaped into it."""
    return {"kind": "p", "html": Markup(text).format(*args)}


def table(caption: str, header: list[str], rows: list[list[Any]], note: str | None = None,
          numeric: bool = True, highlight: set[int] | None = None) -> dict[str, Any]:
    return {"kind": "table", "caption": caption, "header": header, "rows": [[str(c) for c in r] for r in rows],
            "note": note, "numeric": numeric, "highlight": highlight or set()}


class Figures:
    """Renders figures to inline SVG with ids unique in the page; keeps plotly specs when interactive."""

    def __init__(self, interactive: bool = False, prefix: str = "fig") -> None:
        self.n = 0
        self.interactive = interactive
        self.prefix = prefix  # notebook fragments get a unique one: many may share one page

    def figure(self, build: Callable[[], Any], caption: str, alt: str, plotly: Callable[[], Any] | None = None,
               wide: bool = True) -> dict[str, Any]:
        self.n += 1
        fig_id = f"{self.prefix}{self.n}"
        spec = None
        if self.interactive and plotly is not None:
            from melayer.reporting import interactive as I

            spec = I.to_json(plotly())
        return {"kind": "figure", "id": fig_id, "svg": Markup(F.to_svg(build(), f"melayer-{fig_id}", alt)),
                "caption": caption, "alt": alt, "number": self.n, "plotly": spec, "wide": wide}


def model_line(d: dict[str, Any]) -> Markup:
    parts = []
    if d.get("arch"):
        parts.append(str(d["arch"]))
    if d.get("num_layers"):
        parts.append(f"{d['num_layers']} decoder layers")
    if d.get("hidden_size"):
        parts.append(f"hidden size {d['hidden_size']}")
    if d.get("dtype"):
        parts.append(str(d["dtype"]))
    return Markup("<b>{}</b>{}").format(d.get("model", "?"), f" ({', '.join(parts)})" if parts else "")


def criterion_words(c: dict[str, Any]) -> dict[str, Any]:
    return p("A value is <b>massive</b> if |a| &gt; {} and |a| &gt; {}&times; the median |a| of that layer's output. "
             "The <b>ME layer</b> is the first decoder layer (0-based, the layer's raw output) holding a massive "
             "(token, dim) that <b>persists</b>: it stays above {} and above {}&times; the layer median in the next "
             "layer and in at least {} of all later layers. Massive values before the ME layer are "
             "<i>precursors</i>, later ones on a (token, dim) that does not persist are <i>transient</i>. Each "
             "prompt with at least {} tokens votes for its own ME layer; the consensus is the mode.",
             num(c["abs_min"]), num(c["median_ratio"]), num(c["abs_min"]), num(c["persist_ratio"]),
             pct(c["persist_frac"], 0), c.get("min_tokens", "-"))


# --------------------------------------------------------------------------------------------------
# scan


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
    sections = [{"id": "", "title": TITLES["scan"], "blocks": blocks}]

    per = d["per_layer"]
    rows = [[f"{r['layer']}" + (" (ME)" if r["layer"] == me else ""), num(r["median"], 3), num(r["top1_mean"]),
             num(r["top2_mean"]), num(r["top3_mean"]), pct(r["massive_share"], 0)] for r in per]
    mag = [
        figs.figure(lambda: _layer_magnitudes(d), f"Per-layer magnitudes of {d['model']}: the mean over prompts of the "
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
        dims = F.profile_dims(d)
        names = ", ".join(f"dim {dd} ({k})" for dd, k in dims)
        from melayer.reporting import interactive as I

        sections.append({"id": "", "title": "The massive token over layers and dims", "blocks": [
            figs.figure(lambda: F.magnitude_map(d),
                        f"Left: |a| of token {prof['token']!r} (prompt {prof['prompt']}, position {prof['position']}) "
                        "at every layer (rows) and hidden dim (columns), log colour scale, so precursors and the "
                        "persistent dim both show; ME layer dashed. Right: the dims that matter per layer against "
                        f"the criterion's thresholds ({names}).",
                        f"Heatmap of the massive token's absolute activation over layers and hidden dims on a log "
                        f"scale, and a line chart of {names} per layer with the massive and persistence thresholds.",
                        plotly=lambda: I.magnitude_map(d)),
        ]})
    return sections


def _layer_magnitudes(d: dict[str, Any]) -> Any:
    from melayer.reporting import plots

    return plots.layer_magnitudes_figure(d)


# --------------------------------------------------------------------------------------------------
# explain

OUTCOMES = [
    ("stays", "the re-run scan still finds the ME layer at the same layer: the ablation did not remove the mechanism"),
    ("moves to N", "a persistent massive activation now first appears at layer N: another layer can produce it"),
    ("no ME layer", "no persistent massive activation anywhere: the ablation removed it"),
]


def explain_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    from melayer.reporting import plots_analysis as PA

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
    blocks.append(figs.figure(lambda: PA.explain_mechanism_figure(d),
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
    ab.append(figs.figure(lambda: PA.explain_ablations_figure(d),
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


# --------------------------------------------------------------------------------------------------
# rigidity, sinks


def rigidity_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    from melayer.reporting import plots_analysis as PA

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
              figs.figure(lambda: PA.rigidity_figure(d),
                          "Left: cosine between consecutive layers' states. Middle: similarity of the same position "
                          "across prompts. Right: effective rank of the attention inputs with and without the massive "
                          "token (and without another token as control). ME layer dashed.",
                          "Three line charts of rigidity measures per layer.")]
    return [{"id": "", "title": TITLES["rigidity"], "blocks": blocks}]


def sinks_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    from melayer.reporting import plots_analysis as PA

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
        figs.figure(lambda: PA.sinks_heatmap_figure(d),
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
    return [{"id": "", "title": TITLES["sinks"], "blocks": blocks}]


# --------------------------------------------------------------------------------------------------
# eval, compare


def eval_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    s = d["settings"]
    rows = [[name, num(m["value"]), ci(m["ci95"]), m["n"]] for name, m in d["metrics"].items()]
    iv = s.get("intervention")
    blocks = [p("Model <b>{}</b> on <b>{}</b>: {} samples; prompt format: {}.", d["model"], d["task"], d["n_samples"],
                s.get("prompt_format", "-")),
              p("Intervention: {}.", (iv or {}).get("rule", iv) if iv else "none"),
              table("Metrics (percentile bootstrap 95 % CI over samples)", ["metric", "value", "95 % CI", "n"], rows)]
    return [{"id": "", "title": f"{TITLES['eval']}: {d['task']}", "blocks": blocks}]


def compare_sections(d: dict[str, Any], figs: Figures, kinds: dict[str, bool] | None = None) -> list[Section]:
    from melayer.reporting import interactive as I

    s = d["settings"]
    layers = d.get("layers") or []
    span = f"{layers[0]}-{layers[-1]}" if layers and layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
    blocks: list[dict[str, Any]] = [
        p("Model <b>{}</b> on <b>{}</b>: the same {} samples at every WeMask rate; select={}, gamma {}, layers {} "
          "(after ME layer {}, {}). Differences are paired (same samples), with a paired bootstrap 95 % CI ({} "
          "resamples); McNemar's exact p for 0/1 metrics.", d["model"], d["task"], s["n_samples"], d["select"],
          num(d["gamma"]), span, d["me_layer"], d["me_layer_source"], s.get("bootstrap", {}).get("resamples", "-")),
    ]
    sinks = d.get("sinks") or {}
    if sinks.get("note"):
        blocks.append(p("Sink rate not measured: {}.", sinks["note"]))
    blocks.append(figs.figure(lambda: F.dose_response(d, kinds),
                              "Dose-response as the paired difference of each metric to rate 0 (same samples) with its "
                              "bootstrap 95 % CI and McNemar's p; the last panel is the sink rate at each rate.",
                              f"Line charts of the difference to rate 0 of {', '.join(d['per_rate'][0]['metrics'])} "
                              "per WeMask rate with confidence intervals, and the sink rate per rate.",
                              plotly=lambda: I.dose_response(d)))
    for name in d["per_rate"][0]["metrics"]:
        rows = []
        for r in d["per_rate"]:
            m = r["metrics"][name]
            vs, mc = m.get("vs_baseline"), m.get("mcnemar")
            rows.append([num(r["rate"]), r.get("wemask", {}).get("k", "-"), f"{num(m['value'])} {ci(m['ci95'])}",
                         f"{num(vs['diff'], 3)} {ci(vs['ci95'])}" if vs else "baseline",
                         f"{mc['p']:.3g} (+{mc['gained']} / -{mc['lost']})" if mc else "-", num(r.get("sink_rate"), 3)])
        blocks.append(table(f"{name}", ["rate", "k (dims masked)", "value [95 % CI]", "difference to rate 0 [paired 95 % CI]",
                                        "McNemar p (+gained / -lost)", "sink rate"], rows))
    rule = next((r["wemask"].get("rule") for r in d["per_rate"] if r["rate"] != 0 and r.get("wemask")), None)
    if rule:
        blocks.append(p("Mask rule: {}.", rule))
    blocks.extend(method_blocks(d, figs, kinds))
    return [{"id": "", "title": f"{TITLES['compare']}: {d['task']}", "blocks": blocks}]


def method_blocks(d: dict[str, Any], figs: Figures, kinds: dict[str, bool] | None = None) -> list[dict[str, Any]]:
    """The forest plot (every condition x metric, paired difference to unmodified) and, per metric, every
    condition's paired difference, McNemar p, Benjamini-Hochberg p, sink rate and massive activation downstream."""
    conds = conditions(d)
    if not conds:
        return []
    names = list(d["per_rate"][0]["metrics"])
    blocks: list[dict[str, Any]] = [figs.figure(
        lambda: F.forest(d, kinds),
        "Forest plot: each condition's paired difference to the unmodified model (same samples) with its bootstrap "
        "95 % CI, one panel per metric; filled markers where the Benjamini-Hochberg-adjusted McNemar p <= 0.05.",
        f"Forest plot of the paired differences to the unmodified model of {', '.join(names)} for "
        f"{len(conds)} conditions, with confidence intervals.")]
    cal = d.get("calibration")
    if d.get("per_method"):
        blocks.append(p("Methods' calibration (never evaluated): {}; ME layer {}.", (cal or {}).get("source", "-"),
                        (cal or {}).get("me_layer", "-")))
    base = d["per_rate"][0]
    for name in names:
        b = base["metrics"][name]
        rows = [["unmodified", f"{num(b['value'])} {ci(b['ci95'])}", "-", "-", "-", num(base.get("sink_rate"), 3), "1"]]
        for label, row in conds:
            m = row["metrics"].get(name) or {}
            vs, mc = m.get("vs_baseline"), m.get("mcnemar")
            rows.append([label, f"{num(m.get('value'))} {ci(m.get('ci95'))}",
                         f"{num(vs['diff'], 3)} {ci(vs['ci95'])}" if vs else "-",
                         f"{mc['p']:.3g} (+{mc['gained']} / -{mc['lost']})" if mc else "-",
                         f"{mc['p_bh']:.3g}" if mc and "p_bh" in mc else "-", num(row.get("sink_rate"), 3),
                         num(row.get("massive_downstream"), 3)])
        blocks.append(table(f"{name}: every condition against the unmodified model",
                            ["condition", "value [95 % CI]", "difference [paired 95 % CI]", "McNemar p (+gained / -lost)",
                             "BH-adjusted p", "sink rate", "massive after ME layer (relative)"], rows))
    rules = [[label, (row.get("intervention") or {}).get("rule", "-")] for label, row in conds if row.get("method")]
    if rules:
        blocks.append(table("What each method did", ["method", "rule"], rules, numeric=False))
    return blocks


# --------------------------------------------------------------------------------------------------
# fine-tuning (finetune.json + train_log.jsonl)


def finetune_sections(d: dict[str, Any], figs: Figures, log: list[dict[str, Any]] | None = None) -> list[Section]:
    cfg = d.get("config") or {}
    wm = d.get("wemask") or {}
    blocks: list[dict[str, Any]] = [
        p("Model <b>{}</b>, method <b>{}</b>: {} steps, final loss {}, mean training loss {}, {} s ({} tokens/s).",
          d.get("model", "?"), d.get("method", "?"), d.get("steps", "-"), num(d.get("final_loss")),
          num(d.get("train_loss")), num(d.get("runtime_s"), 3), num(d.get("tokens_per_s"), 3)),
        p("WeMask during training: {}.", wm.get("rule") or (f"rate {num(wm.get('rate'))}" if wm else "none")),
    ]
    keys = [k for k in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                        "num_train_epochs", "max_steps", "lora_r", "lora_alpha", "lora_target_modules", "full", "seed",
                        "data", "limit", "lr", "batch_size", "grad_accum", "epochs", "target") if k in cfg]
    rows = [[k, cfg[k]] for k in keys] + [[f"TRL: {k}", v] for k, v in (cfg.get("trl_args") or {}).items()]
    if rows:
        blocks.append(table("Training settings", ["setting", "value"], rows, numeric=False))
    if log and F.curve_groups(log):
        blocks.append(figs.figure(lambda: F.training_curves(log, f"{d.get('model', '')} - {d.get('method', '')}"),
                                  "Training curves per optimizer step from train_log.jsonl.",
                                  "Line charts of training loss and other logged values per step."))
    elif log is not None:
        blocks.append(p("train_log.jsonl holds fewer than two logged steps: no curve to draw."))
    return [{"id": "", "title": f"{TITLES['finetune']}: {d.get('method', '')}", "blocks": blocks}]


# --------------------------------------------------------------------------------------------------
# weights (the ME layer read off the weights, no forward pass)


def plain_sections(d: dict[str, Any], figs: Figures, title: str) -> list[Section]:
    """An analysis registered without sections of its own: a table of its top-level values (numbers, text)."""
    rows = [[k, num(v)] for k, v in d.items() if k != "schema" and (v is None or isinstance(v, (int, float, str)))]
    return [{"id": "", "title": title, "blocks": [table("Values", ["field", "value"], rows, numeric=False)]}]


def weights_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    from melayer.reporting.weights import headline, score_figure

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
    return [{"id": "", "title": TITLES["weights"], "blocks": blocks}]


