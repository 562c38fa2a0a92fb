"""The shipped tasks, registered in the order ``melayer ls tasks`` lists them."""

from __future__ import annotations

from typing import Any

from melayer.eval import data
from melayer.eval.tasks.builtin_loglik import Lambada, Winogrande
from melayer.eval.tasks.generation import AIME24, GSM8K, IFEval, Math500
from melayer.eval.tasks.loglik import MultipleChoice
from melayer.eval.tasks.mmlu import MMLU
from melayer.eval.tasks.options import FEWSHOT, PPL_STRIDE, PPL_WINDOW, SUBJECTS
from melayer.eval.tasks.perplexity import WikiText2
from melayer.eval.tasks.registry import TaskSpec, register_task
from melayer.eval.tasks.xstest import XSTest


def _arc_gold(d: dict[str, Any]) -> int:
    return [c["label"] for c in d["question"]["choices"]].index(d["answerKey"])


def _arc(subset: str, description: str) -> MultipleChoice:
    return MultipleChoice(
        name=f"arc_{subset}", description=description,
        docs=lambda: data.arc(subset), doc_id=lambda d: d["id"],
        context=lambda d: f"Question: {d['question']['stem']}\nAnswer:",
        choices=lambda d: [c["text"] for c in d["question"]["choices"]], target=_arc_gold,
        format="context 'Question: {question}\\nAnswer:', continuations ' {choice text}' (lm-eval arc_easy / "
               "arc_challenge), 0-shot")


HELLASWAG = MultipleChoice(
    name="hellaswag", description="HellaSwag validation (10,042 items), log-likelihood of each ending",
    docs=data.hellaswag, context="{ctx}", choices=lambda d: list(d["endings"]), target=lambda d: d["label"],
    format="context '{activity_label}: {ctx}', continuations ' {ending}' (lm-eval hellaswag layout; the vendored "
           "llama.cpp text file is already preprocessed ([header]/[step]/[title] markers removed) and joins "
           "ctx_a and ctx_b, so ctx_b is not capitalised as lm-eval does), 0-shot")


def register_builtin() -> None:
    for spec in (TaskSpec("ppl", WikiText2, (PPL_WINDOW, PPL_STRIDE)), TaskSpec("gsm8k", GSM8K, (FEWSHOT,)),
                 TaskSpec("math500", Math500), TaskSpec("ifeval", IFEval)):
        register_task(spec, replace=True)
    register_task(_arc("easy", "ARC-Easy test (2,376 questions), log-likelihood of each answer text"), replace=True)
    register_task(_arc("challenge", "ARC-Challenge test (1,172 questions), log-likelihood of each answer text"),
                  replace=True)
    register_task(HELLASWAG, replace=True)
    for spec in (TaskSpec("lambada", Lambada), TaskSpec("winogrande", Winogrande),
                 TaskSpec("mmlu", MMLU, (FEWSHOT, SUBJECTS)),
                 TaskSpec("mmlu_continuation", MMLU, (FEWSHOT, SUBJECTS), {
                     "continuation": True, "description": "MMLU test (57 subjects, 14,042 questions), "
                     "log-likelihood of each option's text"}),
                 TaskSpec("aime24", AIME24), TaskSpec("xstest", XSTest)):
        register_task(spec, replace=True)
