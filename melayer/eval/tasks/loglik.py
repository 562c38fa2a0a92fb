"""Log-likelihood tasks: a :class:`Request` per sample (contexts x continuations), scored like lm-eval, and
:class:`MultipleChoice`, the declarative form most such tasks need (see ``docs/tasks.md``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from melayer.eval.stats import Metric
from melayer.eval.tasks.base import RunContext, Sample, Task, chat_text, encode
from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.models.loading import LM


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
                ctx = chat_text(lm, [{"role": "user", "content": ctx.strip()}])
                cont = cont.lstrip()
            n_sp = len(ctx) - len(ctx.rstrip())
            if n_sp:
                ctx, cont = ctx[:-n_sp], ctx[-n_sp:] + cont
            special = not chat
            if ctx not in index:
                ids = encode(lm, ctx, special)
                if not ids:
                    raise MelayerError(f"{self.name}: empty context after tokenisation")
                index[ctx] = len(contexts)
                contexts.append(ids)
            ctx_ids = contexts[index[ctx]]
            whole = encode(lm, ctx + cont, special)
            if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
                cont_ids = whole[len(ctx_ids):]
            else:
                cont_ids = encode(lm, cont, False)
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


ACC = (Metric("acc", binary=True), Metric("acc_norm", binary=True), Metric("acc_bytes", binary=True))
NORMS = ("acc = argmax summed log-prob, acc_norm = argmax log-prob / characters of the choice, acc_bytes = "
         "argmax log-prob / UTF-8 bytes of the choice (lm-eval's definitions; the choice without the ' ' delimiter)")

Field = str | Callable[[dict[str, Any]], Any]


def _field(spec: Field, doc: dict[str, Any], what: str, task: str) -> Any:
    """A declarative field: a callable of the document, or a template filled from its keys (``{question}``)."""
    if callable(spec):
        return spec(doc)
    try:
        return spec.format_map(doc)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise MelayerError(f"task {task}: cannot fill the {what} template {spec!r} from a document ({exc})") from None


@dataclass
class MultipleChoice(LoglikTask):
    """A multiple-choice log-likelihood task declared by its fields, like an lm-eval YAML.

    ``docs`` returns the documents (in a fixed order); ``context`` (``doc_to_text``), ``choices``
    (``doc_to_choice``: the answer texts) and ``target`` (``doc_to_target``: the gold text, or its index)
    are callables of a document or templates filled from its keys. Each choice is scored as
    ``delimiter + choice`` after the context; metrics acc, acc_norm, acc_bytes as lm-eval defines them.
    Register one with :func:`melayer.eval.tasks.register_task`.
    """

    docs: Callable[[], list[dict[str, Any]]] | None = None
    context: Field = ""
    choices: Callable[[dict[str, Any]], list[str]] | None = None
    target: Field | None = None
    doc_id: Field | None = None  # default: "<task>-<index>"
    delimiter: str = " "
    format: str = ""  # how the prompt is built, for eval.json (default: from the templates)
    metrics: tuple[Metric, ...] = ACC

    def _load(self, lm: LM | None) -> list[Sample]:
        if self.docs is None or self.choices is None or self.target is None:
            raise MelayerError(f"task {self.name}: a MultipleChoice task needs docs, choices and target")
        out = []
        for i, d in enumerate(self.docs()):
            sid = f"{self.name}-{i}" if self.doc_id is None else str(_field(self.doc_id, d, "doc_id", self.name))
            out.append(Sample(sid, d))
        return out

    def request(self, sample: Sample) -> Request:
        d = sample.doc
        texts = [str(c) for c in self.choices(d)]  # type: ignore[misc]
        gold = _field(self.target, d, "target", self.name)  # type: ignore[arg-type]
        if isinstance(gold, str):  # a choice's text first, else an index written as text (a filled template)
            if gold in texts:
                gold = texts.index(gold)
            elif not gold.strip().isdigit():
                raise MelayerError(f"task {self.name}: target {gold!r} of {sample.id} is not one of its choices")
        gold = int(gold)
        if not 0 <= gold < len(texts):
            raise MelayerError(f"task {self.name}: target {gold} of {sample.id} is out of range")
        return Request([str(_field(self.context, d, "context", self.name))],
                       [self.delimiter + c for c in texts], gold, texts)

    def prompt_format(self, chat: bool) -> str:
        ctx = f"context {self.context!r}" if isinstance(self.context, str) else "context from a function"
        head = self.format or f"{ctx}, continuations '{self.delimiter}{{choice}}', 0-shot"
        return head + "; " + NORMS + ("; context wrapped in the chat template" if chat else "")
