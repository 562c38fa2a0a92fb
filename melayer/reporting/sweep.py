"""Rendering of a sweep's table (``melayer sweep aggregate``): the paired difference to the rate-0 baseline
(95 % CI) per WeMask rate as a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.ticker import NullFormatter

from melayer.reporting.plotting import plt, save, tex_safe, tight_layout


def sweep_differences(table: dict[str, Any], path: str | Path, max_panels: int = 12) -> Path | None:
    """One panel per (task, metric), one line per (model, select, seed); markers filled where the
    Benjamini-Hochberg-adjusted McNemar p is <= alpha. None when the table has no WeMask-rate compare rows (rows
    of other methods are in the table only)."""
    rows = [r for r in table["rows"] if r["command"] == "compare" and r["diff"] is not None and r.get("rate") is not None]
    if not rows:
        return None
    panels = sorted({(r["task"], r["metric"]) for r in rows})[:max_panels]
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (task, metric) in zip(axes.flat, panels):
        mine = [r for r in rows if r["task"] == task and r["metric"] == metric]
        for line in sorted({(r["model"], r["select"], r["seed"]) for r in mine}, key=str):
            pts = sorted((r for r in mine if (r["model"], r["select"], r["seed"]) == line), key=lambda r: r["rate"])
            x = [r["rate"] for r in pts]
            y = [r["diff"] for r in pts]
            lo = [max(0.0, r["diff"] - r["diff_ci95_lo"]) if r["diff_ci95_lo"] is not None else 0.0 for r in pts]
            hi = [max(0.0, r["diff_ci95_hi"] - r["diff"]) if r["diff_ci95_hi"] is not None else 0.0 for r in pts]
            bars = ax.errorbar(x, y, yerr=[lo, hi], fmt="-o", capsize=3, ms=4, mfc="white",
                               label=tex_safe(f"{line[0]} / {line[1]}" + (f" / seed {line[2]}" if line[2] else "")))
            sig = [(a, b) for a, b, r in zip(x, y, pts) if r.get("significant_bh")]
            if sig:
                ax.plot(*zip(*sig), "o", ms=4, color=bars[0].get_color())
        ax.axhline(0.0, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        rates = sorted({r["rate"] for r in mine})
        ax.set_xticks(rates, [f"{r:g}" for r in rates], fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("WeMask rate", fontsize=8)
        ax.set_title(f"{task}: {metric}, rate - baseline (95% CI)", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    note = table.get("multiple_comparisons", {})
    fig.suptitle(f"filled markers: BH-adjusted McNemar p <= {note.get('alpha', 0.05)} "
                 f"({note.get('tests', 0)} tests)", fontsize=8)
    tight_layout(fig)
    return save(fig, path)
