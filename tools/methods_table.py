"""Markdown table of one or more ``melayer compare`` outputs (every condition against the unmodified model).

    python tools/methods_table.py OUT/compare.json [OUT2/compare.json ...] [--metric acc_norm]

Per compare: the unmodified value, then every condition (WeMask rates, then the methods) with its value, the
paired difference and its bootstrap 95 % CI, McNemar's exact p (+gained / -lost), the Benjamini-Hochberg p over
the compare's whole table, the sink rate and the massive activation after the ME layer relative to unmodified;
then what each calibrated method chose. Nothing is recomputed: the numbers are read from compare.json.
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
    rows = [(f"wemask:rate={r['rate']:g}", r) for r in d["per_rate"][1:]]
    rows += [(r["method"], r) for r in d.get("per_method") or []]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare", nargs="+", type=Path, help="compare.json files (or their directories)")
    ap.add_argument("--metric", help="one metric (default: every metric of the task)")
    args = ap.parse_args()
    for path in args.compare:
        path = path / "compare.json" if path.is_dir() else path
        print(table(json.loads(path.read_text()), args.metric))
        print()


if __name__ == "__main__":
    main()
