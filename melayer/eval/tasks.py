"""The evaluation tasks: one class per family, a small registry.

Every task reads the data vendored in ``melayer/data/eval``; ``load(limit)`` returns the first ``limit`` samples
in file order with stable ids, and ``run_batch`` turns a batch of samples into per-sample records whose
``metrics`` are aggregated by :mod:`melayer.eval.stats`. Prompt formats follow lm-eval 0.4.x's task configs
(stated in ``prompt_format``, which goes into every eval.json).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from melayer.eval import answers, data
from melayer.eval.stats import Metric
from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.eval import engine as E
    from melayer.models.loading import LM

# the task registry feeds the CLI's options and help: the engine (torch) is imported when a batch runs


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

    def uses_chat(self, lm: LM, chat: bool | str) -> bool:
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


def _chat_text(lm: LM, messages: list[dict[str, str]]) -> str:
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(lm: LM, text: str, special: bool) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=special)["input_ids"])


# ---------------------------------------------------------------------------------------------------
# generation


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
            rows = [_encode(lm, _chat_text(lm, self.messages(s)), special=False) for s in samples]
        else:
            rows = [_encode(lm, self.plain(s), special=True) for s in samples]
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
class IFEval(GenerationTask):
    name: str = "ifeval"
    description: str = "IFEval (541 prompts), scored with lm-eval's copy of Google's official checker"
    metrics: tuple[Metric, ...] = (
        Metric("prompt_level_strict_acc", binary=True), Metric("inst_level_strict_acc", kind="ratio"),
        Metric("prompt_level_loose_acc", binary=True), Metric("inst_level_loose_acc", kind="ratio"))
    default_max_new_tokens: int | None = 512

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(f"ifeval-{d['key']}", d) for d in data.ifeval()]

    def plain(self, sample: Sample) -> str:
        return sample.doc["prompt"]

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        return [{"role": "user", "content": sample.doc["prompt"]}]

    def prompt_format(self, chat: bool) -> str:
        base = "chat template, user: '{prompt}'" if chat else "'{prompt}' as raw text"
        return (base + "; 0-shot; stop at EOS (lm-eval ifeval uses max_gen_toks 1280); prompt- and "
                "instruction-level accuracy, strict and loose (lm_eval.tasks.ifeval.utils)")

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        return answers.ifeval_score(sample.doc, output)


# ---------------------------------------------------------------------------------------------------
# log-likelihood


@dataclass
class Request:
    contexts: list[str]  # one per choice, or a single shared context
    continuations: list[str]  # one per choice, or a single shared continuation
    gold: int
    choices: list[str] | None = None  # the answer texts without the " " delimiter (lm-eval's doc_to_choice)


@dataclass
class LoglikTask(Task):
    family: str = "loglik"
    norm: bool = True  # also report acc_norm and acc_bytes (length-normalised, as lm-eval defines them)

    def request(self, sample: Sample) -> Request:
        raise NotImplementedError

    def sink_text(self, sample: Sample) -> str:
        return self.request(sample).contexts[0]

    def _pairs(self, req: Request) -> list[tuple[str, str]]:
        n = max(len(req.contexts), len(req.continuations))
        ctxs = req.contexts if len(req.contexts) == n else req.contexts * n
        conts = req.continuations if len(req.continuations) == n else req.continuations * n
        return list(zip(ctxs, conts))

    def _tokenize(self, lm: LM, pairs: list[tuple[str, str]], chat: bool
                  ) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
        """Distinct tokenised contexts, and per pair (context index, continuation tokens). Like lm-eval,
        trailing context spaces move to the continuation and the continuation tokens are the tail of the
        jointly tokenised text (the continuation alone if the tokeniser merges across the boundary)."""
        index: dict[str, int] = {}
        contexts: list[list[int]] = []
        out = []
        for ctx, cont in pairs:
            if chat:
                ctx = _chat_text(lm, [{"role": "user", "content": ctx.strip()}])
                cont = cont.lstrip()
            n_sp = len(ctx) - len(ctx.rstrip())
            if n_sp:
                ctx, cont = ctx[:-n_sp], ctx[-n_sp:] + cont
            special = not chat
            if ctx not in index:
                ids = _encode(lm, ctx, special)
                if not ids:
                    raise MelayerError(f"{self.name}: empty context after tokenisation")
                index[ctx] = len(contexts)
                contexts.append(ids)
            ctx_ids = contexts[index[ctx]]
            whole = _encode(lm, ctx + cont, special)
            if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
                cont_ids = whole[len(ctx_ids):]
            else:
                cont_ids = _encode(lm, cont, False)
            if not cont_ids:
                raise MelayerError(f"{self.name}: empty continuation after tokenisation")
            out.append((index[ctx], cont_ids))
        return contexts, out

    def run_batch(self, lm: LM, samples: Sequence[Sample], ctx: RunContext) -> list[dict[str, Any]]:
        reqs = [self.request(s) for s in samples]
        pairs = [self._pairs(r) for r in reqs]
        contexts, toks = self._tokenize(lm, [p for ps in pairs for p in ps], ctx.chat)
        from melayer.eval import engine as E

        contexts, toks, cuts = E.truncate_left(contexts, toks, lm.max_positions)
        scores = E.score_continuations(lm, contexts, toks, intervention=ctx.intervention)
        records, at = [], 0
        for s, req, ps in zip(samples, reqs, pairs):
            part = scores[at: at + len(ps)]
            cut = max(cuts[at: at + len(ps)])
            at += len(ps)
            records.append({"id": s.id, **self.score(req, ps, part), **({"truncated_tokens": cut} if cut else {})})
        return records

    def score(self, req: Request, pairs: list[tuple[str, str]], scores: list[tuple[float, bool]]) -> dict[str, Any]:
        ll = [s for s, _ in scores]
        pred = max(range(len(ll)), key=lambda i: ll[i])
        metrics = {"acc": float(pred == req.gold)}
        rec: dict[str, Any] = {"logliks": ll, "pred": pred, "gold": req.gold}
        if self.norm:
            # lm-eval: acc_norm divides by the choice's length in characters, acc_bytes by its UTF-8 bytes, both
            # without the " " delimiter (lm_eval.api.task.ConfigurableTask.process_results)
            choices = req.choices if req.choices is not None else req.continuations
            for metric, key, lengths in (("acc_norm", "pred_norm", [len(c) for c in choices]),
                                         ("acc_bytes", "pred_bytes", [len(c.encode("utf-8")) for c in choices])):
                normed = [x / max(n, 1) for x, n in zip(ll, lengths)]
                pred_n = max(range(len(normed)), key=lambda i: normed[i])
                metrics[metric] = float(pred_n == req.gold)
                rec[key] = pred_n
        return {"metrics": metrics, **rec}


_ACC = (Metric("acc", binary=True), Metric("acc_norm", binary=True), Metric("acc_bytes", binary=True))
_NORMS = ("acc = argmax summed log-prob, acc_norm = argmax log-prob / characters of the choice, acc_bytes = "
          "argmax log-prob / UTF-8 bytes of the choice (lm-eval's definitions; the choice without the ' ' delimiter)")


@dataclass
class ARC(LoglikTask):
    name: str = "arc_easy"
    subset: str = "easy"
    description: str = "ARC-Easy test (2,376 questions), log-likelihood of each answer text"
    metrics: tuple[Metric, ...] = _ACC

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(d["id"], d) for d in data.arc(self.subset)]

    def request(self, sample: Sample) -> Request:
        q = sample.doc["question"]
        labels = [c["label"] for c in q["choices"]]
        return Request([f"Question: {q['stem']}\nAnswer:"], [f" {c['text']}" for c in q["choices"]],
                       labels.index(sample.doc["answerKey"]), [c["text"] for c in q["choices"]])

    def prompt_format(self, chat: bool) -> str:
        return ("context 'Question: {question}\\nAnswer:', continuations ' {choice text}' (lm-eval arc_easy / "
                "arc_challenge), 0-shot; " + _NORMS + ("; context wrapped in the chat template" if chat else ""))

    def sink_text(self, sample: Sample) -> str:
        return f"Question: {sample.doc['question']['stem']}\nAnswer:"


@dataclass
class HellaSwag(LoglikTask):
    name: str = "hellaswag"
    description: str = "HellaSwag validation (10,042 items), log-likelihood of each ending"
    metrics: tuple[Metric, ...] = _ACC

    def _load(self, lm: LM | None) -> list[Sample]:
        return [Sample(f"hellaswag-{i}", d) for i, d in enumerate(data.hellaswag())]

    def request(self, sample: Sample) -> Request:
        d = sample.doc
        return Request([d["ctx"]], [f" {e}" for e in d["endings"]], d["label"], list(d["endings"]))

    def prompt_format(self, chat: bool) -> str:
        return ("context '{activity_label}: {ctx}', continuations ' {ending}' (lm-eval hellaswag layout; the vendored "
                "llama.cpp text file is already preprocessed ([header]/[step]/[title] markers removed) and joins "
                "ctx_a and ctx_b, so ctx_b is not capitalised as lm-eval does), 0-shot; " + _NORMS
                + ("; context wrapped in the chat template" if chat else ""))


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


# ---------------------------------------------------------------------------------------------------
# perplexity


@dataclass
class WikiText2(Task):
    name: str = "ppl"
    family: str = "perplexity"
    description: str = "WikiText-2 raw test, sliding-window token-level perplexity"
    metrics: tuple[Metric, ...] = (Metric("ppl", kind="exp_ratio", higher_is_better=False),)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        w = int(self.options.setdefault("window", PPL_WINDOW.default))
        s = int(self.options.setdefault("stride", PPL_STRIDE.default))
        if w < 2 or not 1 <= s <= w - 1:
            raise MelayerError(f"ppl needs window >= 2 and 1 <= stride < window (got window {w}, stride {s})")

    def _tokens(self, lm: LM) -> tuple[list[int], list[int]]:
        key = id(lm.tokenizer)
        if key not in self._cache:
            from melayer.analysis.perplexity import special_prefix

            self._cache[key] = (_encode(lm, data.wikitext2_test(), special=False), special_prefix(lm.tokenizer))
        return self._cache[key]

    def _load(self, lm: LM | None) -> list[Sample]:
        if lm is None:
            raise MelayerError("ppl windows depend on the tokenizer: load(limit, lm=...)")
        self._fit(lm)
        ids, prefix = self._tokens(lm)
        from melayer.analysis.perplexity import rolling_windows

        windows = rolling_windows(len(ids), window=self.options["window"], stride=self.options["stride"],
                                  prefix_len=len(prefix))
        return [Sample(f"ppl-w{k}", {"begin": w.begin, "end": w.end, "scored": w.scored})
                for k, w in enumerate(windows)]

    def _fit(self, lm: LM) -> None:
        """The default window shrinks to the model's positions (stride: half of it); a window the user chose
        that is longer is refused for learned positions (and warned about otherwise, when it runs)."""
        limit = lm.max_positions
        if limit is None or self.options["window"] <= limit:
            return
        if "window" in self.given:
            if lm.learned_positions:
                raise MelayerError(f"--window {self.options['window']} is longer than {lm.name}'s {limit} positions")
            return
        self.options["window"] = limit
        if self.options["stride"] >= limit:
            if "stride" in self.given:
                raise MelayerError(f"--stride {self.options['stride']} is not shorter than the window, which "
                                   f"{lm.name}'s {limit} positions limit to {limit}")
            self.options["stride"] = limit // 2

    def prompt_format(self, chat: bool) -> str:
        w, s = self.options["window"], self.options["stride"]
        return (f"wiki.test.raw as one string, tokenised once without special tokens; windows of {w} tokens "
                f"(incl. the tokenizer's special prefix, e.g. BOS, which starts every window) advancing by {s}; the first "
                f"window scores all its tokens (without a prefix all but the first), later windows only the tokens "
                f"no earlier window scored; ppl = exp(total NLL / scored tokens) (melayer.analysis.perplexity)")

    def sink_text(self, sample: Sample) -> str:
        return data.wikitext2_test()[:2000].strip()

    def size_hint(self, sample: Sample) -> int:
        return int(sample.doc["end"]) - int(sample.doc["begin"])  # the window's tokens

    def run_batch(self, lm: LM, samples: Sequence[Sample], ctx: RunContext) -> list[dict[str, Any]]:
        ids, prefix = self._tokens(lm)
        from melayer.analysis.perplexity import Window, window_rows
        from melayer.eval import engine as E

        rows = window_rows(ids, [Window(**s.doc) for s in samples], prefix)
        scores = E.score_tails(lm, rows, intervention=ctx.intervention)
        return [{"id": s.id, "metrics": {"ppl": [-ll, float(s.doc["scored"])]}, "tokens": s.doc["scored"]}
                for s, (ll, _) in zip(samples, scores)]


# ---------------------------------------------------------------------------------------------------
# registry: one typed entry per task; options are declared here once (name, type, default, help) and the CLI
# builds its task list and task options from it


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
        values = {o.name: o.type(options.get(o.name, o.default)) for o in self.options}
        return self.cls(name=self.name, options=values, given=frozenset(options), **self.fields)


FEWSHOT = TaskOption("num_fewshot", int, 0, "gsm8k only: k exemplars (0-8) from the first train problems")
PPL_WINDOW = TaskOption("window", int, 1024, "ppl only: tokens per window (incl. the BOS prefix, if any)")
PPL_STRIDE = TaskOption("stride", int, 512, "ppl only: tokens each window advances (its new, scored tokens)")

REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("ppl", WikiText2, (PPL_WINDOW, PPL_STRIDE)),
    TaskSpec("gsm8k", GSM8K, (FEWSHOT,)),
    TaskSpec("math500", Math500),
    TaskSpec("ifeval", IFEval),
    TaskSpec("arc_easy", ARC, fields={"subset": "easy"}),
    TaskSpec("arc_challenge", ARC, fields={"subset": "challenge", "description":
                                            "ARC-Challenge test (1,172 questions), log-likelihood of each answer text"}),
    TaskSpec("hellaswag", HellaSwag),
    TaskSpec("lambada", Lambada),
    TaskSpec("winogrande", Winogrande),
)}
TASKS = REGISTRY  # the task names, in registry order


def task_options() -> dict[str, TaskOption]:
    """Every task option by name (shared options are one entry)."""
    return {o.name: o for spec in REGISTRY.values() for o in spec.options}


def get_task(name: str | Task, **options: Any) -> Task:
    """A task by name (see :data:`REGISTRY`), with its options (gsm8k: num_fewshot; ppl: window, stride)."""
    if isinstance(name, Task):
        return name
    if name not in REGISTRY:
        raise MelayerError(f"unknown task {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name].make(**options)
