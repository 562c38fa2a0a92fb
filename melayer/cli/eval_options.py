"""Options shared by ``melayer eval`` and ``melayer compare``; the task list and the task options come from the
task registry (:data:`melayer.eval.tasks.REGISTRY`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer

from melayer.cli.common import Given
from melayer.eval.tasks import (
    FEWSHOT,
    PPL_STRIDE,
    PPL_WINDOW,
    REGISTRY,
    SUBJECTS,
    get_task,
    task_options,
)
from melayer.models.chat import ChatSetting
from melayer.util.errors import MelayerError

TaskOpt = Annotated[str, typer.Option("--task", "-t", help=", ".join(REGISTRY))]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", "-n", help="evaluate only the first N samples")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="samples per model call")]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", help="generation budget (gsm8k 256, math500 512, ifeval 512 by default)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="discard existing results in --output instead of resuming")]
# task options (declared once in the registry)
FewshotOpt = Annotated[Optional[int], typer.Option(FEWSHOT.flag, help=FEWSHOT.help)]
WindowOpt = Annotated[Optional[int], typer.Option(PPL_WINDOW.flag, help=f"{PPL_WINDOW.help} [default: {PPL_WINDOW.default}]")]
SubjectsOpt = Annotated[Optional[str], typer.Option(SUBJECTS.flag, help=SUBJECTS.help)]
StrideOpt = Annotated[Optional[int], typer.Option(PPL_STRIDE.flag, help=f"{PPL_STRIDE.help} [default: {PPL_STRIDE.default}]")]

CHAT_MODES: dict[str, ChatSetting] = {"auto": "auto", "on": True, "off": False}


@dataclass
class TaskGiven(Given):
    """:class:`~melayer.cli.common.Given` and the options of the commands that run a task (eval, compare)."""

    limit: LimitOpt = None
    batch_size: BatchOpt = 8  # samples per model call, not prompts per pass
    max_new_tokens: MaxNewOpt = None
    num_fewshot: FewshotOpt = None
    window: WindowOpt = None
    stride: StrideOpt = None
    subjects: SubjectsOpt = None
    overwrite: OverwriteOpt = False


def check_task(task: str, given: TaskGiven) -> tuple[ChatSetting, dict[str, Any]]:
    """Validate everything cheap before loading a model (bad input -> one line, nothing written). Returns the
    chat mode and the task options that were given."""
    from melayer.eval.runner import check_run_args

    if task not in REGISTRY:
        raise MelayerError(f"unknown task {task!r}; choose one of {', '.join(REGISTRY)}")
    check_run_args(given.limit, given.batch_size, given.max_new_tokens)
    options = {k: v for k, v in (("num_fewshot", given.num_fewshot), ("window", given.window), ("stride", given.stride),
                                 ("subjects", given.subjects)) if v is not None}
    takes = {o.name for o in REGISTRY[task].options}
    for name in set(options) - takes:
        raise MelayerError(f"{task_options()[name].flag} does not apply to task {task}")
    get_task(task, **options)  # validates the values
    return CHAT_MODES[str(given.chat)], options
