"""Rendering of ``melayer compare`` (``compare.json``): the console tables, the dose-response and forest plots
(PNG, and the dose-response interactive in the report) and the report's section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from melayer.reporting.blocks import Figures, Section, p, table
from melayer.reporting.format import ci, num
from melayer.reporting.plotting import finite, plt, save, tex_safe, tight_layout
from melayer.reporting.results import KINDS
from melayer.util.console import out


def conditions(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, row) of every modified condition of a compare: WeMask rates > 0, then the methods."""
    rows = [(f"wemask:rate={r['rate']:g}", r) for r in data["per_rate"] if r["rate"] != 0]
    return rows + [(str(r["method"]), r) for r in data.get("per_method") or []]


def metric_directions(compare_dir: Path) -> dict[str, bool]:
    """higher_is_better per metric, from the baseline run's eval.json when it is there."""
    base = compare_dir / "rate_0" / "eval.json"
    try:
        kinds = json.loads(base.read_text()).get("metric_kinds") or {}
        return {k: bool(v["higher_is_better"]) for k, v in kinds.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def report_extra(path: Path) -> dict[str, Any]:
    """The metrics' directions for the report's figures (from the baseline run beside ``compare.json``)."""
    return {"kinds": metric_directions(path.parent)}


def print_compare(d: dict[str, Any]) -> None:
    s = d["settings"]
    layers = d["layers"]
    span = f"{layers[0]}-{layers[-1]}" if layers and layers == list(range(layers[0], layers[-1] + 1)) else layers
    out.print(f"[bold]{d['model']}[/] on [bold]{d['task']}[/]: {s['n_samples']} paired samples; WeMask select="
              f"{d['select']}, gamma {d['gamma']:g}, ME layer {d['me_layer']} ({d['me_layer_source']}), layers {span}")
    sinks = d["sinks"]
    if sinks.get("note"):
        out.print(f"[yellow]sink rate not measured: {sinks['note']}[/]")
    for name in d["per_rate"][0]["metrics"]:
        t = Table("rate", "k", f"{name} [95% CI]", "diff vs rate 0 [paired 95% CI]", "McNemar p (+gained/-lost)",
                  "sink rate", title=name)
        for row in d["per_rate"]:
            m = row["metrics"][name]
            vs = m.get("vs_baseline")
            mc = m.get("mcnemar")
            t.add_row(f"{row['rate']:g}", str(row["wemask"].get("k", "-")), f"{num(m['value'])} {ci(m['ci95'])}",
                      f"{num(vs['diff'])} {ci(vs['ci95'])}" if vs else "-",
                      f"{mc['p']:.3g} (+{mc['gained']}/-{mc['lost']})" if mc else "-",
                      num(row.get("sink_rate")))
        out.print(t)
    print_methods(d)


def print_methods(d: dict[str, Any]) -> None:
    """One table per metric over every condition: paired difference, McNemar p and BH-adjusted p, sink rate,
    downstream massive activation relative to the unmodified model."""
    if not d.get("per_method"):
        return
    cal = d.get("calibration") or {}
    out.print(f"calibration (never evaluated): {cal.get('source', '-')}; ME layer {cal.get('me_layer')}")
    for name in d["per_rate"][0]["metrics"]:
        t = Table("method", f"{name} [95% CI]", "diff vs unmodified [paired 95% CI]", "McNemar p", "BH p",
                  "sink rate", "massive after ME (rel.)", title=name)
        base = d["per_rate"][0]
        t.add_row("unmodified", f"{num(base['metrics'][name]['value'])} {ci(base['metrics'][name]['ci95'])}",
                  "-", "-", "-", num(base.get("sink_rate")), "1")
        for label, row in conditions(d):
            m = row["metrics"][name]
            vs, mc = m.get("vs_baseline"), m.get("mcnemar")
            t.add_row(label, f"{num(m['value'])} {ci(m['ci95'])}", f"{num(vs['diff'])} {ci(vs['ci95'])}" if vs else "-",
                      f"{mc['p']:.3g} (+{mc['gained']}/-{mc['lost']})" if mc else "-",
                      f"{mc['p_bh']:.3g}" if mc and "p_bh" in mc else "-", num(row.get("sink_rate")),
                      num(row.get("massive_downstream")))
        out.print(t)
    for label, row in conditions(d):
        iv = row.get("intervention") or row.get("wemask") or {}
        if iv.get("rule") and not label.startswith("wemask:rate="):
            out.print(f"[dim]{label}: {iv['rule']}[/]")


def dose_response(data: dict[str, Any], higher_is_better: dict[str, bool] | None = None) -> Any:
    """One panel per metric: the difference to rate 0 over the same samples with its paired bootstrap 95% CI
    (rate 0 is 0 by construction), McNemar's p above each binary point; then the sink rate per rate."""
    rows = data["per_rate"]
    names = list(rows[0]["metrics"])
    with_sinks = all(finite(r.get("sink_rate")) for r in rows)
    panels = names + (["sink rate"] if with_sinks else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.7), squeeze=False)
    x = np.arange(len(rows))
    labels = [f"{r['rate']:g}\nk={r.get('wemask', {}).get('k', 0)}" for r in rows]
    for ax, name in zip(axes[0], panels):
        if name == "sink rate":
            ax.plot(x, [r["sink_rate"] for r in rows], "-s", color="tab:red", ms=4)
            ax.set_ylim(0, 1.05)
            used = data["sinks"]["prompts"] - (data["sinks"].get("prompts_skipped_too_short") or 0)
            ax.set_title(f"sink rate (eps={data['sinks']['epsilon']:g}, {used} prompts)", fontsize=9)
            ax.set_ylabel("share of (layer, head) pairs", fontsize=8)
        else:
            diff, lo, hi, ps = [], [], [], []
            for r in rows:
                m = r["metrics"][name]
                vs = m.get("vs_baseline")
                if r["rate"] == 0 or vs is None:
                    diff.append(0.0 if r["rate"] == 0 else np.nan)
                    lo.append(np.nan)
                    hi.append(np.nan)
                else:
                    diff.append(vs["diff"] if finite(vs["diff"]) else np.nan)
                    ci = vs.get("ci95") or [None, None]
                    lo.append(ci[0] if finite(ci[0]) else np.nan)
                    hi.append(ci[1] if finite(ci[1]) else np.nan)
                ps.append((m.get("mcnemar") or {}).get("p"))
            d, lo_a, hi_a = np.array(diff), np.array(lo), np.array(hi)
            err = np.vstack([np.nan_to_num(d - lo_a, nan=0.0).clip(0), np.nan_to_num(hi_a - d, nan=0.0).clip(0)])
            ax.axhline(0, color="gray", lw=0.8, ls="--")
            ax.errorbar(x, d, yerr=err, fmt="-o", capsize=4, ms=4, color="tab:blue")
            for xi, yi, p in zip(x, d, ps):
                if p is not None and np.isfinite(yi):
                    ax.annotate(f"p={p:.2g}", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=7)
            better = (higher_is_better or {}).get(name)
            arrow = "" if better is None else (" (higher is better)" if better else " (lower is better)")
            ax.set_title(f"{tex_safe(name)}: difference to rate 0{arrow}", fontsize=9)
            ax.set_ylabel("paired difference, 95% bootstrap CI", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlim(-0.4, len(rows) - 0.4)
        ax.set_xlabel("WeMask rate", fontsize=8)
    fig.suptitle(f"{tex_safe(data['model'])} - {tex_safe(data['task'])} (n={data['settings']['n_samples']} paired "
                 f"samples, select={data['select']}, ME layer {data['me_layer']})", fontsize=9)
    tight_layout(fig)
    return fig


def forest(data: dict[str, Any], higher_is_better: dict[str, bool] | None = None) -> Any:
    """Method x metric forest plot: one panel per metric, one row per condition (WeMask rates, then the
    methods), the paired difference to the unmodified model with its bootstrap 95% CI; filled markers where the
    Benjamini-Hochberg-adjusted McNemar p <= 0.05."""
    conds = conditions(data)
    metrics = list(data["per_rate"][0]["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 2.2, 0.42 * len(conds) + 1.7),
                             sharey=True, squeeze=False)
    ys = list(range(len(conds)))[::-1]
    for ax, name in zip(axes[0], metrics):
        for y, (_label, row) in zip(ys, conds):
            m = row["metrics"].get(name) or {}
            vs, mc = m.get("vs_baseline") or {}, m.get("mcnemar") or {}
            diff, ci = vs.get("diff"), vs.get("ci95") or [None, None]
            if not finite(diff):
                continue
            lo, hi = (ci[0], ci[1]) if finite(ci[0]) and finite(ci[1]) else (diff, diff)
            ax.plot([lo, hi], [y, y], color="tab:blue", lw=1.5)
            p_bh = mc.get("p_bh")
            sig = isinstance(p_bh, (int, float)) and finite(p_bh) and p_bh <= 0.05
            ax.plot([diff], [y], "o", color="tab:blue", markerfacecolor="tab:blue" if sig else "white", ms=5)
        ax.axvline(0, color="gray", lw=0.8, ls="--")
        better = (higher_is_better or {}).get(name)
        arrow = "" if better is None else (" (higher is better)" if better else " (lower is better)")
        ax.set_title(f"{tex_safe(name)}{arrow}", fontsize=9)
        ax.set_xlabel("paired difference to unmodified, 95% CI", fontsize=8)
    axes[0][0].set_yticks(ys, [tex_safe(label) for label, _ in conds], fontsize=8)
    axes[0][0].set_ylim(-0.7, len(conds) - 0.3)
    fig.suptitle(f"{tex_safe(data['model'])} - {tex_safe(data['task'])} ({data['settings']['n_samples']} paired "
                 "samples); filled: BH-adjusted McNemar p <= 0.05", fontsize=9)
    tight_layout(fig)
    return fig


def dose_response_plot(data: dict[str, Any], path: str | Path) -> Path:
    """The dose-response as the paired difference of each metric to rate 0 with its bootstrap 95% CI and
    McNemar's p, plus the sink rate per rate (see :func:`melayer.reporting.figures.dose_response`)."""
    kinds = metric_directions(Path(data["output"])) if data.get("output") else None
    return save(dose_response(data, kinds), path)


def forest_plot(data: dict[str, Any], path: str | Path) -> Path:
    """Method x metric forest plot (see :func:`melayer.reporting.figures.forest`) as a PNG at ``path``."""
    kinds = metric_directions(Path(data["output"])) if data.get("output") else None
    return save(forest(data, kinds), path)


def dose_response_plotly(data: dict[str, Any]) -> Any:
    """Paired difference to rate 0 per metric with its CI, hover shows the values and McNemar's p (plotly)."""
    from melayer.reporting.interactive import label, plotly_objects

    go = plotly_objects()
    rows = data["per_rate"]
    fig = go.Figure()
    labels = [f"{r['rate']:g} (k={r.get('wemask', {}).get('k', 0)})" for r in rows]
    for name in rows[0]["metrics"]:
        y, lo, hi, text = [], [], [], []
        for r in rows:
            m = r["metrics"][name]
            vs = m.get("vs_baseline") or {"diff": 0.0, "ci95": [0.0, 0.0]}
            d, (a, b) = vs["diff"], vs["ci95"]
            y.append(d)
            lo.append(0.0 if a is None or d is None else d - a)
            hi.append(0.0 if b is None or d is None else b - d)
            mc = m.get("mcnemar")
            text.append(f"value {m['value']:.4g}" + (f", McNemar p {mc['p']:.3g}" if mc else ""))
        fig.add_trace(go.Scatter(x=labels, y=y, name=label(name), mode="lines+markers", text=text,
                                 error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
                                 hovertemplate="%{x}: diff %{y:.4g}<br>%{text}<extra>" + label(name) + "</extra>"))
    fig.add_hline(y=0, line={"color": "gray", "dash": "dash", "width": 1})
    fig.update_layout(title=f"{label(data['model'])} - {label(data['task'])}: difference to rate 0 (paired 95% CI)",
                      xaxis_title="WeMask rate", yaxis_title="difference to rate 0", height=380,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def compare_sections(d: dict[str, Any], figs: Figures, kinds: dict[str, bool] | None = None) -> list[Section]:
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
    blocks.append(figs.figure(lambda: dose_response(d, kinds),
                              "Dose-response as the paired difference of each metric to rate 0 (same samples) with its "
                              "bootstrap 95 % CI and McNemar's p; the last panel is the sink rate at each rate.",
                              f"Line charts of the difference to rate 0 of {', '.join(d['per_rate'][0]['metrics'])} "
                              "per WeMask rate with confidence intervals, and the sink rate per rate.",
                              plotly=lambda: dose_response_plotly(d)))
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
    return [{"id": "", "title": f"{KINDS['compare'].title}: {d['task']}", "blocks": blocks}]


def method_blocks(d: dict[str, Any], figs: Figures, kinds: dict[str, bool] | None = None) -> list[dict[str, Any]]:
    """The forest plot (every condition x metric, paired difference to unmodified) and, per metric, every
    condition's paired difference, McNemar p, Benjamini-Hochberg p, sink rate and massive activation downstream."""
    conds = conditions(d)
    if not conds:
        return []
    names = list(d["per_rate"][0]["metrics"])
    blocks: list[dict[str, Any]] = [figs.figure(
        lambda: forest(d, kinds),
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
