"""The identity of a loaded model: a fingerprint of its config and every weight, independent of paths.

Resumable runs key their records by it, so replacing the weights at the same path is noticed, and the same
model reached by a relative or an absolute path, a symlink or a copy is recognised as the same.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import torch
from torch import nn

# config entries that describe where or how a model was loaded, not what it computes
_NOT_IDENTITY = ("transformers_version", "torch_dtype", "dtype", "architectures")


def config_identity(config: Any) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _NOT_IDENTITY}


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


def _state(model: nn.Module) -> tuple[Any, ...]:
    """Cheap witness of the weights' state: storage and in-place version counter of every tensor."""
    return tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype) for name, t in model.state_dict().items())


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the model's config and of every parameter and buffer in its state dict:
    names, dtypes, shapes and bytes (a tensor shared under two names, e.g. tied embeddings, is read once).
    Remembered per model object until a weight is changed in place or replaced. Weights offloaded to the
    ``meta`` device contribute their name, dtype and shape only."""
    witness = _state(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == witness:
        return hit[1]
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(config_identity(cfg), sort_keys=True, default=str).encode())
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        h.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        alias = (tensor.data_ptr(), tensor.numel(), tuple(tensor.stride()))
        if alias in seen:
            h.update(f"={seen[alias]}".encode())
            continue
        seen[alias] = name
        flat = tensor.detach().reshape(-1)
        step = max(1, (1 << 26) // max(1, flat.element_size()))  # 64 MiB at a time off the accelerator
        for start in range(0, flat.numel(), step):
            chunk = flat[start: start + step].contiguous().cpu()
            h.update(chunk.view(torch.uint8).numpy().data)
    digest = h.hexdigest()[:16]
    _CACHE[model] = (witness, digest)
    return digest
