"""Matplotlib figures (Agg backend, written atomically as PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from melayer.util.io import write_atomic


def save(fig: Any, path: str | Path) -> Path:
    def _w(tmp: Path) -> None:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")

    try:
        return write_atomic(path, _w)
    finally:
        plt.close(fig)


def layer_magnitudes_figure(scan: dict[str, Any]) -> Any:
    """Per-layer mean top-1/2/3 |a| vs the median |a| (log scale), ME layer marked."""
    rows = scan["per_layer"]
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("top1_mean", "top-1", "-o"), ("top2_mean", "top-2", "-s"), ("top3_mean", "top-3", "-^")):
        ax.plot(layers, [max(r[key], 1e-6) for r in rows], style, ms=3, label=label)
    ax.plot(layers, [max(r["median"], 1e-6) for r in rows], "-", color="gray", label="median")
    if scan.get("me_layer") is not None:
        ax.axvline(scan["me_layer"], color="red", ls="--", lw=1, label=f"ME layer {scan['me_layer']}")
    return log_layer_axes(ax, "decoder layer (output)", "|activation| (mean over prompts)",
                          f"{scan['model']}: layer-wise magnitudes", fig)


def layer_magnitudes(scan: dict[str, Any], path: str | Path) -> Path:
    return save(layer_magnitudes_figure(scan), path)


def log_layer_axes(ax: Any, xlabel: str, ylabel: str, title: str, fig: Any, legend_size: int = 8) -> Any:
    """Finish a per-layer plot: log y axis, integer layer ticks, labels, title and legend; returns ``fig``."""
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    return fig


def token_surface(scan: dict[str, Any], path: str | Path) -> Path | None:
    """The massive token's |a| over layers x dims on a log scale, next to the dims that matter against the
    criterion (see :func:`melayer.report.figures.magnitude_map`); None without a profile."""
    if not scan.get("massive_token_profile"):
        return None
    from melayer.report.figures import magnitude_map

    return save(magnitude_map(scan), path)
