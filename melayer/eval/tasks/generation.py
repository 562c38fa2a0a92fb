"""Generation tasks: greedy decoding, then a per-sample scorer (GSM8K, MATH-500, IFEval)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from melayer.eval import answers, data
from melayer.eval.stats import Metric
from melayer.eval.tasks.base import RunContext, Sample, Task, chat_text, encode
from melayer.eval.tasks.options import FEWSHOT
from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.models.loading import LM


@dataclass
class GenerationTask(Task):
    family: str = "generate"
    stop_plain: tuple[str, ...] = ()

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        raise NotImplementedError

    def plain(self, sample: Sample) -> str:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else list(self.stop_plain)

    def sink_text(self, sample: Sample) -> str:
        return self.plain(sample)

    def run_batch(self, lm: LM, samples: Sequence[Sample], ctx: RunContext) -> list[dict[str, Any]]:
        if ctx.chat:
            rows = [encode(lm, chat_text(lm, self.messages(s)), special=False) for s in samples]
        else:
            rows = [encode(lm, self.plain(s), special=True) for s in samples]
        new_tokens = int(ctx.max_new_tokens or self.default_max_new_tokens or 256)
        # like lm-eval's generate_until: a prompt longer than (positions - new tokens) loses its start
        room = None if lm.max_positions is None else lm.max_positions - new_tokens
        if room is not None and room < 1:
            raise MelayerError(f"--max-new-tokens {new_tokens} leaves no room for a prompt in {lm.name}'s "
                               f"{lm.max_positions} positions")
        cuts = [max(0, len(r) - room) if room is not None else 0 for r in rows]
        rows = [r[c:] for r, c in zip(rows, cuts)]
        from melayer.eval import engine as E

        outs = E.generate(lm, rows, max_new_tokens=new_tokens, stop=self.stop(ctx.chat),
                          intervention=ctx.intervention)
        records = []
        for s, row, out, cut in zip(samples, rows, outs, cuts):
            scored = self.score(s, out["text"])
            metrics = {m.name: scored.pop(m.name) for m in self.metrics}
            records.append({"id": s.id, "metrics": metrics, "output": out["text"], "finish": out["finish"],
                            "prompt_tokens": len(row), "new_tokens": out["new_tokens"], **scored,
                            **({"truncated_tokens": cut} if cut else {})})
        return records


GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class GSM8K(GenerationTask):
    name: str = "gsm8k"
    description: str = "GSM8K test (1,319 grade-school math problems), greedy generation"
    metrics: tuple[Metric, ...] = (Metric("exact_match_strict", binary=True), Metric("exact_match_flexible", binary=True))
    default_max_new_tokens: int | None = 256
    stop_plain: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")

    def __post_init__(self) -> None:
        k = int(self.options.setdefault("num_fewshot", FEWSHOT.default))
        if not 0 <= k <= 8:
            raise MelayerError("gsm8k --num-fewshot must be between 0 and 8 (exemplars: first 8 train problems)")

    def _shots(self) -> list[dict[str, Any]]:
        return data.gsm8k_fewshot()[: self.options["num_fewshot"]]

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(f"gsm8k-{i}", {**d, "gold": answers.gsm8k_gold(d["answer"])})
                for i, d in enumerate(data.gsm8k_test())]

    def plain(self, sample: Sample) -> str:
        shots = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in self._shots())
        return f"{shots}Question: {sample.doc['question']}\nAnswer:"

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        for d in self._shots():
            msgs += [{"role": "user", "content": f"{d['question']}\n{GSM8K_INSTRUCTION}"},
                     {"role": "assistant", "content": d["answer"]}]
        return msgs + [{"role": "user", "content": f"{sample.doc['question']}\n{GSM8K_INSTRUCTION}"}]

    def prompt_format(self, chat: bool) -> str:
        k = self.options["num_fewshot"]
        shots = f"{k}-shot (first {k} train problems, full solutions)" if k else "0-shot"
        if chat:
            return (f"chat template, user: '{{question}}\\n{GSM8K_INSTRUCTION}'; {shots} as user/assistant turns; "
                    "stop at EOS")
        return (f"'Question: {{question}}\\nAnswer:' (lm-eval gsm8k); {shots}; stop at 'Question:', '</s>', "
                "'<|im_end|>' or EOS; strict = number after the first '####' (else after 'The answer is'), "
                "flexible = last number; exact numeric match after removing ',', '$' and trailing zeros")

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        return {"gold": sample.doc["gold"], **answers.gsm8k_score(output, sample.doc["gold"])}


@dataclass
class Math500(GenerationTask):
    name: str = "math500"
    description: str = "MATH-500 (PRM800K test split), greedy generation, last \\boxed{} answer"
    metrics: tuple[Metric, ...] = (Metric("exact_match", binary=True),)
    default_max_new_tokens: int | None = 512
    stop_plain: tuple[str, ...] = ("Problem:",)

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(d["unique_id"], d) for d in data.math500()]

    def plain(self, sample: Sample) -> str:
        return f"Problem: {sample.doc['problem']}\n{MATH_INSTRUCTION}\nSolution:"

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{sample.doc['problem']}\n{MATH_INSTRUCTION}"}]

    def prompt_format(self, chat: bool) -> str:
        tail = ("; answer = last \\boxed{} (or \\fbox{}) of the output; equivalence with the gold answer by "
                "math-verify parse/verify")
        if chat:
            return f"chat template, user: '{{problem}}\\n{MATH_INSTRUCTION}'; 0-shot; stop at EOS" + tail
        return f"'Problem: {{problem}}\\n{MATH_INSTRUCTION}\\nSolution:'; 0-shot; stop at 'Problem:' or EOS" + tail

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        return {"gold": sample.doc["answer"], **answers.math_score(output, sample.doc["answer"])}


@dataclass
class PromptTask(GenerationTask):
    """A generation task whose document carries the whole prompt in ``doc["prompt"]`` (0-shot)."""

    scoring: str = ""  # what follows the prompt in prompt_format

    def plain(self, sample: Sample) -> str:
        return sample.doc["prompt"]

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        return [{"role": "user", "content": sample.doc["prompt"]}]

    def prompt_format(self, chat: bool) -> str:
        return ("chat template, user: '{prompt}'" if chat else "'{prompt}' as raw text") + self.scoring


@dataclass
class IFEval(PromptTask):
    name: str = "ifeval"
    description: str = "IFEval (541 prompts), scored with lm-eval's copy of Google's official checker"
    metrics: tuple[Metric, ...] = (
        Metric("prompt_level_strict_acc", binary=True), Metric("inst_level_strict_acc", kind="ratio"),
        Metric("prompt_level_loose_acc", binary=True), Metric("inst_level_loose_acc", kind="ratio"))
    default_max_new_tokens: int | None = 512

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(f"ifeval-{d['key']}", d) for d in data.ifeval()]

    scoring: str = ("; 0-shot; stop at EOS (lm-eval ifeval uses max_gen_toks 1280); prompt- and "
                    "instruction-level accuracy, strict and loose (lm_eval.tasks.ifeval.utils)")

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        return answers.ifeval_score(sample.doc, output)


@dataclass
class AIME24(Math500):
    name: str = "aime24"
    description: str = "AIME 2024 I and II (30 problems), greedy generation, last \\boxed{} as an integer"
    default_max_new_tokens: int | None = 1024

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(f"aime24-{d['id']}", d) for d in data.aime24()]

    def prompt_format(self, chat: bool) -> str:
        return super().prompt_format(chat).split("; answer =")[0] + (
            "; answer = last \\boxed{} (or \\fbox{}) of the output read as an integer, compared with the gold "
            "integer (lm-eval aime24 also takes the last \\boxed{})")

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        return {"gold": sample.doc["answer"], **answers.aime_score(output, sample.doc["answer"])}
