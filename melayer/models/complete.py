"""A checkpoint must hold every weight of the model it describes: never a model with some weights left at their
random initial values.

transformers fills any weight a checkpoint lacks with a fresh random one and only logs a report; a model built
that way would be analysed as if it were the real one. melayer checks instead: a GGUF's state dict against the
model its own metadata describes (before the model is built, so a small file cannot make it allocate a large
one), an HF directory through ``from_pretrained``'s loading info. Either gap is one error naming what is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from melayer.util.errors import MelayerError

SHOWN = 4  # names listed in one error line; the rest are counted


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def expected_weights(skeleton: nn.Module) -> dict[str, tuple[int, ...]]:
    """The weights a checkpoint must supply for ``skeleton`` (built on the meta device), with their shapes: its
    state dict less the weights tied to another one (``all_tied_weights_keys``) and those the model class says
    may be absent (``_keys_to_ignore_on_load_missing``)."""
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    optional = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_missing", None) or ()]
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()
            if k not in tied and not any(p.search(k) for p in optional)}


def incomplete(source: Any, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
               mismatched: Iterable[str] = ()) -> MelayerError | None:
    """The one-line error for a checkpoint that does not match its model (None if it does)."""
    parts = []
    if missing := list(missing):
        parts.append(f"lacks {len(missing)} of the model's weights ({_listed(missing)})")
    if mismatched := list(mismatched):
        parts.append(f"has {len(mismatched)} weights of the wrong shape ({_listed(mismatched)})")
    if unexpected := list(unexpected):
        parts.append(f"has {len(unexpected)} weights the model does not use ({_listed(unexpected)})")
    if not parts:
        return None
    return MelayerError(f"{source} {'; '.join(parts)}: an incomplete or mismatched checkpoint (melayer never fills "
                        "missing weights with random values)")


def check_state_dict(source: Any, expected: Mapping[str, tuple[int, ...]], got: Mapping[str, Any]) -> None:
    """Raise if ``got`` (name -> tensor) misses a weight of ``expected`` (name -> shape) or gives one another shape."""
    error = incomplete(source, missing=[k for k in expected if k not in got],
                       mismatched=[f"{k} {tuple(got[k].shape)} instead of {expected[k]}"
                                   for k in expected if k in got and tuple(got[k].shape) != expected[k]])
    if error is not None:
        raise error
