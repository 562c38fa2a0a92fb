"""The one number formatter of the console summaries and the HTML report."""

from __future__ import annotations

import math
from typing import Any


def num(v: Any, digits: int = 4, spec: str | None = None) -> str:
    """A number for people: ``-`` for None / NaN / inf, ints with thousands separators, floats to ``digits``
    significant digits (or by the format ``spec``, e.g. ``".2%"``); anything else as its text."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if spec is not None:
        return format(v, spec)
    return f"{v:,}" if isinstance(v, int) else f"{v:.{digits}g}"


def pct(v: Any, digits: int = 1) -> str:
    """A share as a percentage (``12.5 %``; ``-`` without one)."""
    text = num(100 * v, spec=f".{digits}f") if isinstance(v, (int, float)) and not isinstance(v, bool) else num(v)
    return text if text == "-" else f"{text} %"


def ci(pair: Any, digits: int = 3) -> str:
    """A confidence interval ``[lo, hi]`` (``-`` without one)."""
    if not pair or pair[0] is None or pair[1] is None:
        return "-"
    return f"[{num(pair[0], digits)}, {num(pair[1], digits)}]"
