"""Hook context managers: every hook melayer installs is removed when the ``with`` block ends.

We never monkey-patch ``forward``; we only use PyTorch's public hook API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def layer_output(output: Any) -> torch.Tensor:
    """The residual-stream tensor from a decoder layer's output (tensor or tuple, by version)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Hooks:
    """Collects hook handles and removes them all on exit.

    >>> with Hooks() as hooks:
    ...     hooks.forward(layer, lambda mod, args, out: ...)
    ...     model(**batch)
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def pre(self, module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (nothing after the last needed layer runs)."""


def run_until(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except StopForward:
        pass
