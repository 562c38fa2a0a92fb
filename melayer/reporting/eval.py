"""Rendering of eval.json / compare.json: rich tables on stdout and the dose-response plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from melayer.reporting.format import ci, conditions, num
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


def forest_plot(data: dict[str, Any], path: str | Path) -> Path:
    """Method x metric forest plot (see :func:`melayer.reporting.figures.forest`) as a PNG at ``path``."""
    from melayer.reporting.figures import forest
    from melayer.reporting.page import metric_directions
    from melayer.reporting.plots import save

    kinds = metric_directions(Path(data["output"])) if data.get("output") else None
    return save(forest(data, kinds), path)


def dose_response_plot(data: dict[str, Any], path: str | Path) -> Path:
    """The dose-response as the paired difference of each metric to rate 0 with its bootstrap 95% CI and
    McNemar's p, plus the sink rate per rate (see :func:`melayer.reporting.figures.dose_response`)."""
    from melayer.reporting.figures import dose_response
    from melayer.reporting.page import metric_directions
    from melayer.reporting.plots import save

    kinds = metric_directions(Path(data["output"])) if data.get("output") else None
    return save(dose_response(data, kinds), path)
