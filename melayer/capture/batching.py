"""Length-sorted, token-budgeted batches: which prompts go through the model together.

Padding costs twice: the padded positions are computed like real ones, and a padded batch needs an explicit
attention mask, which takes the slower masked attention kernel where an unpadded batch takes the causal one.
On a CPU the matrix products are already efficient at a few dozen tokens, so batching buys little beyond the
per-call overhead: short prompts go in small batches of (almost) equal length, long prompts alone. On a GPU
a forward of one short prompt leaves the device idle: prompts go in large batches, sorted by length so that
padding stays small, up to a token budget.

:func:`plan_batches` only groups indices; callers run the batches in any order and put the results back in
input order (:func:`in_input_order`), so nothing a caller returns depends on the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from melayer.capture.encoding import check_length, left_pad, pad_id
from melayer.models.loading import LM

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """How :func:`plan_batches` groups prompts.

    ``max_batch``: prompts per batch. ``max_tokens``: padded tokens per batch (rows x longest row).
    ``pad_frac``: the most of a batch's positions that may be padding. ``short``: rows longer than this
    are never padded (they go alone or with rows of exactly their length).
    """

    max_batch: int
    max_tokens: int
    pad_frac: float
    short: int


CPU = BatchPolicy(max_batch=16, max_tokens=512, pad_frac=0.10, short=64)
GPU = BatchPolicy(max_batch=64, max_tokens=32768, pad_frac=0.25, short=1 << 30)
# Generation: every decoding step reads all the weights once whatever the batch, so rows are worth sharing a
# step on any device; sorting by length keeps the padding (prefill work, and finished rows waiting) small.
GENERATE = BatchPolicy(max_batch=8, max_tokens=1 << 30, pad_frac=1.0, short=1 << 30)


def policy_for(device: torch.device | str | None) -> BatchPolicy:
    kind = torch.device(device).type if device is not None else "cpu"
    return CPU if kind == "cpu" else GPU


def plan_batches(
    lengths: Sequence[int],
    *,
    device: torch.device | str | None = None,
    policy: BatchPolicy | None = None,
    max_batch: int | None = None,
    max_tokens: int | None = None,
    cost: Callable[[int, int], float] | None = None,
    max_cost: float | None = None,
) -> list[list[int]]:
    """Group prompt indices into batches, longest first.

    ``lengths``: tokens per prompt. ``policy`` defaults to the device's (:func:`policy_for`). ``max_batch`` caps the prompts per batch (e.g. a user's ``--batch-size``);
    ``max_tokens`` the padded tokens. ``cost(rows, width)`` with ``max_cost`` adds a caller's own budget (e.g.
    attention probabilities, rows x heads x width x width). Every index appears exactly once; a prompt that
    alone exceeds a budget still gets a batch of its own.
    """
    pol = policy or policy_for(device)
    cap = pol.max_batch if max_batch is None else max_batch
    budget = max_tokens or pol.max_tokens
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        if cur:
            width = lengths[cur[0]]  # longest in the batch (sorted descending)
            rows = len(cur) + 1
            padded = rows * width
            fits = (
                rows <= cap
                and padded <= max(budget, width)
                and (width == n or (width <= pol.short and (padded - real - n) <= pol.pad_frac * padded))
                and (cost is None or max_cost is None or cost(rows, width) <= max_cost)
            )
            if not fits:
                batches.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        batches.append(cur)
    return batches


def in_input_order(pairs: Sequence[tuple[int, T]]) -> list[T]:
    """Results keyed by input index, back in input order."""
    return [v for _, v in sorted(pairs, key=lambda p: p[0])]


def planned(
    lm: LM,
    rows: Sequence[Sequence[int]],
    *,
    policy: BatchPolicy | None = None,
    max_batch: int | None = None,
    cost: Callable[[int, int], float] | None = None,
    max_cost: float | None = None,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """The one batching loop: token ``rows`` as (input indices, left-padded batch on the model's device), in the
    order :func:`plan_batches` picks for ``lm``'s device. Callers key what they keep by the indices."""
    pad = pad_id(lm)
    check_length(lm, max(map(len, rows), default=0), "a prompt" if len(rows) == 1 else "the longest prompt")
    for idx in plan_batches([len(r) for r in rows], device=lm.device, policy=policy, max_batch=max_batch,
                            cost=cost, max_cost=max_cost):
        yield idx, left_pad([rows[i] for i in idx], pad, lm.device)
