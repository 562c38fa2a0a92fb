"""Rendering of ``melayer eval`` (``eval.json``): the console table and the report's section."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from melayer.reporting.blocks import Figures, Section, p, table
from melayer.reporting.format import ci, num
from melayer.reporting.results import KINDS
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


def eval_sections(d: dict[str, Any], figs: Figures) -> list[Section]:
    s = d["settings"]
    rows = [[name, num(m["value"]), ci(m["ci95"]), m["n"]] for name, m in d["metrics"].items()]
    iv = s.get("intervention")
    blocks = [p("Model <b>{}</b> on <b>{}</b>: {} samples; prompt format: {}.", d["model"], d["task"], d["n_samples"],
                s.get("prompt_format", "-")),
              p("Intervention: {}.", (iv or {}).get("rule", iv) if iv else "none"),
              table("Metrics (percentile bootstrap 95 % CI over samples)", ["metric", "value", "95 % CI", "n"], rows)]
    return [{"id": "", "title": f"{KINDS['eval'].title}: {d['task']}", "blocks": blocks}]
