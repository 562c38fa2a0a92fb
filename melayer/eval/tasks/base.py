"""What every task is: samples, the run context, the :class:`Task` base class and the tokenising helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from melayer.eval.stats import Metric
from melayer.models.chat import ChatSetting, render_chat
from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.eval import engine as E
    from melayer.models.loading import LM


@dataclass
class Sample:
    id: str
    doc: dict[str, Any]


@dataclass
class RunContext:
    """What a batch needs besides the samples."""

    chat: bool
    max_new_tokens: int | None
    intervention: E.Intervention = None


@dataclass
class Task:
    """Base class: a named task with a data loader, a prompt format and per-sample scoring."""

    name: str = ""
    family: str = ""  # "generate" | "loglik" | "perplexity"
    description: str = ""
    metrics: tuple[Metric, ...] = ()
    default_max_new_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    given: frozenset[str] = frozenset()  # the options the user set (the rest are defaults)

    def load(self, limit: int | None = None, lm: LM | None = None) -> list[Sample]:
        samples = self._load(lm)
        return samples if limit is None else samples[:limit]

    def _load(self, lm: LM | None) -> list[Sample]:
        raise NotImplementedError

    def prompt_format(self, chat: bool) -> str:
        raise NotImplementedError

    def uses_chat(self, lm: LM, chat: ChatSetting) -> bool:
        """Generation tasks use the chat template when asked or, with ``auto``, when the tokenizer has one;
        log-likelihood and perplexity tasks only when asked explicitly."""
        has = bool(getattr(lm.tokenizer, "chat_template", None))
        if chat == "auto":
            return has and self.family == "generate"
        if chat and not has:
            raise MelayerError(f"{lm.name} has no chat template; use --chat off (or auto)")
        if chat and self.family == "perplexity":
            raise MelayerError("perplexity is measured on raw text; a chat template does not apply")
        return bool(chat)

    def sink_text(self, sample: Sample) -> str:
        """A plain-text prompt for attention-sink measurements."""
        raise NotImplementedError

    def size_hint(self, sample: Sample) -> int:
        """A cheap estimate of the sample's prompt length (characters), to batch samples of similar length."""
        try:
            return len(self.sink_text(sample))
        except NotImplementedError:
            return 0

    def run_batch(self, lm: LM, samples: Sequence[Sample], ctx: RunContext) -> list[dict[str, Any]]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return dict(self.options)

    def breakdown(self, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """Metrics per part of the task (e.g. per MMLU subject and group), for eval.json; None if not split."""
        return None


def chat_text(lm: LM, messages: list[dict[str, str]]) -> str:
    return render_chat(lm.tokenizer, messages, name=lm.name)


def encode(lm: LM, text: str, special: bool) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=special)["input_ids"])
