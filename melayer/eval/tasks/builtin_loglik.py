"""LAMBADA and WinoGrande: log-likelihood tasks that are not plain multiple choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from melayer.eval import data
from melayer.eval.stats import Metric
from melayer.eval.tasks.base import Sample
from melayer.eval.tasks.loglik import LoglikTask, Request

if TYPE_CHECKING:
    from melayer.models.loading import LM


@dataclass
class Lambada(LoglikTask):
    name: str = "lambada"
    description: str = "LAMBADA test, original release (5,153 passages): predict the last word"
    metrics: tuple[Metric, ...] = (Metric("acc", binary=True),
                                   Metric("ppl", kind="exp_neg_mean", higher_is_better=False))
    norm: bool = False

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(f"lambada-{i}", {"text": t}) for i, t in enumerate(data.lambada())]

    def request(self, sample: Sample) -> Request:
        words = sample.doc["text"].split(" ")
        return Request([" ".join(words[:-1])], [" " + words[-1]], 0)

    def prompt_format(self, chat: bool) -> str:
        return ("context = passage without its last word, target = ' ' + last word (lm-eval lambada_standard; "
                "original lower-cased tokenised text); acc = every target token is the greedy prediction, "
                "ppl = exp(-mean target log-likelihood)" + ("; context wrapped in the chat template" if chat else ""))

    def score(self, req: Request, pairs: list[tuple[str, str]], scores: list[tuple[float, bool]]) -> dict[str, Any]:
        ll, greedy = scores[0]
        return {"metrics": {"acc": float(greedy), "ppl": ll}, "loglik": ll, "target": req.continuations[0].strip()}


@dataclass
class Winogrande(LoglikTask):
    name: str = "winogrande"
    description: str = "WinoGrande 1.1 dev (1,267 items), partial scoring"
    metrics: tuple[Metric, ...] = (Metric("acc", binary=True),)
    norm: bool = False

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(d["qID"], d) for d in data.winogrande()]

    def request(self, sample: Sample) -> Request:
        d = sample.doc
        idx = d["sentence"].index("_")
        ctxs = [d["sentence"][:idx] + opt for opt in (d["option1"], d["option2"])]
        return Request(ctxs, [" " + d["sentence"][idx + 1:].strip()], {"1": 0, "2": 1}[str(d["answer"])])

    def prompt_format(self, chat: bool) -> str:
        return ("partial scoring (lm-eval winogrande): contexts = sentence up to '_' with each option filled in, "
                "shared continuation ' {rest of the sentence}'; acc = argmax log-likelihood of the continuation"
                + ("; contexts wrapped in the chat template" if chat else ""))
