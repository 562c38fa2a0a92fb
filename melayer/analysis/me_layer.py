"""The ME layer and the massive token, located once for every user (explain, rigidity, sinks, WeMask, compare, CLI)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from melayer.analysis.criterion import Criterion
from melayer.analysis.scan import ScanResult, scan
from melayer.models.loading import LM
from melayer.util.errors import MelayerError


def find_me_layer(lm: LM, prompts: Sequence[str] | None = None, *, criterion: Criterion | None = None,
                  batch_size: int | None = None, progress: bool = False, hint: str | None = None) -> int | None:
    """The consensus ME layer of ``lm`` on ``prompts`` by one :func:`scan`.

    The result is cached on ``lm`` (:attr:`~melayer.models.loading.LM.me_layers`, keyed by the prompts and the
    criterion): a second call with the same ones returns it without scanning again (see :func:`cached_me_layer`;
    clear ``lm.me_layers`` after changing the weights).

    Args:
        lm: the loaded model.
        prompts: the prompts to scan; default the shipped prompt set.
        criterion: the massive-activation criterion; default :class:`~melayer.analysis.criterion.Criterion`'s.
        batch_size: prompts per forward; default the device's plan.
        progress: show a progress bar.
        hint: with it, a model without an ME layer is a :class:`MelayerError` ending in this text.

    Returns:
        The ME layer's index, or None when the model has none (and no ``hint`` was given).
    """
    key = _key(prompts, criterion)
    if key in lm.me_layers:
        found = lm.me_layers[key]
    else:
        found = scan(lm, prompts, criterion=criterion, batch_size=batch_size, progress=progress).me_layer
        lm.me_layers[key] = None if found is None else int(found)
    if found is None and hint is not None:
        raise MelayerError(f"no ME layer found in {lm.name}{hint}")
    return None if found is None else int(found)


def _key(prompts: Sequence[str] | None, criterion: Criterion | None) -> tuple[tuple[str, ...] | None, Criterion]:
    return (None if prompts is None else tuple(prompts)), criterion or Criterion()


def cached_me_layer(lm: LM, prompts: Sequence[str] | None = None, criterion: Criterion | None = None) -> bool:
    """Whether :func:`find_me_layer` has already scanned ``lm`` with these prompts and criterion."""
    return _key(prompts, criterion) in lm.me_layers


def massive_dims_at(result: ScanResult, layer: int, min_support: float = 0.5) -> tuple[list[int], dict[int, float]]:
    """Dims that are massive *and persistent* at ``layer`` in at least ``min_support`` of the prompts
    (falls back to the best-supported dim), and every such dim's support."""
    counts: Counter[int] = Counter()
    for p in result.prompts:
        if layer < len(p.massive):
            counts.update({d for _, pos, d in p.massive[layer] if (pos, d) in p.persistent})
    n = max(1, len(result.prompts))
    support = {d: c / n for d, c in sorted(counts.items())}
    dims = sorted(d for d, s in support.items() if s >= min_support)
    if not dims and counts:
        dims = [min(counts, key=lambda d: (-counts[d], d))]  # best supported; ties to the lowest dim
    return dims, support


def massive_positions(result: ScanResult, layer: int, dims: Sequence[int] | None = None) -> list[int]:
    """Per prompt, the position (index among its real tokens) of its massive token at ``layer``: the
    persistent massive entry with the largest |a| (on ``dims`` if given), else the most common massive
    position over all prompts (if the prompt is long enough), else 0."""
    common: Counter[int] = Counter()
    best: list[int | None] = []
    for p in result.prompts:
        entries = [(abs(v), pos) for v, pos, d in (p.massive[layer] if layer < len(p.massive) else [])
                   if (pos, d) in p.persistent and (dims is None or d in dims)]
        pos = max(entries)[1] if entries else None
        best.append(pos)
        if pos is not None:
            common[pos] += 1
    fallback = min(common, key=lambda q: (-common[q], q)) if common else 0  # ties to the earliest position
    return [b if b is not None else (fallback if fallback < p.n_tokens else 0) for b, p in zip(best, result.prompts)]
