"""Offline evaluation with paired statistics: ``run`` (one task; ``melayer.evaluate``) and
:func:`melayer.eval.compare.compare` (WeMask rates vs baseline; ``melayer.compare``).

Tasks (the registry ``REGISTRY`` in :mod:`melayer.eval.tasks`, also ``TASKS``; add your own with
``register_task``): ppl (WikiText-2), gsm8k, math500,
ifeval, arc_easy, arc_challenge, hellaswag, lambada, winogrande. All data ships in ``melayer/data/eval``; nothing is downloaded.
"""

from typing import TYPE_CHECKING, Any

from melayer.eval.tasks import TASKS, Task, get_task

if TYPE_CHECKING:
    from melayer.eval.compare import CompareResult
    from melayer.eval.runner import EvalResult, run

__all__ = ["TASKS", "CompareResult", "EvalResult", "Task", "get_task", "run"]

# the runner imports torch: loaded on first use, so that the CLI's task options come without it
_LAZY = {"EvalResult": "melayer.eval.runner", "run": "melayer.eval.runner",
         "CompareResult": "melayer.eval.compare"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
