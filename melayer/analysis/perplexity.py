"""Perplexity: the one rolling-window implementation, used by explain's ablations (on the shipped WikiText-2
excerpt) and by eval's ``ppl`` task (on WikiText-2 test).

Semantics (:func:`rolling_windows`), for a text tokenised once without special tokens:

- ``window`` is the number of tokens the model sees per forward, *including* the tokenizer's special prefix
  (e.g. ``<bos>``), which starts every window, as it starts every text the model was trained on;
- windows start at text tokens 0, ``stride``, 2 ``stride``, ...; each scores only the tokens no earlier window
  scored (the first window: all its tokens, each given the prefix and the tokens before it; a tokenizer without
  a prefix cannot score the text's first token); the last window may be shorter;
- ppl = exp(total NLL / scored tokens); every token after the first unscorable one is scored exactly once.

``stride = window - len(prefix)`` (``window - 1`` without a prefix) is the non-overlapping case: each window is
prefix + fresh tokens, or carries one token of context when there is no prefix. Without a prefix that is
lm-eval's ``loglikelihood_rolling`` (``max_length = window - 1``) on the text with lm-eval's prefix token put
in front (tested); lm-eval's last window differs only when it is partial (lm-eval slides it back to full
length, here it keeps the stride grid, like HF's strided-perplexity recipe).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from melayer.capture import Hooks, left_pad, pad_id, position_ids
from melayer.capture.sites import LOGIT_BUDGET, final_hidden, output_head
from melayer.models.loading import LM
from melayer.util.errors import MelayerError

PPL_STRIDE = 256  # explain: new tokens per window (each window = prefix + 256 fresh tokens)


def ppl_text() -> str:
    from importlib.resources import files

    return files("melayer.data").joinpath("ppl_text.txt").read_text()


def special_prefix(tok) -> list[int]:
    """Token ids the tokenizer puts in front of every text (e.g. <bos>), [] if none."""
    with_sp = tok("a b", add_special_tokens=True)["input_ids"]
    without = tok("a b", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    return list(with_sp[:n]) if n > 0 and with_sp[n:] == without else []


@dataclass(frozen=True)
class Window:
    """Text tokens ``[begin, end)`` (after the prefix) in one forward; the last ``scored`` of them are scored."""

    begin: int
    end: int
    scored: int


def rolling_windows(n_tokens: int, *, window: int, stride: int, prefix_len: int) -> list[Window]:
    """The windows over ``n_tokens`` text tokens (see the module docstring)."""
    content = window - prefix_len
    if content < 1 or not 1 <= stride <= content or stride >= window:
        raise MelayerError(f"perplexity needs 1 <= stride <= window - prefix ({prefix_len}) and stride < window "
                           f"(got window {window}, stride {stride})")
    windows: list[Window] = []
    begin = prev_end = k = 0
    while prev_end < n_tokens:
        end = min(begin + content, n_tokens)
        scored = end - prev_end if k else end - (0 if prefix_len else 1)
        if scored > 0:
            windows.append(Window(begin, end, scored))
        prev_end, begin, k = end, begin + stride, k + 1
    return windows


def window_rows(ids: Sequence[int], windows: Sequence[Window], prefix: Sequence[int]) -> list[tuple[list[int], int]]:
    """``(tokens, scored)`` rows for :func:`tail_logliks`."""
    return [([*prefix, *ids[w.begin:w.end]], w.scored) for w in windows]


@torch.no_grad()
def tail_logliks(lm: LM, rows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
    """For each ``(tokens, k)``: sum of log p(token) over the last ``k`` tokens given everything before them, and
    whether every one of those tokens is the greedy (argmax) prediction.

    One padded forward for all rows. Logits are only computed where they are needed (the tails), in chunks,
    from the final hidden states; the last position is cross-checked against the model's own logits so any
    model-specific output processing would be caught.
    """
    for tokens, k in rows:
        if k < 1 or k >= len(tokens):
            raise ValueError(f"tail of {k} tokens in a row of {len(tokens)}: need 1 <= k < len(row)")
    batch = left_pad([r for r, _ in rows], pad_id(lm), lm.device)
    width = batch["input_ids"].shape[1]
    captured: dict[str, torch.Tensor] = {}
    with Hooks() as hooks:
        final_hidden(hooks, lm, captured)
        out = lm.model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False,
                       logits_to_keep=1)
    hidden = captured["h"]
    head = output_head(lm)
    check = head(hidden[:, -1:, :])
    ref = out.logits[:, -1:, :].float()
    if not torch.allclose(check, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max().clamp(min=1.0))):
        raise MelayerError(f"{lm.name}: cannot reproduce the model's logits from its final hidden states "
                           "(unsupported output processing)")
    vocab = ref.shape[-1]
    chunk = max(1, LOGIT_BUDGET // vocab)
    ids = batch["input_ids"]
    results = []
    for i, (_tokens, k) in enumerate(rows):
        total, greedy = 0.0, True
        start = width - k  # first target position
        for s in range(start, width, chunk):
            e = min(width, s + chunk)
            logp = torch.log_softmax(head(hidden[i, s - 1: e - 1, :]), dim=-1)
            target = ids[i, s:e]
            total += float(logp.gather(-1, target[:, None]).sum())
            greedy = greedy and bool((logp.argmax(-1) == target).all())
        results.append((total, greedy))
    return results


def perplexity(lm: LM, text: str | None = None, *, max_tokens: int | None = None, stride: int = PPL_STRIDE,
               window: int | None = None) -> dict[str, Any]:
    """Perplexity of ``text`` (default: the shipped WikiText-2 excerpt; its first ``max_tokens`` tokens) with
    :func:`rolling_windows`. ``window`` defaults to ``stride`` + the prefix (one token of carried context when
    there is none), i.e. non-overlapping windows; both shrink to fit the model's positions."""
    text = ppl_text() if text is None else text
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    prefix = special_prefix(lm.tokenizer)
    extra = max(1, len(prefix))
    window = stride + extra if window is None else window
    max_pos = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    if max_pos and window > int(max_pos):
        window = int(max_pos)
        stride = min(stride, window - extra)
    windows = rolling_windows(len(ids), window=window, stride=stride, prefix_len=len(prefix))
    if not windows:
        raise MelayerError("perplexity text is too short")
    nll = -sum(tail_logliks(lm, [row])[0][0] for row in window_rows(ids, windows, prefix))
    count = sum(w.scored for w in windows)
    return {"ppl": math.exp(nll / count), "tokens": count, "window": window, "stride": stride, "prefix": prefix}
