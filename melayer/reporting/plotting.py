"""What every figure shares (matplotlib, Agg backend): writing a PNG atomically, an inline SVG for the report,
plain-text log-axis labels, safe label text and the per-layer axes."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
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
_SVG_START = re.compile(r"<svg\b")
_SVG_REF = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


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


def to_svg(fig: Any, salt: str, alt: str = "") -> str:
    """The figure as one ``<svg>`` element (text kept as text, ids unique per ``salt``), then closed."""
    buf = io.StringIO()
    try:
        plain_log_labels(fig)
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
            fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": "melayer"})
    finally:
        plt.close(fig)
    text = buf.getvalue()
    m = _SVG_START.search(text)
    if m is None:  # pragma: no cover - matplotlib always writes an <svg> root
        raise RuntimeError("matplotlib wrote no <svg> element")
    # matplotlib names elements figure_1, axes_1, ... in every figure: prefix every id (and each reference to
    # one) so that several figures can share one page
    svg = _SVG_REF.sub(lambda r: f"{r.group(1)}{salt}-{r.group(2)}", text[m.start():])
    label = alt.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    return svg.replace("<svg ", f'<svg role="img" aria-label="{label}" ', 1)


def titled(fig: Any, title: str, **kwargs: Any) -> Any:
    """``fig`` with ``title`` (plain text) over all its panels, laid out tight; returns ``fig``."""
    fig.suptitle(tex_safe(title), **kwargs)
    tight_layout(fig)
    return fig


def png(figure: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any], str | Path], Path | None]:
    """A figure builder as the writer of its PNG, ``(data, path) -> path`` (None where it draws nothing): what a
    kind's ``figures`` name in the registry."""

    def write(data: dict[str, Any], path: str | Path) -> Path | None:
        fig = figure(data)
        return None if fig is None else save(fig, path)

    write.__doc__ = f"The PNG of :func:`{figure.__name__}` at ``path``."
    return write


def log_layer_axes(ax: Any, xlabel: str, ylabel: str, title: str, fig: Any, legend_size: int = 8) -> Any:
    """Finish a per-layer plot: log y axis, integer layer ticks, labels, title and legend; returns ``fig``."""
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    return fig


def finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)
