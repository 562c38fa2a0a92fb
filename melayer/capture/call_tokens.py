"""Which tokens of one attention call are sequence starts, read from that call's own arguments.

A hook that keeps "what this forward pass looks like" as state between hooks breaks under gradient
checkpointing: the layers are recomputed during backward, after any per-forward state is gone (or, worse,
replaced by a later forward's). Everything here is a pure function of the arguments an attention module (or
decoder layer) receives, so a recomputation sees exactly what the first pass saw.

* With a 4-D attention mask (eager / sdpa with padding, sliding windows, packed sequences with a
  block-diagonal mask): a query that may attend to exactly one key -- itself -- is a sequence's first real
  token. Padding attends to nothing (or is not its own key), decode-step tokens see the prompt, and every
  packed sequence's first token sees only itself.
* Without a mask (sdpa's causal fast path: no padding): tokens whose ``position_ids`` are 0. That is position
  0 at prefill, nothing at cached decode steps (their positions are past the prompt), and every sequence start
  of a padding-free packed batch (flash-attention varlen, where positions restart at 0).
* A packed batch whose mask lets a later sequence see the one before it (positions restart at 0 but the
  start attends to earlier tokens) is refused: masking its starts would not match what the model computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from melayer.util.errors import MelayerError


@dataclass
class CallTokens:
    """Per call: ``starts`` (B, T) bool -- sequence starts; ``real`` (B, T) bool -- non-padding tokens;
    ``past`` -- absolute position of the chunk's first column (0 at prefill)."""

    starts: torch.Tensor
    real: torch.Tensor
    past: int


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """(B, H or 1, T, S) mask -> (B, T, S) bool, True where the query may attend to the key."""
    if mask.dtype == torch.bool:
        allowed = mask
    else:  # additive float mask: 0 where allowed, a large negative number where masked
        allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed.any(dim=1) if allowed.shape[1] > 1 else allowed[:, 0]


def call_tokens(hidden: torch.Tensor, kwargs: dict[str, Any]) -> CallTokens:
    """Sequence starts / real tokens of the chunk ``hidden`` (B, T, D) from a layer or attention call's kwargs."""
    batch, length = int(hidden.shape[0]), int(hidden.shape[1])
    mask = kwargs.get("attention_mask")
    pos = kwargs.get("position_ids")
    pos = pos if isinstance(pos, torch.Tensor) and pos.dim() == 2 else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        allowed = _allowed(mask)[:, -length:, :]
        keys = allowed.shape[-1]
        past = max(keys - length, 0)
        count = allowed.sum(dim=-1)  # (B, T)
        cols = torch.arange(length, device=allowed.device) + past
        diag = allowed.gather(-1, cols.clamp(max=keys - 1).view(1, length, 1).expand(batch, -1, -1))[..., 0]
        real = diag & (cols < keys).view(1, length)
        starts = real & (count == 1)
        if pos is not None and length > 1:
            p = pos.expand(batch, -1) if pos.shape[0] == 1 else pos
            restarts = (p == 0) & real & ~starts
            if bool(restarts.any()):
                raise MelayerError(
                    "WeMask: a packed batch (positions restart at 0) whose attention mask lets a sequence see the one "
                    "before it; WeMask masks every sequence start and needs a block-diagonal mask (padding-free "
                    "batches with flash attention, or an unpacked batch)")
        return CallTokens(starts=starts, real=real, past=past)
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise MelayerError(f"WeMask: attention masks of type {type(mask).__name__} are not supported (use the eager "
                           "or sdpa attention implementation)")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # an implementation that passes the 2-D mask through
        real = mask[:, -length:] != 0
        first = real.to(torch.int8).argmax(dim=1)
        past = max(int(mask.shape[1]) - length, 0)
        starts = torch.zeros(batch, length, dtype=torch.bool, device=hidden.device)
        if past == 0:
            starts[torch.arange(batch), first] = real[torch.arange(batch), first]
        return CallTokens(starts=starts, real=real, past=past)
    if pos is None:
        cache_position = kwargs.get("cache_position")
        if not isinstance(cache_position, torch.Tensor):
            raise MelayerError("WeMask: the attention call carries neither an attention mask nor position ids; "
                               "cannot tell where sequences start")
        pos = cache_position.view(1, -1)
    p = pos.expand(batch, -1) if pos.shape[0] == 1 else pos
    real = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
    return CallTokens(starts=(p == 0), real=real, past=int(p[:, 0].min()))
