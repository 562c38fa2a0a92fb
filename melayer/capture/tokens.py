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
from melayer.models.hf_internals import cache_length, call_cache
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
    cache = call_cache(kwargs)
    if cache is not None and (n := cache_length(cache)) is not None:
        return n
    if mask2d is not None:
        return max(int(mask2d.shape[1]) - length, 0)
    return 0


class TokenTracker:
    """A pre-hook on the decoder stack that maps each batch row to its prompt and to the column of that
    prompt's tracked token (``positions``: index among the prompt's real tokens). Prompts are fed in order (any
    batching), or in any order when :meth:`expect` names each batch's prompts first; left padding is handled
    from the 2-D attention mask the stack receives."""

    def __init__(self, positions: Sequence[int]) -> None:
        self.positions = list(positions)
        self.next = 0
        self.prompt_idx: list[int] = []
        self.cols: torch.Tensor | None = None
        self.real: torch.Tensor | None = None  # (B, T) bool
        self.first: torch.Tensor | None = None  # (B,) first real column
        self._expected: list[int] | None = None

    def expect(self, indices: Sequence[int]) -> None:
        """The prompts (input indices) of the next forward's rows, e.g. from :func:`melayer.capture.batching.planned`."""
        self._expected = list(indices)

    def install(self, hooks: Hooks, lm: LM) -> TokenTracker:
        hooks.pre(lm.body, self._hook, with_kwargs=True)
        return self

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        call = body_call(args, kwargs)
        assert call is not None
        b, t = call.batch, call.length
        real = call.mask2d.bool() if call.mask2d is not None else torch.ones(b, t, dtype=torch.bool, device=call.device)
        self.first = first_real(real)
        if self._expected is not None:
            self.prompt_idx, self._expected = self._expected, None
            if len(self.prompt_idx) != b:
                raise MelayerError("internal: the expected prompts do not match the batch")
        else:
            self.prompt_idx = list(range(self.next, self.next + b))
        if max(self.prompt_idx) >= len(self.positions):
            raise MelayerError("internal: more rows than tracked prompts")
        pos = torch.tensor([self.positions[i] for i in self.prompt_idx], device=call.device)
        self.cols = (self.first + pos).clamp(max=t - 1)
        self.real = real
        self.next += b

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tracked column of each row, (B, T) real-token mask) of the forward that last reached the stack."""
        if self.cols is None or self.real is None:
            raise MelayerError("internal: no forward has reached the decoder stack yet")
        return self.cols, self.real

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The tracked token's row of a (B, T, ...) tensor -> (B, ...), float32 on CPU."""
        assert self.cols is not None
        return x[torch.arange(x.shape[0], device=x.device), self.cols.to(x.device)].detach().float().cpu()


# ----------------------------------------------------------------------------------------------------
# one attention call: which of its tokens are sequence starts (used by WeMask)
#
# Which tokens of one attention call are sequence starts, read from that call's own arguments.
#
# A hook that keeps "what this forward pass looks like" as state between hooks breaks under gradient
# checkpointing: the layers are recomputed during backward, after any per-forward state is gone (or, worse,
# replaced by a later forward's). Everything here is a pure function of the arguments an attention module (or
# decoder layer) receives, so a recomputation sees exactly what the first pass saw.
#
# * With a 4-D attention mask (eager / sdpa with padding, sliding windows, packed sequences with a
#   block-diagonal mask): a query that may attend to exactly one key -- itself -- is a sequence's first real
#   token. Padding attends to nothing (or is not its own key), decode-step tokens see the prompt, and every
#   packed sequence's first token sees only itself.
# * Without a mask (sdpa's causal fast path: no padding): tokens whose ``position_ids`` are 0. That is position
#   0 at prefill, nothing at cached decode steps (their positions are past the prompt), and every sequence start
#   of a padding-free packed batch (flash-attention varlen, where positions restart at 0).
# * A packed batch whose mask lets a later sequence see the one before it (positions restart at 0 but the
#   start attends to earlier tokens) is refused: masking its starts would not match what the model computes.


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
