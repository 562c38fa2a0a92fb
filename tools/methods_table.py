"""Markdown table of one or more ``melayer compare`` outputs (every condition against the unmodified model).

    python tools/methods_table.py OUT/compare.json [OUT2/compare.json ...] [--metric acc_norm]
    python tools/methods_table.py --summary OUT/compare.json:METRIC [OUT2/compare.json:METRIC ...]

Per compare: the unmodified value, then every condition (WeMask rates, then the methods) with its value, the
paired difference and its bootstrap 95 % CI, McNemar's exact p (+gained / -lost), the Benjamini-Hochberg p over
the compare's whole table, the sink rate and the massive activation after the ME layer relative to unmodified;
then what each calibrated method chose. ``--summary``: one table over several compares, a row per condition and a
column per compare and metric, each cell the paired difference to the unmodified model with its BH p (a bold
cell: BH p < 0.05), or its paired 95 % CI for a metric McNemar's test does not apply to; then the sink rate and
the massive activation after the ME layer (relative to unmodified) under each condition, from the first compare. Nothing is recomputed: the numbers are read from compare.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _f(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _ci(pair: Any, spec: str = ".3f") -> str:
    return "-" if not pair or pair[0] is None else f"[{format(pair[0], spec)}, {format(pair[1], spec)}]"


def table(d: dict[str, Any], metric: str | None = None) -> str:
    base = d["per_rate"][0]
    names = [metric] if metric else list(base["metrics"])
    rows = [(_label(r), r) for r in _conditions(d)]
    out = [f"**{d['model']}**, `{d['task']}`, {d['settings']['n_samples']} paired samples, ME layer {d['me_layer']}"]
    for name in names:
        m = base["metrics"][name]
        out += ["", f"| condition | {name} [95% CI] | difference [paired 95% CI] | McNemar p (+/-) | BH p | sink rate "
                    "| massive after ME (rel.) |", "|---|---|---|---|---|---|---|",
                f"| unmodified | {m['value']:.3f} {_ci(m['ci95'])} | - | - | - | {_f(base.get('sink_rate'))} | 1 |"]
        for label, r in rows:
            m = r["metrics"][name]
            vs, mc = m.get("vs_baseline") or {}, m.get("mcnemar")
            test = f"{mc['p']:.3g} (+{mc['gained']}/-{mc['lost']}) | {_f(mc.get('p_bh'))}" if mc else "- | -"
            out.append(f"| {label} | {m['value']:.3f} {_ci(m['ci95'])} | {_f(vs.get('diff'), '+.3f')} "
                       f"{_ci(vs.get('ci95'), '+.3f')} | {test} | {_f(r.get('sink_rate'))} | "
                       f"{_f(r.get('massive_downstream'))} |")
    cal = d.get("calibration")
    if cal:
        out += ["", f"Calibration (never evaluated): {cal.get('source')}."]
        for label, r in rows:
            rule = (r.get("intervention") or {}).get("rule")
            if rule and not label.startswith("wemask:rate="):
                out.append(f"- `{label}`: {rule}")
    return "\n".join(out)


def _label(r: dict[str, Any]) -> str:
    return r["method"] if "method" in r else f"wemask:rate={r['rate']:g}"


def _conditions(d: dict[str, Any]) -> list[dict[str, Any]]:
    """A compare's rows other than the unmodified model: the WeMask rates, then the methods."""
    return d["per_rate"][1:] + (d.get("per_method") or [])


def summary(columns: list[tuple[dict[str, Any], str]]) -> str:
    """One row per condition, one column per (compare, metric): the paired difference (BH p); then the sink rate
    and the massive activation after the ME layer, from the first compare's prompts."""
    labels: list[str] = []
    cells: dict[tuple[str, int], str] = {}
    heads = []
    for i, (d, metric) in enumerate(columns):
        base = d["per_rate"][0]["metrics"][metric]
        heads.append(f"{d['task']} {metric} (n={d['settings']['n_samples']}; unmodified {base['value']:.3f})")
        for r in _conditions(d):
            label = _label(r)
            labels += [] if label in labels else [label]
            m = r["metrics"][metric]
            vs = m.get("vs_baseline") or {}
            diff, p_bh = vs.get("diff"), (m.get("mcnemar") or {}).get("p_bh")
            text = (f"{_f(diff, '+.3f')} ({_f(p_bh, '.2g')})" if p_bh is not None  # no McNemar: the paired CI
                    else f"{_f(diff, '+.3f')} {_ci(vs.get('ci95'), '+.2f')}")
            cells[label, i] = f"**{text}**" if p_bh is not None and p_bh < 0.05 else text
    first = columns[0][0]
    side = {_label(r): r for r in _conditions(first)}
    heads += [f"sink rate ({first['task']}; unmodified {_f(first['per_rate'][0].get('sink_rate'))})",
              "massive after ME (rel.)"]
    for label in labels:
        row = side.get(label) or {}
        cells[label, len(columns)], cells[label, len(columns) + 1] = (_f(row.get("sink_rate")),
                                                                       _f(row.get("massive_downstream")))
    models = ", ".join(dict.fromkeys(d["model"] for d, _ in columns))
    out = [f"**{models}**: each condition's paired difference to the unmodified model (BH p over each compare's "
           "whole table; bold below 0.05; a paired 95 % CI where McNemar's test does not apply)", "",
           "| condition | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    out += [f"| {label} | " + " | ".join(cells.get((label, i), "not run") for i in range(len(heads))) + " |"
            for label in labels]
    return "\n".join(out)


def _load(path: Path) -> dict[str, Any]:
    return json.loads((path / "compare.json" if path.is_dir() else path).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare", nargs="+", type=Path, help="compare.json files (or their directories)")
    ap.add_argument("--metric", help="one metric (default: every metric of the task)")
    ap.add_argument("--summary", action="store_true", help="one table over the compares, each given as PATH:METRIC")
    args = ap.parse_args()
    if args.summary:
        specs = [str(p).rsplit(":", 1) for p in args.compare]
        print(summary([(_load(Path(path)), metric) for path, metric in specs]))
        return
    for path in args.compare:
        print(table(_load(path), args.metric))
        print()


if __name__ == "__main__":
    main()
