"""Matplotlib figures (Agg backend, written atomically as PNG)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import Formatter, LogFormatterMathtext, MaxNLocator

from melayer.util.console import plain
from melayer.util.io import write_atomic

_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
_MATH_POWER = re.compile(r"\^\{(-?[0-9]+)\}")
_MATH_LABEL = re.compile(r"\$\\mathdefault\{(.*)\}\$")


class PlainLogLabels(Formatter):
    """A log axis' labels as matplotlib's own formatter makes them (same ticks, same numbers, same minor labels),
    written as plain text with Unicode superscripts: ``10⁻³``, ``2×10⁴`` instead of the mathtext
    ``$\\mathdefault{10^{-3}}$``. Mathtext is parsed again for every renderer (a figure saved as SVG with a tight
    bounding box meets three), which made log tick labels most of a report figure's drawing time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def set_axis(self, axis: Any) -> None:
        super().set_axis(axis)
        self.inner.set_axis(axis)

    def set_locs(self, locs: Any) -> None:
        self.inner.set_locs(locs)

    def format_data(self, value: float) -> str:
        return self.inner.format_data(value)

    def format_data_short(self, value: float) -> str:
        return self.inner.format_data_short(value)

    def __call__(self, x: float, pos: int | None = None) -> str:
        label = self.inner(x, pos)
        m = _MATH_LABEL.fullmatch(label)
        if m is None:
            return label
        body = _MATH_POWER.sub(lambda e: e.group(1).translate(_SUPERSCRIPT), m.group(1)).replace(r"\times", "×")
        if "\\" in body or "{" in body or "^" in body:  # something else mathtext would draw: keep it
            return label
        return body.replace("-", "\u2212")  # the minus sign mathtext draws


def plain_log_labels(fig: Any) -> Any:
    """Wrap every log axis' mathtext formatter (axes and colorbars) in :class:`PlainLogLabels`."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_formatter(), LogFormatterMathtext):
                axis.set_major_formatter(PlainLogLabels(axis.get_major_formatter()))
            if isinstance(axis.get_minor_formatter(), LogFormatterMathtext):
                axis.set_minor_formatter(PlainLogLabels(axis.get_minor_formatter()))
    return fig


def tex_safe(text: Any) -> str:
    """A label for matplotlib: ``$`` would start mathtext (a token like ``$5`` or a model named ``a$b`` must print
    as is, not fail to parse); terminal and bidirectional controls are shown as escapes (:func:`plain`)."""
    return plain(str(text)).replace("$", r"\$")


def tight_layout(fig: Any) -> None:
    """``fig.tight_layout()`` measured with the labels the figure will be drawn with."""
    plain_log_labels(fig).tight_layout()


def save(fig: Any, path: str | Path) -> Path:
    plain_log_labels(fig)

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
                          f"{tex_safe(scan['model'])}: layer-wise magnitudes", fig)


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
