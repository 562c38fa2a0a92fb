"""Offline evaluation with paired statistics: ``run`` (one task) and ``compare`` (WeMask rates vs baseline).

Tasks (the registry ``REGISTRY`` in :mod:`melayer.eval.tasks`, also ``TASKS``; add your own with
``register_task``): ppl (WikiText-2), gsm8k, math500,
ifeval, arc_easy, arc_challenge, hellaswag, lambada, winogrande. All data ships in ``melayer/data/eval``; nothing is downloaded.
"""

from typing import TYPE_CHECKING, Any

from melayer.eval.tasks import TASKS, Task, get_task

if TYPE_CHECKING:
    from melayer.eval.runner import EvalResult, run

__all__ = ["TASKS", "EvalResult", "Task", "compare", "get_task", "run"]


def __getattr__(name: str) -> Any:
    # the runner imports torch: loaded on first use, so that the CLI's task options come without it
    if name in ("EvalResult", "run"):
        from melayer.eval import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compare(*args, **kwargs):
    from melayer.eval.compare import compare as _compare

    return _compare(*args, **kwargs)


compare.__doc__ = "See :func:`melayer.eval.compare.compare`."
