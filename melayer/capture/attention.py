"""Edit attention probabilities through transformers' attention interface, without patching any forward.

:func:`edit_attention` registers (once per base implementation) an attention implementation named
``melayer_edit_<base>`` with transformers' ``AttentionInterface`` and its mask function with
``AttentionMaskInterface`` (the base's own, so every layer receives exactly the mask it would), switches the
model to it inside the ``with`` block and back on exit. Layers without an edit are handed to the base
implementation unchanged; a layer with an edit computes ``softmax(scale * QK^T + mask)`` in float32 (soft-capping
and grouped KV heads as transformers' eager code), calls ``edit(probs, allowed)`` with probs ``(B, H, Q, K)`` and
``allowed`` ``(B, Q, K)`` (True where the query may attend to the key), and multiplies the edited probabilities
with V. The edit is a function of that call's own tensors (no state kept between calls).

:func:`probabilities` is what an analysis that reads attention probabilities uses: ``eager`` normally, and
``melayer_edit_eager`` while an edit is active, so the measured probabilities are the edited ones.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from melayer.models.hf_internals import attention_implementation, attn_implementation
from melayer.models.loading import LM
from melayer.util.errors import MelayerError

PREFIX = "melayer_edit_"
Edit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_EDITS: weakref.WeakKeyDictionary[nn.Module, Edit] = weakref.WeakKeyDictionary()


def allowed_keys(mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(B, Q, K) bool from an attention call's mask (bool: True = attend; float: additive); causal without one."""
    if mask is None:
        q = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= q).expand(batch, -1, -1)
    m = mask[..., -q_len:, -k_len:]
    ok = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return ok.any(dim=1) if ok.shape[1] > 1 else ok[:, 0].expand(batch, -1, -1)


def first_key(allowed: torch.Tensor) -> torch.Tensor:
    """(B,) the first key column the row's last query (always a real token under left padding) may attend to: the
    first real token (with a sliding window shorter than the sequence: the window's first key)."""
    return allowed[:, -1].to(torch.int8).argmax(dim=-1)


def _probabilities(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                   scaling: float | None, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(2, 3)).float() * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    b, _, q_len, k_len = scores.shape
    allowed = allowed_keys(attention_mask, b, q_len, k_len, scores.device)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        scores = scores + attention_mask[..., -q_len:, -k_len:].float()
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1), allowed


def _attention(base: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    edit = _EDITS.get(module)
    if edit is None and base != "eager":
        fn = ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise MelayerError("attention edits do not support learned attention-sink logits (s_aux)")
    probs, allowed = _probabilities(module, query, key, attention_mask, scaling, kwargs.get("softcap"))
    if edit is not None:
        probs = edit(probs, allowed)
    n_rep = query.shape[1] // value.shape[1]
    v = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
    out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, probs.to(query.dtype)


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
            raise MelayerError(f"attention edits cannot wrap the {base!r} attention implementation")
        if base not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise MelayerError(f"attention edits need a mask function for {base!r} attention")
        AttentionInterface.register(name, functools.partial(_attention, base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


@contextlib.contextmanager
def edit_attention(lm: LM, edits: dict[int, Edit]) -> Iterator[None]:
    """Inside the block, layer ``l``'s attention probabilities pass through ``edits[l]``; the model, its
    attention implementation and its outputs outside the block are as before."""
    base = attn_implementation(lm.model) or "eager"
    if base.startswith(PREFIX):
        raise MelayerError("an attention edit is already active on this model (one at a time)")
    modules = {}
    for layer in edits:
        module = lm.module(layer, "attn")
        if module is None:
            raise MelayerError(f"layer {layer} of {lm.name} has no attention module")
        modules[layer] = module
    name = _register(base)
    try:
        for layer, fn in edits.items():
            _EDITS[modules[layer]] = fn
        with attention_implementation(lm.model, name, lm.name):
            yield
    finally:
        for module in modules.values():
            _EDITS.pop(module, None)


def probabilities(lm: LM) -> contextlib.AbstractContextManager[None]:
    """Run ``lm`` with an implementation that returns attention probabilities (eager; the edited eager one while
    an attention edit is active) inside the block."""
    current = attn_implementation(lm.model) or "eager"
    impl = PREFIX + "eager" if current.startswith(PREFIX) else "eager"
    if impl != "eager":
        _register("eager")
    return attention_implementation(lm.model, impl, f"{lm.name} (to read attention probabilities)")
