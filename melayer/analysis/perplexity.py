"""Perplexity of the shipped WikiText-2 excerpt (used by explain's ablations to measure damage)."""

from __future__ import annotations

import math
from typing import Any

import torch

from melayer.models.loading import LM
from melayer.util.errors import MelayerError

PPL_WINDOW = 256


def ppl_text() -> str:
    from importlib.resources import files

    return files("melayer.data").joinpath("ppl_text.txt").read_text()


def special_prefix(tok) -> list[int]:
    """Token ids the tokenizer puts in front of every text (e.g. <bos>), [] if none."""
    with_sp = tok("a b", add_special_tokens=True)["input_ids"]
    without = tok("a b", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    return list(with_sp[:n]) if n > 0 and with_sp[n:] == without else []


@torch.no_grad()
def perplexity(lm: LM, text: str | None = None, *, max_tokens: int | None = None, window: int = PPL_WINDOW) -> dict[str, Any]:
    """Perplexity of ``text`` (default: the shipped WikiText-2 excerpt) in non-overlapping windows of
    ``window`` tokens, each preceded by the tokenizer's special prefix (e.g. <bos>), as the model sees text."""
    text = ppl_text() if text is None else text
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    prefix = special_prefix(tok)
    max_pos = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    if max_pos:
        window = max(8, min(window, int(max_pos) - len(prefix)))
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2 and not prefix:
            continue
        inp = torch.tensor([prefix + chunk], device=lm.device)
        labels = inp.clone()
        labels[0, : len(prefix)] = -100
        out = lm.model(input_ids=inp, labels=labels, use_cache=False)
        n = int((labels[0, 1:] != -100).sum())
        nll += float(out.loss) * n
        count += n
    if count == 0:
        raise MelayerError("perplexity text is too short")
    return {"ppl": math.exp(nll / count), "tokens": count, "window": window, "prefix": prefix}
