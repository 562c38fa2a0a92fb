"""Rendering of eval.json / compare.json: rich tables on stdout and the dose-response plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from melayer.reporting.format import ci, num
from melayer.util.console import out


def print_eval(d: dict[str, Any]) -> None:
    s = d["settings"]
    out.print(f"[bold]{d['model']}[/] on [bold]{d['task']}[/]: {d['n_samples']} samples, chat template "
              f"{'on' if s['chat'] else 'off'}" + (f", max_new_tokens {s['max_new_tokens']}" if s["max_new_tokens"] else ""))
    out.print(f"prompt format: {s['prompt_format']}")
    if s.get("intervention"):
        out.print(f"intervention: {s['intervention'].get('rule', s['intervention'])}")
    t = Table("metric", "value", "95% CI (bootstrap)", "n")
    for name, m in d["metrics"].items():
        t.add_row(name, num(m["value"]), ci(m["ci95"]), str(m["n"]))
    out.print(t)


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


def _conditions(d: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, row) of every modified condition of a compare: WeMask rates > 0, then the methods."""
    rows = [(f"wemask:rate={r['rate']:g}", r) for r in d["per_rate"] if r["rate"] != 0]
    return rows + [(r["method"], r) for r in d.get("per_method") or []]


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
        for label, row in _conditions(d):
            m = row["metrics"][name]
            vs, mc = m.get("vs_baseline"), m.get("mcnemar")
            t.add_row(label, f"{num(m['value'])} {ci(m['ci95'])}", f"{num(vs['diff'])} {ci(vs['ci95'])}" if vs else "-",
                      f"{mc['p']:.3g} (+{mc['gained']}/-{mc['lost']})" if mc else "-",
                      f"{mc['p_bh']:.3g}" if mc and "p_bh" in mc else "-", num(row.get("sink_rate")),
                      num(row.get("massive_downstream")))
        out.print(t)
    for label, row in _conditions(d):
        iv = row.get("intervention") or row.get("wemask") or {}
        if iv.get("rule") and not label.startswith("wemask:rate="):
            out.print(f"[dim]{label}: {iv['rule']}[/]")


def forest_plot(data: dict[str, Any], path: str | Path) -> Path:
    """Method x metric forest plot: each condition's paired difference to the unmodified model with its bootstrap
    95% CI; filled markers where the BH-adjusted McNemar p <= 0.05."""
    import matplotlib.pyplot as plt

    from melayer.reporting.plots import save

    conds = _conditions(data)
    metrics = list(data["per_rate"][0]["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 2, 0.45 * len(conds) + 1.6),
                             sharey=True, squeeze=False)
    ys = list(range(len(conds)))[::-1]
    for ax, name in zip(axes[0], metrics):
        for y, (_label, row) in zip(ys, conds):
            m = row["metrics"][name]
            vs, mc = m.get("vs_baseline") or {}, m.get("mcnemar") or {}
            diff, ci = vs.get("diff"), vs.get("ci95") or [None, None]
            if diff is None or diff != diff:
                continue
            lo, hi = (ci[0], ci[1]) if ci[0] is not None and ci[0] == ci[0] else (diff, diff)
            ax.plot([lo, hi], [y, y], color="C0", lw=1.5)
            sig = mc.get("p_bh", 1.0) <= 0.05
            ax.plot([diff], [y], "o", color="C0", markerfacecolor="C0" if sig else "white")
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("difference to unmodified")
    axes[0][0].set_yticks(ys, [label for label, _ in conds], fontsize=8)
    fig.suptitle(f"{data['model']} on {data['task']} ({data['settings']['n_samples']} paired samples); filled: BH p <= 0.05",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def dose_response_plot(data: dict[str, Any], path: str | Path) -> Path:
    """The dose-response as the paired difference of each metric to rate 0 with its bootstrap 95% CI and
    McNemar's p, plus the sink rate per rate (see :func:`melayer.reporting.figures.dose_response`)."""
    from melayer.reporting.figures import dose_response
    from melayer.reporting.page import metric_directions
    from melayer.reporting.plots import save

    kinds = metric_directions(Path(data["output"])) if data.get("output") else None
    return save(dose_response(data, kinds), path)
