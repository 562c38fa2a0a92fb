"""The model object's ``trace`` method, without a dependency from ``models/`` on ``capture/``.

:meth:`melayer.models.loading.LM.trace` calls the tracer registered here. The package root
(``melayer/__init__.py``, which Python runs before any of its modules) registers :func:`melayer.capture.trace.trace`,
imported on the first call, as it registers the notebook renderer in :mod:`melayer.util.display`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from melayer.util.errors import MelayerError

_tracer: Callable[..., Any] | None = None


def set_tracer(fn: Callable[..., Any] | None) -> None:
    """Install the function ``fn(lm, prompts, sites, layers, **options)`` that ``LM.trace`` calls."""
    global _tracer
    _tracer = fn


def tracer() -> Callable[..., Any]:
    """The installed tracer; a one-line :class:`MelayerError` when there is none."""
    if _tracer is None:
        raise MelayerError("no tracer installed: import melayer first (melayer.trace is the same function)")
    return _tracer
