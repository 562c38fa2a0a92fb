"""The task registry: every task ``eval``, ``compare``, sweeps and ``melayer ls tasks`` know, by name.

Add your own with :func:`register_task` (a :class:`~melayer.eval.tasks.loglik.MultipleChoice` instance for a
multiple-choice task, or a :class:`~melayer.eval.tasks.base.Task` subclass for anything else); see
``docs/tasks.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from melayer.eval.tasks.base import Task
from melayer.eval.tasks.options import TaskOption
from melayer.util.errors import MelayerError

T = TypeVar("T", bound=type[Task])


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: how to build it and which options it takes."""

    name: str
    cls: type[Task]
    options: tuple[TaskOption, ...] = ()
    fields: dict[str, Any] = field(default_factory=dict)  # fixed constructor fields (e.g. the ARC subset)

    def make(self, **options: Any) -> Task:
        options = {k: v for k, v in options.items() if v is not None}
        known = {o.name for o in self.options}
        extra = set(options) - known
        if extra:
            raise MelayerError(f"task {self.name} takes no option {', '.join(sorted(extra))}")
        values = {}
        for o in self.options:
            try:
                values[o.name] = o.type(options.get(o.name, o.default))
            except (TypeError, ValueError):
                raise MelayerError(f"task {self.name}: {o.flag} must be of type {o.type.__name__} "
                                   f"(got {options.get(o.name)!r})") from None
        return self.cls(name=self.name, options=values, given=frozenset(options), **self.fields)

    def describe(self) -> dict[str, Any]:
        """Name, family, description and options (what ``melayer ls tasks`` prints), without loading any data."""
        task = self.make()
        return {"name": self.name, "family": task.family, "description": task.description,
                "metrics": [m.name for m in task.metrics], "options": [o.name for o in self.options]}


REGISTRY: dict[str, TaskSpec] = {}
TASKS = REGISTRY  # the task names, in registry order


def register_task(task: str | Task | TaskSpec, *, options: tuple[TaskOption, ...] = (), replace: bool = False,
                  **fields: Any) -> Any:
    """Register a task under its name, so that every command and sweep can run it.

    * ``register_task(MultipleChoice(name="my_mc", docs=..., context=..., choices=..., target=...))``: a task
      instance; its fields are the template each run copies (declarative tasks).
    * ``@register_task("my_task", options=(...,))`` on a :class:`Task` subclass (any family).
    * ``register_task(TaskSpec(...))``.

    A name already taken is an error unless ``replace=True``. Returns the instance, the class (so it works as a
    decorator) or the spec.
    """
    if isinstance(task, str):
        name = task

        def deco(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, Task)):
                raise MelayerError(f"register_task({name!r}) decorates a Task subclass, not {cls!r}")
            _add(TaskSpec(name, cls, tuple(options), dict(fields)), replace)
            return cls

        return deco
    if isinstance(task, TaskSpec):
        _add(task, replace)
        return task
    if isinstance(task, Task):
        if not task.name:
            raise MelayerError("register_task: the task needs a name")
        fixed = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)
                 if f.init and f.name not in ("name", "options", "given")}
        _add(TaskSpec(task.name, type(task), tuple(options), {**fixed, **fields}), replace)
        return task
    raise MelayerError(f"register_task takes a name (as a decorator), a Task instance or a TaskSpec, not {task!r}")


def _add(spec: TaskSpec, replace: bool) -> None:
    if not spec.name or not spec.name.replace("_", "").replace("-", "").isalnum():
        raise MelayerError(f"task name {spec.name!r}: use letters, digits, '_' and '-'")
    if spec.name in REGISTRY and not replace:
        raise MelayerError(f"a task named {spec.name!r} is already registered (pass replace=True to replace it)")
    REGISTRY[spec.name] = spec


def unregister_task(name: str) -> None:
    """Remove a registered task (e.g. a test's own)."""
    REGISTRY.pop(name, None)


def task_options() -> dict[str, TaskOption]:
    """Every task option by name (shared options are one entry)."""
    return {o.name: o for spec in REGISTRY.values() for o in spec.options}


def get_task(name: str | Task, **options: Any) -> Task:
    """A task by name (see :data:`REGISTRY`), with its options (e.g. gsm8k: num_fewshot; ppl: window, stride)."""
    if isinstance(name, Task):
        return name
    if name not in REGISTRY:
        raise MelayerError(f"unknown task {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name].make(**options)

