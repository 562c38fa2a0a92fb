"""Models split across devices (``device_map``, accelerate offload): where a module runs and how to read or
temporarily edit its weights.

With ``device_map`` (``"auto"``, a dict, ``max_memory``) accelerate places each decoder layer on a GPU, on the
CPU, or offloads it: an offloaded module keeps ``meta`` placeholders and an ``AlignDevicesHook`` that loads its
weights for each forward pass. So:

* a tensor that indexes a hidden state must be built on (or moved to) that hidden state's device, never on
  "the model's device" (there is none);
* a weight is read through :func:`accelerate.utils.align_module_device`, which materialises an offloaded
  module's tensors for the duration of the read (:func:`read_param`);
* an in-place weight edit (the norm-gain ablation) on an offloaded module edits what its hook loads
  (:func:`edited_offloaded_param`), since the placeholder has no data.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from melayer.util.errors import MelayerError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _hook(module: nn.Module) -> Any:
    return getattr(module, "_hf_hook", None)


def is_offloaded(module: nn.Module) -> bool:
    """True when accelerate loads this module's own weights for each forward (they sit on ``meta`` otherwise)."""
    hook = _hook(module)
    return bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device if it has one, else its first real tensor's."""
    hook = _hook(module)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, torch.device) else dev
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def materialized(module: nn.Module, recurse: bool = True) -> Iterator[bool]:
    """Inside, every offloaded submodule of ``module`` holds its real weights on its execution device (through
    :func:`accelerate.utils.align_module_device`); yields whether anything was materialised (a tensor kept
    beyond the block must then be cloned). ``recurse=False``: the module's own tensors only. A ``meta`` weight
    without an offload hook has no data at all."""
    from accelerate.utils import align_module_device, has_offloaded_params

    offloaded = [m for m in (module.modules() if recurse else [module]) if has_offloaded_params(m)]
    with contextlib.ExitStack() as stack:
        for m in offloaded:
            stack.enter_context(align_module_device(m))
        for name, p in module.named_parameters(recurse=recurse):
            if p.device.type == "meta":
                raise MelayerError(f"weight {name} is on the meta device with nothing to load it from; load the "
                                   "model with a device_map that offloads to 'cpu' or 'disk'")
        yield bool(offloaded)


def read(module: nn.Module, get: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """``get(module)`` detached, with real data even when (parts of) the module are offloaded."""
    with materialized(module) as moved:
        tensor = get(module).detach()
        return tensor.clone() if moved else tensor


def read_param(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module.<name>`` detached, with real data even when the module is offloaded (None if absent)."""
    if getattr(module, name, None) is None:
        return None
    return read(module, lambda m: getattr(m, name))


@contextlib.contextmanager
def edited_offloaded_param(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """While inside, the offloaded ``module`` loads ``value`` as ``<name>`` for each forward pass; its stored
    weights are never touched. (accelerate's hook reads ``hook.weights_map[name]``; this puts an overlay there.)"""
    hook = _hook(module)
    stored = hook.weights_map
    overlay = {n: stored[n] for n, _ in module.named_parameters(recurse=False)}
    if getattr(hook, "offload_buffers", False):
        overlay.update({n: stored[n] for n, _ in module.named_buffers(recurse=False)})
    overlay[name] = value
    hook.weights_map = overlay
    try:
        yield
    finally:
        hook.weights_map = stored


def parse_device_map(text: str | dict | None) -> str | dict | None:
    """``auto`` / ``balanced`` / ``balanced_low_0`` / ``sequential``, a device (``cpu``, ``cuda:1``), a JSON file or
    object of module -> device (``{"model.layers.20": "disk", ...}``); None or ``none`` / ``off``: no map."""
    if text is None or isinstance(text, dict):
        return text
    text = text.strip()
    if text.lower() in ("", "none", "off"):
        return None
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if text.startswith("{") or text.endswith(".json"):
        try:
            data = json.loads(Path(text).read_text() if text.endswith(".json") else text)
        except (OSError, ValueError) as exc:
            raise MelayerError(f"--device-map {text!r}: not a readable JSON object ({exc})") from None
        if not isinstance(data, dict):
            raise MelayerError(f"--device-map {text!r}: expected a JSON object of module -> device")
        return data
    try:
        torch.device(text)
    except RuntimeError:
        raise MelayerError(f"--device-map {text!r}: use {', '.join(DEVICE_MAP_STRATEGIES)}, a device such as "
                           "cuda:0, or a JSON file of module -> device") from None
    return text


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` (GPU index or ``cpu``/``disk`` = size) -> accelerate's ``max_memory``."""
    if text is None or isinstance(text, dict):
        return text
    out: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not size:
            raise MelayerError(f"--max-memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise MelayerError("--max-memory is empty: give e.g. 0=20GiB,cpu=64GiB")
    return out
