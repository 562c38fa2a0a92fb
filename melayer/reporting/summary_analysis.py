"""Human summaries for ``melayer explain``, ``melayer rigidity`` and ``melayer sinks`` (stdout)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from melayer.reporting.format import num
from melayer.util.console import out


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
