"""Rendering of eval.json / compare.json: rich tables on stdout and the dose-response plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from melayer.util.console import out


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}"


def _ci(ci: list[Any]) -> str:
    return f"[{_num(ci[0], 3)}, {_num(ci[1], 3)}]" if ci and ci[0] is not None else "-"


def print_eval(d: dict[str, Any]) -> None:
    s = d["settings"]
    out.print(f"[bold]{d['model']}[/] on [bold]{d['task']}[/]: {d['n_samples']} samples, chat template "
              f"{'on' if s['chat'] else 'off'}" + (f", max_new_tokens {s['max_new_tokens']}" if s["max_new_tokens"] else ""))
    out.print(f"prompt format: {s['prompt_format']}")
    if s.get("intervention"):
        out.print(f"intervention: {s['intervention'].get('rule', s['intervention'])}")
    t = Table("metric", "value", "95% CI (bootstrap)", "n")
    for name, m in d["metrics"].items():
        t.add_row(name, _num(m["value"]), _ci(m["ci95"]), str(m["n"]))
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
            t.add_row(f"{row['rate']:g}", str(row["wemask"].get("k", "-")), f"{_num(m['value'])} {_ci(m['ci95'])}",
                      f"{_num(vs['diff'])} {_ci(vs['ci95'])}" if vs else "-",
                      f"{mc['p']:.3g} (+{mc['gained']}/-{mc['lost']})" if mc else "-",
                      _num(row.get("sink_rate")))
        out.print(t)


def dose_response_plot(data: dict[str, Any], path: str | Path) -> Path:
    """One panel per metric (value with bootstrap 95% CI at each WeMask rate, baseline dashed), plus the sink
    rate when it was measured. Rates are evenly spaced and labelled with k, the number of masked dims."""
    from melayer.report.plots import plt, save

    rows = data["per_rate"]
    names = list(rows[0]["metrics"])
    with_sinks = all(r.get("sink_rate") is not None for r in rows)
    panels = names + (["sink rate"] if with_sinks else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False)
    x = list(range(len(rows)))
    labels = [f"{r['rate']:g}\nk={r['wemask'].get('k', 0)}" for r in rows]
    for ax, name in zip(axes[0], panels):
        if name == "sink rate":
            ax.plot(x, [r["sink_rate"] for r in rows], "-s", color="tab:red", ms=4)
            ax.set_ylim(0, 1.05)
            used = data["sinks"]["prompts"] - data["sinks"].get("prompts_skipped_too_short", 0)
            ax.set_title(f"sink rate (eps={data['sinks']['epsilon']:g}, {used} prompts)", fontsize=9)
        else:
            vals = [r["metrics"][name]["value"] for r in rows]
            y = [float("nan") if v is None else v for v in vals]
            lo = [r["metrics"][name]["ci95"][0] for r in rows]
            hi = [r["metrics"][name]["ci95"][1] for r in rows]
            err = [[max(0.0, v - a) if v == v and a is not None else 0.0 for v, a in zip(y, lo)],
                   [max(0.0, b - v) if v == v and b is not None else 0.0 for v, b in zip(y, hi)]]
            ax.errorbar(x, y, yerr=err, fmt="-o", capsize=3, ms=4)
            if y and y[0] == y[0]:
                ax.axhline(y[0], color="gray", ls="--", lw=0.8, label="rate 0 (baseline)")
                ax.legend(fontsize=7)
            if name.endswith("ppl") and all(v == v and v > 0 for v in y):
                ax.set_yscale("log")
            ax.set_title(f"{name} (95% CI)", fontsize=9)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("WeMask rate", fontsize=8)
    fig.suptitle(f"{data['model']} - {data['task']} (n={data['settings']['n_samples']}, select={data['select']}, "
                 f"ME layer {data['me_layer']})", fontsize=9)
    fig.tight_layout()
    return save(fig, path)
