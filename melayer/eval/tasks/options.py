"""Task options: declared once (name, type, default, help); the CLI builds its flags from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskOption:
    """An option a task takes (``--NAME`` on the command line, ``NAME=`` in ``run``/``get_task``)."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


FEWSHOT = TaskOption("num_fewshot", int, 0, "k in-context exemplars (gsm8k: 0-8, the first train problems; mmlu: "
                                            "0-5, the subject's first dev questions)")
PPL_WINDOW = TaskOption("window", int, 1024, "ppl only: tokens per window (incl. the BOS prefix, if any)")
PPL_STRIDE = TaskOption("stride", int, 512, "ppl only: tokens each window advances (its new, scored tokens)")
SUBJECTS = TaskOption("subjects", str, "", "mmlu only: comma-separated subjects or groups (stem, humanities, "
                                           "social_sciences, other); default: all 57")
