"""Every private or version-sensitive transformers/PyTorch attribute melayer relies on, in one place.

If a transformers (or torch) release renames one of these, ``tests/test_hf_internals.py`` fails loudly and this
is the only module to change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def attn_implementation(model: PreTrainedModel) -> str | None:
    """The attention implementation the model runs with (``config._attn_implementation``)."""
    return getattr(model.config, "_attn_implementation", None)


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, impl: str, name: str = "model") -> Iterator[None]:
    """Run ``model`` with attention implementation ``impl`` inside the block; the previous one is restored."""
    prev = attn_implementation(model)
    if prev == impl:
        yield
        return
    try:
        model.set_attn_implementation(impl)
    except Exception as exc:  # transformers raises ValueError / ImportError for unsupported models
        raise MelayerError(f"cannot switch {name} to {impl} attention: {exc}") from None
    try:
        yield
    finally:
        try:
            model.set_attn_implementation(prev)  # type: ignore[arg-type]  # None: transformers' default again
        except Exception:
            model.config._attn_implementation = prev


def hook_count(model: nn.Module) -> int:
    """Forward and forward-pre hooks installed on every submodule (PyTorch's ``_forward_hooks`` dicts)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF-loaded model is already dequantised; remove the quantizer marker so it can be saved."""
    model.hf_quantizer = None  # type: ignore[assignment]  # set by transformers on a quantised load, undeclared
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def reindex_cache(cache: Any, index: Any, name: str = "model") -> None:
    """Select rows of a KV cache in place (``Cache.batch_select_indices``), e.g. to reuse a context."""
    if not hasattr(cache, "batch_select_indices"):
        raise MelayerError(f"{name}: its KV cache cannot be re-indexed for context reuse")
    cache.batch_select_indices(index)


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x; ``past_key_values`` still accepted
    there with a deprecation warning until 5.40) or ``past_key_values`` (older versions)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def call_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a module call received, under either keyword (None if none)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def output_cache(output: Any) -> Any:
    """The KV cache a model returned (``.cache`` in newer transformers, ``.past_key_values`` before)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return getattr(output, "past_key_values", None) if cache is None else cache


def cache_length(cache: Any) -> int | None:
    """Tokens already in a KV cache (``Cache.get_seq_length`` or a legacy tuple cache), None if unknown."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return None


def gguf_tensor_processor(gguf_arch: str, config: dict[str, Any]) -> Any:
    """transformers' per-architecture GGUF tensor processor (``modeling_gguf_pytorch_utils.TENSOR_PROCESSORS``):
    ``.process(weights=array, name=gguf_name).weights`` turns one GGUF tensor into the layout transformers loads
    (e.g. Gemma's norm weights - 1, GPT-2's Conv1D transposes)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=config)
