"""Which token is which inside a forward pass: the decoder-stack call, the first real token per row, and the
tracked (massive) token per prompt.

Both the analyses (:class:`TokenTracker`) and WeMask (:func:`body_call`) read the same pre-hook arguments of the
decoder stack through here, so left padding, KV-cache offsets and the first real token are derived once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from melayer.capture.encoding import first_real
from melayer.capture.hooks import Hooks
from melayer.models.hf_internals import cache_length
from melayer.models.loading import LM
from melayer.util.errors import MelayerError


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states argument of a module call (first positional, else ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


@dataclass
class BodyCall:
    """One call of the decoder stack, as its forward pre-hook sees it."""

    batch: int
    length: int  # columns in this chunk
    past: int  # absolute position of the chunk's first column (> 0 in cached decode steps)
    mask2d: torch.Tensor | None  # the 2-D attention mask (covers past + chunk), None if not given
    device: torch.device

    def first_real(self) -> torch.Tensor:
        """Per row, the absolute column of the first real token (0 without a mask)."""
        if self.mask2d is not None:
            return first_real(self.mask2d)
        return torch.zeros(self.batch, dtype=torch.long, device=self.device)

    def real(self) -> torch.Tensor:
        """(B, length) bool: the chunk's real (non-pad) tokens."""
        if self.mask2d is not None and self.mask2d.shape[1] >= self.length:
            return self.mask2d[:, self.mask2d.shape[1] - self.length:] != 0
        return torch.ones(self.batch, self.length, dtype=torch.bool, device=self.device)


def body_call(args: tuple, kwargs: dict) -> BodyCall | None:
    """Parse the decoder stack's pre-hook arguments (None when it got neither ids nor embeddings)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    if x is None:
        return None
    length = int(x.shape[1])
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return BodyCall(batch=int(x.shape[0]), length=length, past=past_length(kwargs, mask2d, length), mask2d=mask2d,
                    device=x.device)


def past_length(kwargs: dict, mask2d: torch.Tensor | None, length: int) -> int:
    """Absolute position of the chunk's first token: cache_position, else the KV cache length, else the mask."""
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.flatten()[0])
    cache = kwargs.get("past_key_values")
    if cache is not None and (n := cache_length(cache)) is not None:
        return n
    if mask2d is not None:
        return max(int(mask2d.shape[1]) - length, 0)
    return 0


class TokenTracker:
    """A pre-hook on the decoder stack that maps each batch row to its prompt and to the column of that
    prompt's tracked token (``positions``: index among the prompt's real tokens). Prompts must be fed in order
    (any batching); left padding is handled from the 2-D attention mask the stack receives."""

    def __init__(self, positions: Sequence[int]) -> None:
        self.positions = list(positions)
        self.next = 0
        self.prompt_idx: list[int] = []
        self.cols: torch.Tensor | None = None
        self.real: torch.Tensor | None = None  # (B, T) bool
        self.first: torch.Tensor | None = None  # (B,) first real column

    def install(self, hooks: Hooks, lm: LM) -> TokenTracker:
        hooks.pre(lm.body, self._hook, with_kwargs=True)
        return self

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        call = body_call(args, kwargs)
        assert call is not None
        b, t = call.batch, call.length
        real = call.mask2d.bool() if call.mask2d is not None else torch.ones(b, t, dtype=torch.bool, device=call.device)
        self.first = first_real(real)
        self.prompt_idx = list(range(self.next, self.next + b))
        if self.prompt_idx[-1] >= len(self.positions):
            raise MelayerError("internal: more rows than tracked prompts")
        pos = torch.tensor([self.positions[i] for i in self.prompt_idx], device=call.device)
        self.cols = (self.first + pos).clamp(max=t - 1)
        self.real = real
        self.next += b

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The tracked token's row of a (B, T, ...) tensor -> (B, ...), float32 on CPU."""
        assert self.cols is not None
        return x[torch.arange(x.shape[0], device=x.device), self.cols.to(x.device)].detach().float().cpu()
