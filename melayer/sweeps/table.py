"""``melayer aggregate DIR``: one table across a sweep's finished cells, with the paired statistics each cell
already computed (difference to the rate-0 baseline, paired bootstrap 95 % CI, McNemar's exact p, sink rate),
and the Benjamini-Hochberg adjustment of the McNemar p-values over the whole table.

Rows: one per (compare cell, condition, metric) -- a WeMask rate or a registered method (``method``, with
the massive activation downstream of the ME layer relative to unmodified); one per (eval cell, metric); one per
(analysis cell, metric its registry entry lists: ``me_layer`` for a scan). Nothing is recomputed: the numbers
are read from each cell's ``compare.json`` / ``eval.json`` / ``<analysis>.json``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from melayer.sweeps.cell import DONE
from melayer.util.console import warn
from melayer.util.errors import MelayerError
from melayer.util.io import parse_json

SCHEMA = "melayer.sweep_table/1"
COLUMNS = ("cell", "command", "model", "model_digest", "dtype", "task", "method", "select", "seed", "rate", "k", "metric",
           "binary", "higher_is_better", "n", "baseline", "value", "ci95_lo", "ci95_hi", "diff", "diff_ci95_lo",
           "diff_ci95_hi", "mcnemar_p", "p_bh", "significant_bh", "sink_rate_baseline", "sink_rate", "massive_downstream",
           "me_layer")
ALPHA = 0.05
CORRECTION = ("Benjamini-Hochberg false discovery rate (scipy.stats.false_discovery_control, method='bh') over "
              "all McNemar p-values in this table (every compare cell x binary metric), at q = 0.05; valid "
              "under independence or positive dependence of the tests. Continuous metrics (perplexity, ratio "
              "metrics) have no p-value: read their paired bootstrap CI.")


def _base(rec: dict[str, Any]) -> dict[str, Any]:
    s = rec["settings"]
    return {"cell": rec["id"], "command": rec["command"], "model": rec["model"],
            "model_digest": rec["fingerprint"].get("digest"), "dtype": s.get("dtype"), "task": s.get("task"),
            "method": s.get("method"), "select": s.get("select"), "seed": s.get("seed"), "rate": s.get("rate")}


def _rows(cell_dir: Path, rec: dict[str, Any]) -> list[dict[str, Any]]:
    from melayer.reporting.results import analyses

    cmd = rec["command"]
    base = _base(rec)
    kind = analyses().get(cmd)
    if kind is not None:
        d = json.loads((cell_dir / kind.file).read_text())
        prompts = d.get("prompts")
        return [{**base, "metric": m, "value": d.get(m), "me_layer": d.get("me_layer"),
                 "n": len(prompts) if isinstance(prompts, list) else None} for m in kind.metrics]
    if cmd == "eval":
        d = json.loads((cell_dir / "eval.json").read_text())
        wm = (d.get("settings") or {}).get("intervention") or {}
        kinds = d.get("metric_kinds", {})
        return [{**base, "metric": m, "value": v.get("value"), "ci95_lo": v["ci95"][0], "ci95_hi": v["ci95"][1],
                 "n": v.get("n"), "k": wm.get("k", 0), "me_layer": wm.get("me_layer"),
                 "binary": kinds.get(m, {}).get("binary"), "higher_is_better": kinds.get(m, {}).get("higher_is_better")}
                for m, v in d["metrics"].items()]
    if cmd == "compare":
        d = json.loads((cell_dir / "compare.json").read_text())
        first, *others = d["per_rate"]
        kinds = json.loads((cell_dir / Path(first["output"]).name / "eval.json").read_text()).get("metric_kinds", {})
        out = []
        conditions = [(row, {"rate": row["rate"], "k": row["wemask"].get("k")}) for row in others]
        conditions += [(row, {"method": row["method"], "rate": None, "select": None,
                              "k": (row.get("intervention") or {}).get("k")}) for row in d.get("per_method") or []]
        for row, which in conditions:
            for m, v in row["metrics"].items():
                vs = v.get("vs_baseline") or {}
                mc = v.get("mcnemar") or {}
                out.append({**base, **which, "metric": m, "n": v.get("n"),
                            "baseline": first["metrics"][m]["value"], "value": v.get("value"),
                            "ci95_lo": v["ci95"][0], "ci95_hi": v["ci95"][1], "diff": vs.get("diff"),
                            "diff_ci95_lo": (vs.get("ci95") or [None, None])[0],
                            "diff_ci95_hi": (vs.get("ci95") or [None, None])[1], "mcnemar_p": mc.get("p"),
                            "sink_rate_baseline": first.get("sink_rate"), "sink_rate": row.get("sink_rate"),
                            "massive_downstream": row.get("massive_downstream"),
                            "me_layer": d.get("me_layer"), "binary": kinds.get(m, {}).get("binary"),
                            "higher_is_better": kinds.get(m, {}).get("higher_is_better")})
        return out
    # finetune: the run's own outputs (adapter, log, finetune.json) live in the cell directory
    return [{**base, "metric": "final_loss", "value": (rec.get("summary") or {}).get("final_loss")}]


def adjust(rows: list[dict[str, Any]], alpha: float = ALPHA) -> None:
    """Fill ``p_bh`` and ``significant_bh`` for every row with a McNemar p (Benjamini-Hochberg)."""
    from scipy.stats import false_discovery_control

    tested = [r for r in rows if r.get("mcnemar_p") is not None]
    if not tested:
        return
    adjusted = false_discovery_control([r["mcnemar_p"] for r in tested], method="bh")
    for r, p in zip(tested, adjusted):
        r["p_bh"] = float(p)
        r["significant_bh"] = bool(p <= alpha)


def aggregate(root: str | Path) -> dict[str, Any]:
    """The table of every finished cell under a sweep's output directory (``melayer sweep aggregate``).

    Cells still running or unreadable are counted as unfinished; p-values are corrected for multiple comparisons
    (Benjamini-Hochberg).

    Args:
        root: the sweep's output directory (the one holding ``cells/``).

    Returns:
        The ``melayer.sweep_table`` JSON: its columns, one row per (cell, metric), the multiple-comparison
        correction and the unfinished cells.

    Raises:
        MelayerError: ``root`` is not a sweep output directory or has no finished cell.
    """
    root = Path(root)
    cells = root / "cells"
    if not cells.is_dir():
        raise MelayerError(f"{root} is not a sweep output directory (no cells/ inside)")
    rows: list[dict[str, Any]] = []
    pending = []
    for d in sorted(p for p in cells.iterdir() if p.is_dir()):
        path = d / DONE
        if not path.exists():
            pending.append(d.name)
            continue
        try:
            rec = parse_json(path.read_bytes(), path)
            rows.extend(_rows(d, rec))
        except (MelayerError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            # a damaged cell is not finished: the same sweep command redoes it
            warn(f"{d.name}: its results cannot be read ({exc}); counted as unfinished (rerun the sweep to redo it)")
            pending.append(d.name)
    if not rows:
        raise MelayerError(f"no finished cells under {cells}")
    rows = [{c: r.get(c) for c in COLUMNS} for r in rows]
    rows.sort(key=lambda r: tuple(str(r[c]) for c in ("command", "model", "task", "method", "select", "seed", "rate", "metric")))
    adjust(rows)
    n_tests = sum(r["mcnemar_p"] is not None for r in rows)
    return {"schema": SCHEMA, "sweep": str(root), "columns": list(COLUMNS), "rows": rows,
            "multiple_comparisons": {"method": "benjamini-hochberg", "alpha": ALPHA, "tests": n_tests,
                                     "note": CORRECTION},
            "unfinished_cells": pending}


def to_csv(table: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=table["columns"], lineterminator="\n")
    writer.writeheader()
    for r in table["rows"]:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def write(table: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``OUT.csv`` and ``OUT.json`` (atomic); ``out`` is a path without suffix, e.g. ``DIR/table``."""
    from melayer.util.io import write_atomic, write_json

    out = Path(out)
    csv_path = write_atomic(out.with_suffix(".csv"), lambda p: p.write_text(to_csv(table)))
    json_path = write_json(out.with_suffix(".json"), table)
    return {"csv": csv_path, "json": json_path}
