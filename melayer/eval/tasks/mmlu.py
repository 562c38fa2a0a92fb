"""MMLU as lm-eval defines it: ``mmlu`` (letters) and ``mmlu_continuation`` (the option text).

``mmlu``: the subject's description ("The following are multiple choice questions (with answers) about
<subject>."), ``num_fewshot`` examples from the subject's ``dev`` split in file order (lm-eval's ``first_n``
sampler), each followed by " <letter>", then the question with its lettered options and "Answer:"; the choices
" A" .. " D" are scored by log-likelihood; ``acc``. ``mmlu_continuation``: "Question: ...\\nAnswer:" and the
option texts. Groups (stem, humanities, social_sciences, other) and the whole are weighted by size, i.e. the
mean over their questions (lm-eval's ``weight_by_size``). Tested per sample against lm-eval's HFLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from melayer.eval import data
from melayer.eval.stats import Metric
from melayer.eval.tasks.base import Sample
from melayer.eval.tasks.loglik import ACC, NORMS, LoglikTask, Request
from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.models.loading import LM

LETTERS = ("A", "B", "C", "D")
MAX_SHOTS = 5


def pick_subjects(spec: str) -> list[str]:
    """"" (all), or comma-separated subjects and group names -> sorted subjects."""
    groups = data.mmlu_groups()
    if not spec.strip():
        return sorted(groups)
    out: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in groups:
            out.add(part)
        elif part in set(groups.values()):
            out.update(s for s, g in groups.items() if g == part)
        else:
            raise MelayerError(f"--subjects: unknown MMLU subject or group {part!r} (groups: stem, humanities, "
                               "social_sciences, other; subjects as in abstract_algebra, high_school_biology, ...)")
    return sorted(out)


@dataclass
class MMLU(LoglikTask):
    name: str = "mmlu"
    description: str = "MMLU test (57 subjects, 14,042 questions), log-likelihood of the answer letter"
    metrics: tuple[Metric, ...] = (Metric("acc", binary=True),)
    norm: bool = False
    continuation: bool = False

    def __post_init__(self) -> None:
        k = int(self.options.setdefault("num_fewshot", 0))
        if not 0 <= k <= MAX_SHOTS:
            raise MelayerError(f"{self.name} --num-fewshot must be between 0 and {MAX_SHOTS} (the dev split has 5 "
                               "questions per subject)")
        self.options["subjects"] = ",".join(pick_subjects(str(self.options.get("subjects") or "")))
        if self.continuation:
            self.norm = True
            self.metrics = ACC

    def subjects(self) -> list[str]:
        return self.options["subjects"].split(",")

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(f"mmlu-{s}-{i}", d) for s in self.subjects() for i, d in enumerate(data.mmlu(s, "test"))]

    def _text(self, d: dict[str, Any]) -> str:
        q = d["question"].strip()
        if self.continuation:
            return f"Question: {q}\nAnswer:"
        return q + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, d["choices"])) + "\nAnswer:"

    def _choices(self, d: dict[str, Any]) -> list[str]:
        return list(d["choices"]) if self.continuation else list(LETTERS)

    def context(self, d: dict[str, Any]) -> str:
        subject = d["subject"].replace("_", " ")
        head = (f"The following are {'' if self.continuation else 'multiple choice '}questions (with answers) "
                f"about {subject}.\n\n")
        shots = data.mmlu(d["subject"], "dev")[: self.options["num_fewshot"]]
        return head + "".join(f"{self._text(s)} {self._choices(s)[s['answer']]}\n\n" for s in shots) + self._text(d)

    def request(self, sample: Sample) -> Request:
        d = sample.doc
        choices = self._choices(d)
        return Request([self.context(d)], [" " + c for c in choices], int(d["answer"]), choices)

    def sink_text(self, sample: Sample) -> str:
        return self._text(sample.doc)

    def prompt_format(self, chat: bool) -> str:
        k = self.options["num_fewshot"]
        if self.continuation:
            body = ("'The following are questions (with answers) about {subject}.\\n\\n' + shots + 'Question: "
                    "{question}\\nAnswer:', continuations ' {option text}' (lm-eval mmlu_continuation); " + NORMS)
        else:
            body = ("'The following are multiple choice questions (with answers) about {subject}.\\n\\n' + shots + "
                    "'{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:', continuations ' A' .. ' D' "
                    "(lm-eval mmlu); acc = argmax log-likelihood")
        return (f"{body}; {k}-shot from the subject's dev split in file order, each shot followed by ' {{answer}}"
                f"\\n\\n'; groups weighted by size" + ("; context wrapped in the chat template" if chat else ""))

    def breakdown(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        groups = data.mmlu_groups()
        by: dict[str, dict[str, list[float]]] = {"subject": {}, "group": {}}
        for r in records:
            subject = r["id"].split("-")[1]
            by["subject"].setdefault(subject, []).append(r["metrics"]["acc"])
            by["group"].setdefault(groups[subject], []).append(r["metrics"]["acc"])
        return {"metric": "acc", "weighting": "by size (mean over the questions of a group)",
                **{part: {k: {"acc": sum(v) / len(v), "n": len(v)} for k, v in sorted(vals.items())}
                   for part, vals in by.items()}}
