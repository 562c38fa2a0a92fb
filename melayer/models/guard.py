"""The overflow guard: no result computed from inf/nan.

float16 cannot hold massive activations (Gemma-3's reach ~1e5; float16 stops at 65504): the residual stream
overflows to inf, attention turns it into nan, and a scan, a log-likelihood, a perplexity or generated text
built on it is garbage (an empty string, a crash deep inside a library). The guard checks the final output of
each forward pass (the decoder stack's output and the LM head's logits) and raises
:class:`~melayer.util.errors.NumericOverflow` naming the first layer that overflowed.

It is cheap: each decoder layer records whether its output is finite as a device-side flag (no host sync); the
flags are read once per forward, at the end, and searched for the first bad layer only after a failure. A
forward stopped early (a capture that needs only the first layers) is checked by :func:`check_overflow`.

:func:`melayer.load` installs it on the models it loads; :func:`melayer.from_model` only when asked
(``overflow_guard=True``); :meth:`OverflowGuard.remove` takes it off again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from melayer.util.errors import NumericOverflow

_ATTR = "_melayer_overflow_guard"


def _tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for name in ("last_hidden_state", "logits"):
        if isinstance(getattr(output, name, None), torch.Tensor):
            return getattr(output, name)
    return None


def overflow_message(where: str, dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if dtype in (torch.float16, torch.bfloat16):
        return (f"{where} produced inf/nan in {name}: massive activations exceed this dtype's range; rerun with "
                "--dtype float32" + (" (or bfloat16)" if dtype == torch.float16 else ""))
    return f"{where} produced inf/nan in {name}: the weights or inputs are broken (no result was computed from them)"


class OverflowGuard:
    """Hooks on a model's decoder layers, its decoder stack and its LM head; :meth:`remove` takes them off."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, body: nn.Module | None = None) -> None:
        self.model = model
        self._flags: list[tuple[int, torch.Tensor, torch.dtype]] = []
        self._handles: list[Any] = []
        if body is not None:
            self._handles.append(body.register_forward_pre_hook(lambda *_: self._flags.clear()))
            self._handles.append(body.register_forward_hook(lambda _m, _a, out: self.check(_tensor(out))))
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(self._recorder(i)))
        getter: Any = getattr(model, "get_output_embeddings", None)  # a transformers model's LM head
        head = getter() if callable(getter) else None
        if isinstance(head, nn.Module):
            self._handles.append(head.register_forward_hook(self._head_check))
        setattr(model, _ATTR, self)

    def _recorder(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            t = _tensor(output)
            if t is not None and t.is_floating_point():
                self._flags.append((index, torch.isfinite(t).all(), t.dtype))  # stays on the device: no sync

        return hook

    def _head_check(self, _module: nn.Module, _args: Any, output: Any) -> None:
        t = _tensor(output)
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            self.check(None)  # a layer before it, if one overflowed
            raise NumericOverflow(overflow_message("the LM head", t.dtype))

    def check(self, final: torch.Tensor | None = None) -> None:
        """Raise :class:`NumericOverflow` naming the first layer whose output was not finite in the current forward
        (one host sync when everything is finite)."""
        flags, self._flags = self._flags, []
        checks = [f.to(flags[0][1].device) for _, f, _ in flags] if flags else []
        if final is not None and final.is_floating_point():
            checks.append(torch.isfinite(final).all().to(checks[0].device if checks else final.device))
        if not checks or bool(torch.stack(checks).all()):
            return
        for index, flag, dtype in flags:  # only after a failure: find the first bad layer
            if not bool(flag):
                raise NumericOverflow(overflow_message(f"layer {index}", dtype))
        raise NumericOverflow(overflow_message("the decoder stack's final norm", final.dtype))  # type: ignore[union-attr]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._flags.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)

    @property
    def active(self) -> bool:
        return bool(self._handles)


def install_overflow_guard(model: nn.Module, layers: nn.ModuleList, body: nn.Module | None = None) -> OverflowGuard:
    """The model's guard, installed once (a second call returns the same guard)."""
    existing = getattr(model, _ATTR, None)
    return existing if isinstance(existing, OverflowGuard) else OverflowGuard(model, layers, body)


def overflow_guard(model: nn.Module) -> OverflowGuard | None:
    """The guard installed on ``model``, if any."""
    found = getattr(model, _ATTR, None)
    return found if isinstance(found, OverflowGuard) else None


def check_overflow(model: nn.Module) -> None:
    """Check the layers that ran in a forward that was stopped early (nothing to do without a guard)."""
    guard = overflow_guard(model)
    if guard is not None:
        guard.check()
