"""The identity of a loaded model: a fingerprint of its config and every weight, independent of paths.

Resumable runs key their records by it, so replacing the weights at the same path is noticed, and the same
model reached by a relative or an absolute path, a symlink or a copy is recognised as the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from typing import Any

import torch
from torch import nn

from melayer.util.errors import MelayerError

# config entries that describe where or how a model was loaded, not what it computes
_NOT_IDENTITY = ("transformers_version", "torch_dtype", "dtype", "architectures")


def config_identity(config: Any) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _NOT_IDENTITY}


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


def _state(model: nn.Module) -> tuple[Any, ...]:
    """Cheap witness of the weights' state: storage and in-place version counter of every tensor."""
    return tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype) for name, t in model.state_dict().items())


def _loaders(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> the module whose accelerate offload hook loads that module's weights (itself or, when the
    hook places submodules too, an ancestor), for every module of ``model`` whose weights are offloaded."""
    from accelerate.utils import has_offloaded_params

    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not has_offloaded_params(mod):
            continue
        out[name] = mod
        if getattr(mod._hf_hook, "place_submodules", False):
            for sub, _ in mod.named_modules(prefix=name):
                out.setdefault(sub, mod)
    return out


def _offloaded_tensors(model: nn.Module, loaders: dict[str, nn.Module], names: list[str]):
    """The real data of the ``meta`` state-dict entries ``names`` (in that order), read through accelerate's
    offload hooks one loading module at a time (each open only while its entries are hashed)."""
    from melayer.models.devices import materialized

    with contextlib.ExitStack() as stack:
        current = None
        for key in names:
            owner_name, _, attr = key.rpartition(".")
            loader = loaders.get(owner_name)
            if loader is None:
                raise MelayerError(f"weight {key} is on the meta device with nothing to load it from; load the "
                                   "model with a device_map that offloads to 'cpu' or 'disk'")
            if loader is not current:
                stack.close()
                stack.enter_context(materialized(loader, recurse=False))
                current = loader
            yield key, getattr(model.get_submodule(owner_name), attr)


def _hash_tensor(h: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, (1 << 26) // max(1, flat.element_size()))  # 64 MiB at a time off the accelerator
    for start in range(0, flat.numel(), step):
        chunk = flat[start: start + step].contiguous().cpu()
        h.update(chunk.view(torch.uint8).numpy().data)


@torch.no_grad()
def fingerprint(model: nn.Module, cached: bool = True) -> str:
    """sha256 (first 16 hex digits) of the model's config and of every parameter and persistent buffer in its
    state dict: names, dtypes, shapes and bytes (a tensor shared under two names, e.g. tied embeddings, is read
    once). Weights offloaded by accelerate (``device_map`` with ``cpu``/``disk`` offload: ``meta`` placeholders)
    are read through their offload hook, so a split model has the digest of the same model loaded whole.
    Remembered per model object until a weight is changed in place or replaced; a model with offloaded weights
    is hashed anew each time (what its hooks load can change without the placeholders changing), and so is any
    model with ``cached=False`` (a proof that weights were restored must not trust the version counters: an
    edit through ``.data`` does not bump them)."""
    witness = _state(model)
    hit = _CACHE.get(model) if cached else None
    if hit is not None and hit[0] == witness:
        return hit[1]
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(config_identity(cfg), sort_keys=True, default=str).encode())
    state = model.state_dict()
    offloaded = [name for name, t in state.items() if t.device.type == "meta" and t.numel()]
    loaders = _loaders(model) if offloaded else {}
    loaded = _offloaded_tensors(model, loaders, offloaded)
    # tied weights that are offloaded: the same Parameter object under two names
    first: dict[int, str] = {}
    objects: dict[str, int] = {}
    if offloaded:
        for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
            objects[name] = id(t)
            first.setdefault(id(t), name)
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    try:
        for name, tensor in state.items():
            h.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            if tensor.numel() == 0:
                continue
            if tensor.device.type == "meta":
                _, real = next(loaded)
                owner = first.get(objects.get(name, -1), name)
                if owner != name:
                    h.update(f"={owner}".encode())
                else:
                    _hash_tensor(h, real)
                continue
            alias = (tensor.data_ptr(), tensor.numel(), tuple(tensor.stride()))
            if alias in seen:
                h.update(f"={seen[alias]}".encode())
                continue
            seen[alias] = name
            _hash_tensor(h, tensor)
    finally:
        loaded.close()
    digest = h.hexdigest()[:16]
    if not offloaded:
        _CACHE[model] = (witness, digest)
    return digest
