"""The evaluation tasks: a registry of named tasks, each a small class or a declarative spec.

Every shipped task reads the data vendored in ``melayer/data/eval``; ``load(limit)`` returns the first ``limit``
samples in file order with stable ids, and ``run_batch`` turns a batch of samples into per-sample records whose
``metrics`` are aggregated by :mod:`melayer.eval.stats`. Prompt formats follow lm-eval 0.4.x's task configs
(stated in ``prompt_format``, which goes into every eval.json).

Modules: :mod:`~.base` (Sample, Task), :mod:`~.options`, :mod:`~.registry` (register_task, get_task),
:mod:`~.generation`, :mod:`~.loglik` (LoglikTask, MultipleChoice), :mod:`~.perplexity`, and one module per
benchmark family. Importing this package never imports torch (the CLI builds its options from the registry).
"""

from melayer.eval.tasks.base import RunContext, Sample, Task
from melayer.eval.tasks.builtin import register_builtin
from melayer.eval.tasks.generation import GenerationTask
from melayer.eval.tasks.loglik import LoglikTask, MultipleChoice, Request
from melayer.eval.tasks.options import FEWSHOT, PPL_STRIDE, PPL_WINDOW, SUBJECTS, TaskOption
from melayer.eval.tasks.registry import (
           REGISTRY,
           TASKS,
           TaskSpec,
           get_task,
           register_task,
           task_options,
           unregister_task,
)

register_builtin()

__all__ = ["FEWSHOT", "PPL_STRIDE", "PPL_WINDOW", "REGISTRY", "TASKS", "GenerationTask", "LoglikTask",
           "MultipleChoice", "Request", "RunContext", "SUBJECTS", "Sample", "Task", "TaskOption", "TaskSpec", "get_task",
           "register_task", "task_options", "unregister_task"]
