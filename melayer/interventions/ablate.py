"""Temporary, exactly reversible ablations inside one decoder layer (used by ``melayer explain``).

Three kinds, addressed through the architecture map's roles:

* **FFN neurons** (:class:`NeuronAblation`): a forward pre-hook on the layer's ``down`` module zeroes the
  chosen intermediate neurons' activations for every token, i.e. their ``down`` columns contribute nothing.
* **Whole experts** of an MoE layer (:class:`ExpertAblation`): a routed expert's down projection (and its bias)
  is zeroed, so whatever the router sends it adds nothing; the shared expert's neurons are zeroed at its ``down``
  input.
* **Norm gains** (:class:`NormEdit`): the effective gain of a norm (``weight + norm_gain_offset``) on chosen
  dims is set to a target value (by default that norm's median gain) by editing the weight in place.

:func:`ablated` applies a list of them and undoes everything in a ``finally``: hooks are removed and the
edited weight entries are copied back from saved clones, so the model is bit-identical afterwards.
:func:`fingerprint` hashes every weight (and counts hooks) so callers can prove it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from melayer.capture.hooks import Hooks
from melayer.models.archmap import NORM_ROLES
from melayer.models.devices import edited_offloaded_param, is_offloaded, read_param
from melayer.models.fingerprint import fingerprint as weights_fingerprint
from melayer.models.hf_internals import hook_count
from melayer.models.loading import LM
from melayer.util.errors import MelayerError


@dataclass(frozen=True)
class NeuronAblation:
    """Zero the activations of ``neurons`` at the input of ``layer``'s ``down`` projection (all tokens)."""

    layer: int
    neurons: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ffn_neurons", "layer": self.layer, "neurons": list(self.neurons),
                "how": "activation zeroed at the down-projection input, every token"}


@dataclass(frozen=True)
class NormEdit:
    """Set the effective gain of norm ``role`` in ``layer`` to ``gain`` on ``dims``."""

    layer: int
    role: str
    dims: tuple[int, ...]
    gain: float
    original: tuple[float, ...] = field(default=())  # effective gains before the edit (for the record)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "norm_gain", "layer": self.layer, "role": self.role, "dims": list(self.dims),
                "set_gain_to": self.gain, "original_gains": list(self.original), "reason": self.reason}


@dataclass(frozen=True)
class ExpertAblation:
    """Remove the output of ``experts`` (routed expert numbers, or ``"shared"``) of ``layer``'s MoE block, every
    token; the router still routes as before."""

    layer: int
    experts: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "experts", "layer": self.layer, "experts": list(self.experts),
                "how": "the expert's down projection (and bias) zeroed, every token; routing unchanged"}


Edit = NeuronAblation | NormEdit | ExpertAblation


def median_gain_edit(lm: LM, layer: int, role: str, dims: Sequence[int], reason: str = "") -> NormEdit | None:
    """A :class:`NormEdit` that sets ``dims`` of a norm to that norm's median effective gain (None if the
    layer has no such norm or it has no weight)."""
    if role not in NORM_ROLES:
        raise MelayerError(f"{role!r} is not a norm role ({', '.join(NORM_ROLES)})")
    gain = lm.norm_gain(layer, role)
    if gain is None or not dims:
        return None
    dims = tuple(sorted({int(d) for d in dims}))
    median = float(gain.median())
    return NormEdit(layer=layer, role=role, dims=dims, gain=median,
                    original=tuple(float(gain[d]) for d in dims), reason=reason)


def _check(lm: LM, edit: Edit) -> None:
    if not 0 <= edit.layer < lm.num_layers:
        raise MelayerError(f"layer {edit.layer} is out of range: {lm.name} has layers 0-{lm.num_layers - 1}")
    if isinstance(edit, ExpertAblation):
        fused = lm.experts(edit.layer)
        if fused is None:
            raise MelayerError(f"layer {edit.layer} of {lm.name} has no mixture-of-experts block")
        shared = lm.module(edit.layer, "down") is not None
        bad = [e for e in edit.experts if not (e == "shared" and shared)
               and not (isinstance(e, int) and 0 <= e < fused.num_experts)]
        if bad:
            raise MelayerError(f"expert {bad[0]!r} is not in layer {edit.layer}: it has routed experts "
                               f"0-{fused.num_experts - 1}" + (" and a shared expert" if shared else ""))
    elif isinstance(edit, NeuronAblation):
        inter = lm.down_weight(edit.layer).shape[1]
        bad = [n for n in edit.neurons if not 0 <= n < inter]
        if bad:
            raise MelayerError(f"neuron {bad[0]} is out of range: layer {edit.layer} has {inter} FFN neurons")
    else:
        if lm.norm_gain(edit.layer, edit.role) is None:
            raise MelayerError(f"layer {edit.layer} of {lm.name} has no weighted {edit.role} norm")
        bad = [d for d in edit.dims if not 0 <= d < lm.hidden_size]
        if bad:
            raise MelayerError(f"dim {bad[0]} is out of range: hidden size is {lm.hidden_size}")


def _zero_hook(neurons: tuple[int, ...]):
    index = torch.tensor(neurons, dtype=torch.long)

    def fn(module, args):
        x = args[0].clone()
        x[..., index.to(x.device)] = 0
        return (x, *args[1:])

    return fn


# (stored tensor, index, its values before the edit), put back in reverse order
_Saved = list[tuple[torch.Tensor, torch.Tensor | int, torch.Tensor]]


def _ablate_neurons(lm: LM, e: NeuronAblation, hooks: Hooks, saved: _Saved) -> None:
    """Dense FFN: the neurons' activations are zeroed at the down input. MoE layer: a routed expert's neurons get
    their down columns zeroed (restored by :func:`ablated`), a shared expert's neurons as a dense FFN's."""
    fused = lm.experts(e.layer)
    if fused is None:  # a dense FFN's down, or a layer without FFN: its mixer's output projection
        down = lm.neuron_projection(e.layer)
        if down is None:
            raise MelayerError(f"{lm.name}: layer {e.layer} has no neurons to ablate")
        hooks.pre(down, _zero_hook(tuple(e.neurons)))
        return
    routed = fused.num_experts * fused.inter
    shared = tuple(n - routed for n in e.neurons if n >= routed)
    if shared:
        hooks.pre(lm.required(e.layer, "down"), _zero_hook(shared))
    if is_offloaded(fused.module) and len(shared) < len(e.neurons):
        raise MelayerError(f"layer {e.layer}: ablating experts of an offloaded layer is not supported")
    weight = fused.tensor("down_proj")
    for expert in sorted({n // fused.inter for n in e.neurons if n < routed}):
        cols = [n - expert * fused.inter for n in e.neurons if n // fused.inter == expert and n < routed]
        saved.append((weight, expert, weight[expert].clone()))
        fused.down(expert)[:, torch.tensor(cols, dtype=torch.long, device=weight.device)] = 0


def _ablate_experts(lm: LM, e: ExpertAblation, hooks: Hooks, saved: _Saved) -> None:
    fused = lm.experts(e.layer)
    assert fused is not None  # _check
    if "shared" in e.experts:
        down = lm.required(e.layer, "down")
        hooks.pre(down, _zero_hook(tuple(range(lm.arch.at(e.layer).down_matrix(down).shape[1]))))
    routed = sorted({x for x in e.experts if isinstance(x, int)})
    if routed and is_offloaded(fused.module):
        raise MelayerError(f"layer {e.layer}: ablating experts of an offloaded layer is not supported")
    for expert in routed:
        for name in ("down_proj", "down_proj_bias") if fused.has_bias else ("down_proj",):
            weight = fused.tensor(name)
            saved.append((weight, expert, weight[expert].clone()))
            weight[expert] = 0


@contextlib.contextmanager
def ablated(lm: LM, edits: Sequence[Edit]) -> Iterator[None]:
    """Apply ``edits`` for the duration of the ``with`` block; always restored exactly (``finally``)."""
    for e in edits:
        _check(lm, e)
    saved: _Saved = []
    hooks = Hooks()
    overlays = contextlib.ExitStack()  # offloaded norms: an edited copy is what their hook loads
    try:
        with torch.no_grad():
            for e in edits:
                if isinstance(e, NeuronAblation):
                    if e.neurons:
                        _ablate_neurons(lm, e, hooks, saved)
                    continue
                if isinstance(e, ExpertAblation):
                    _ablate_experts(lm, e, hooks, saved)
                    continue
                norm = lm.required(e.layer, e.role)
                if is_offloaded(norm):
                    stored = read_param(norm)
                    assert stored is not None  # _check: a weighted norm
                    weight = stored.clone()
                    weight[torch.tensor(e.dims, dtype=torch.long)] = lm.arch.weight_for_gain(e.gain)
                    overlays.enter_context(edited_offloaded_param(norm, "weight", weight))
                    continue
                weight = cast(torch.Tensor, norm.weight)  # torch types a module attribute as Tensor | Module
                idx = torch.tensor(e.dims, dtype=torch.long, device=weight.device)
                saved.append((weight, idx, weight[idx].clone()))
                weight[idx] = torch.as_tensor(lm.arch.weight_for_gain(e.gain), dtype=weight.dtype,
                                              device=weight.device)
        yield
    finally:
        hooks.remove()
        overlays.close()
        with torch.no_grad():
            for stored_weight, where, values in reversed(saved):
                stored_weight[where] = values


def fingerprint(lm: LM) -> dict[str, Any]:
    """The model's weights fingerprint (:func:`melayer.models.fingerprint.fingerprint`, computed afresh: config,
    every parameter and persistent buffer, offloaded ones read from where accelerate keeps them) plus the number
    of hooks on it."""
    return {"weights": weights_fingerprint(lm.model, cached=False), "hooks": hook_count(lm.model)}
