"""Encoding: the one place that turns texts or token rows into a left-padded batch.

Left padding puts every row's last real token in the last column; the pad id falls back to the first EOS id
when the tokenizer has no pad token; position ids start at 0 on each row's first real token. Every stage
(scan, explain, rigidity, sinks, WeMask generation, eval) encodes through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from melayer.models.loading import LM
from melayer.util.errors import MelayerError


def eos_ids(lm: LM) -> list[int]:
    """Every end-of-sequence id (tokenizer first, then the generation config), without repeats."""
    ids: list[int] = []
    for source in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def pad_id(lm: LM) -> int:
    """The tokenizer's pad id, else the first EOS id."""
    tok = lm.tokenizer
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    ids = eos_ids(lm)
    if not ids:
        raise MelayerError(f"{lm.name}: the tokenizer has neither a pad nor an eos token")
    return ids[0]


def left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Token rows -> ``input_ids`` / ``attention_mask``, padded on the left with ``pad``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def check_length(lm: LM, n_tokens: int, what: str = "the input") -> None:
    """Inputs longer than the model's positions: an error for learned position embeddings (they have no row
    for position >= the limit; PyTorch would fail with an IndexError deep inside), a warning for rotary/ALiBi
    models (they run, but past what they were trained on)."""
    limit = lm.max_positions
    if limit is None or n_tokens <= limit:
        return
    if lm.learned_positions:
        raise MelayerError(f"{what} needs {n_tokens} positions but {lm.name} has {limit} (learned position "
                           "embeddings); shorten it")
    from melayer.util.console import warn

    warn(f"{what} runs to {n_tokens} positions, past {lm.name}'s {limit} (max_position_embeddings): results "
         "beyond that extrapolate")


def tokenize(lm: LM, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode(lm: LM, texts: str | Sequence[str], add_special_tokens: bool = True,
           max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenise texts into a left-padded batch on the model's device.

    Left padding puts every row's last real token at the last position.

    Args:
        lm: the loaded model (its tokenizer and device).
        texts: one text or several.
        add_special_tokens: add the tokenizer's special tokens (BOS); False for text a chat template rendered.
        max_tokens: keep at most this many tokens of each text (its first ones).

    Returns:
        ``{"input_ids", "attention_mask"}``, each shaped (texts, longest length).

    Raises:
        MelayerError: a text is longer than the model's positions.
    """
    if isinstance(texts, str):
        texts = [texts]
    rows = [tokenize(lm, t, add_special_tokens) for t in texts]
    if max_tokens:
        rows = [r[:max_tokens] for r in rows]
    check_length(lm, max(map(len, rows), default=0), "a prompt" if len(rows) == 1 else "the longest prompt")
    return left_pad(rows, pad_id(lm), lm.device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding aware)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def first_real(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the column of the first real (non-pad) token of a 2-D attention mask."""
    return (mask != 0).to(torch.int8).argmax(dim=1).to(torch.long)


def batches(items: Sequence[str], batch_size: int) -> list[tuple[int, list[str]]]:
    """(start index, chunk) for consecutive chunks of at most ``batch_size`` items."""
    return [(i, list(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
