"""Model calls for evaluation: batched greedy generation and batched tail log-likelihoods.

Every model call runs inside ``intervention`` when one is given (a re-enterable context manager such as a
:class:`~melayer.interventions.wemask.WeMask` instance, or a callable returning one), so the intervention is active
for exactly the forward passes that produce the scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch

from melayer.analysis.perplexity import tail_logliks
from melayer.capture import Hooks, check_length, eos_ids, left_pad, pad_id, position_ids
from melayer.capture.sites import LOGIT_BUDGET, final_hidden, output_head
from melayer.interventions.generate import greedy
from melayer.models.hf_internals import cache_keyword, output_cache, reindex_cache
from melayer.models.loading import LM
from melayer.util.errors import MelayerError

Intervention = ContextManager[Any] | Callable[[], ContextManager[Any]] | None


def _ctx(intervention: Intervention) -> ContextManager[Any]:
    if intervention is None:
        return contextlib.nullcontext()
    if hasattr(intervention, "__enter__"):
        return intervention  # type: ignore[return-value]
    return intervention()


def truncate_left(contexts: Sequence[Sequence[int]], pairs: Sequence[tuple[int, Sequence[int]]], limit: int | None
                  ) -> tuple[list[list[int]], list[tuple[int, list[int]]], list[int]]:
    """lm-eval's rule for log-likelihood inputs longer than the model (``HFLM._loglikelihood_tokens``): keep the
    last ``limit + 1`` tokens of context + continuation (the last token is only a target), i.e. cut the context
    from the left. Returns the contexts actually used, the pairs re-pointed at them, and per pair the number of
    context tokens cut."""
    used: dict[tuple[int, ...], int] = {}
    new_contexts: list[list[int]] = []
    new_pairs, cuts = [], []
    for ci, cont in pairs:
        ctx = list(contexts[ci])
        over = 0 if limit is None else len(ctx) + len(cont) - 1 - limit
        if over >= len(ctx):
            raise MelayerError(f"a continuation of {len(cont)} tokens does not fit the model's {limit} positions")
        ctx = ctx[max(over, 0):]
        key = tuple(ctx)
        if key not in used:
            used[key] = len(new_contexts)
            new_contexts.append(ctx)
        new_pairs.append((used[key], list(cont)))
        cuts.append(max(over, 0))
    return new_contexts, new_pairs, cuts


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        j = text.find(s)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]


@torch.no_grad()
def generate(lm: LM, rows: Sequence[Sequence[int]], *, max_new_tokens: int, stop: Sequence[str] = (),
             intervention: Intervention = None) -> list[dict[str, Any]]:
    """Greedy decoding of a batch of tokenised prompts (left padded). Returns, per row, the generated text cut at
    the first stop string, the number of new tokens and why it stopped."""
    batch = left_pad(rows, pad_id(lm), lm.device)
    eos = eos_ids(lm)
    prompt_len = batch["input_ids"].shape[1]
    with _ctx(intervention):
        out = greedy(lm, batch, max_new_tokens, stop=stop)
    results = []
    for i in range(len(rows)):
        new = out[i, prompt_len:].tolist()
        n_new = len(new)
        hit_eos = False
        for j, t in enumerate(new):
            if t in eos:
                n_new, hit_eos = j, True
                break
        text = lm.tokenizer.decode(new[:n_new], skip_special_tokens=True)
        cut = cut_at_stop(text, stop)
        reason = "stop_string" if len(cut) < len(text) else "eos" if hit_eos else "length"
        results.append({"text": cut, "new_tokens": n_new, "finish": reason})
    return results


def score_tails(lm: LM, rows: Sequence[tuple[Sequence[int], int]], *,
                intervention: Intervention = None) -> list[tuple[float, bool]]:
    """:func:`melayer.analysis.perplexity.tail_logliks` with ``intervention`` active."""
    width = max((len(r) for r, _ in rows), default=0)
    check_length(lm, width, f"a scored window of {width} tokens")
    with _ctx(intervention):
        return tail_logliks(lm, rows)


@torch.no_grad()
def score_continuations(lm: LM, contexts: Sequence[Sequence[int]], pairs: Sequence[tuple[int, Sequence[int]]], *,
                        intervention: Intervention = None) -> list[tuple[float, bool]]:
    """Log-likelihood (and greedy flag) of each continuation given its context, computing every distinct
    context once: pass 1 runs the left-padded contexts with a KV cache, pass 2 runs all continuations (right
    padded) on a copy of their context's cache rows. ``pairs`` are ``(context index, continuation tokens)``.

    Equal to scoring ``context + continuation`` in one forward (tested); the intervention is active in both
    passes (WeMask masks the first real token, which only the context pass contains).
    """
    for ci, cont in pairs:
        if not cont or not 0 <= ci < len(contexts) or not contexts[ci]:
            raise ValueError("every pair needs a non-empty context and continuation")
    pad = pad_id(lm)
    batch = left_pad(contexts, pad, lm.device)
    mask = batch["attention_mask"]
    check_length(lm, max(len(contexts[ci]) + len(c) - 1 for ci, c in pairs), "a context plus continuation")
    captured: dict[str, torch.Tensor] = {}
    head = output_head(lm)
    with _ctx(intervention):
        out = lm.model(**batch, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # predicts each continuation's 1st token
        cache = output_cache(out)
        rest = max(len(c) for _, c in pairs) - 1
        hidden = None
        if rest > 0:
            idx = torch.tensor([ci for ci, _ in pairs])  # on the CPU: indexes a cache spread over devices
            reindex_cache(cache, idx, lm.name)
            ids = torch.full((len(pairs), rest), pad, dtype=torch.long)
            cmask = torch.zeros((len(pairs), rest), dtype=torch.long)
            for r, (_, cont) in enumerate(pairs):
                feed = list(cont[:-1])  # the last continuation token is only a target
                if feed:
                    ids[r, : len(feed)] = torch.tensor(feed)
                    cmask[r, : len(feed)] = 1
            ids, cmask = ids.to(lm.device), cmask.to(lm.device)
            full = torch.cat([mask[idx], cmask], dim=1)
            pos = mask[idx].sum(dim=1, keepdim=True) + torch.arange(rest, device=lm.device)[None, :]
            pos = pos.masked_fill(cmask == 0, 0)  # padding (masked, never scored) must not index past the positions
            with Hooks() as hooks:
                final_hidden(hooks, lm, captured)
                out2 = lm.model(input_ids=ids, attention_mask=full, position_ids=pos, use_cache=True, logits_to_keep=1,
                                **{cache_keyword(lm.model): cache})
            hidden = captured["h"]
            ref = out2.logits[:, -1:, :].float()
            check = head(hidden[:, -1:, :])
            if not torch.allclose(check, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max().clamp(min=1.0))):
                raise MelayerError(f"{lm.name}: cannot reproduce the model's logits from its final hidden states "
                                   "(unsupported output processing)")
    results = []
    chunk = max(1, LOGIT_BUDGET // first.shape[-1])
    for r, (ci, cont) in enumerate(pairs):
        target = torch.tensor(list(cont), device=first.device)  # the LM head's device
        total = float(first[ci, target[0]])
        greedy = bool(first[ci].argmax() == target[0])
        for s in range(1, len(cont), chunk):
            e = min(len(cont), s + chunk)
            logp = torch.log_softmax(head(hidden[r, s - 1: e - 1, :]), dim=-1)  # type: ignore[index]
            tgt = target[s:e]
            total += float(logp.gather(-1, tgt[:, None]).sum())
            greedy = greedy and bool((logp.argmax(-1) == tgt).all())
        results.append((total, greedy))
    return results
