"""The overflow guard every :class:`~melayer.models.loading.LM` carries: no command returns a result computed
from inf/nan.

float16 cannot hold massive activations (Gemma-3's reach ~1e5; float16 stops at 65504): the residual stream
overflows to inf, attention turns it into nan, and a scan, a log-likelihood, a perplexity or generated text
built on it is garbage (an empty string, a crash deep inside a library). A forward hook on every decoder
layer and on the LM head checks its output and raises :class:`~melayer.util.errors.NumericOverflow` at the
first layer that overflows, in every forward pass (analyses, evaluation, generation, with or without WeMask).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from melayer.util.errors import NumericOverflow

_MARK = "_melayer_overflow_guard"


def _tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "logits", None)


def overflow_message(where: str, dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if dtype in (torch.float16, torch.bfloat16):
        return (f"{where} produced inf/nan in {name}: massive activations exceed this dtype's range; rerun with "
                "--dtype float32" + (" (or bfloat16)" if dtype == torch.float16 else ""))
    return f"{where} produced inf/nan in {name}: the weights or inputs are broken (no result was computed from them)"


def install_overflow_guard(model: nn.Module, layers: nn.ModuleList) -> None:
    """Hook ``layers`` and the model's LM head once (idempotent); the hooks stay for the model's lifetime."""
    if getattr(model, _MARK, False):
        return

    def check(where: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            t = _tensor(output)
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NumericOverflow(overflow_message(where, t.dtype))

        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_hook(check(f"layer {i}"))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_hook(check("the LM head"))
    setattr(model, _MARK, True)
