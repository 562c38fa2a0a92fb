"""Fused mixture-of-experts tensors as transformers 5 stores them, read through its own layout flags.

An experts module holds every expert's projections as 3-D tensors (``gate_up_proj`` or ``up_proj``, then
``down_proj``, optional ``*_bias``) and is called with the flattened tokens, the chosen experts of each token and
their routing weights. transformers marks its layout on the module (``use_experts_implementation``):
``is_transposed`` (``[E, in, out]`` instead of ``[E, out, in]``), ``is_concatenated`` (``[gate; up]`` halves, else
interleaved ``gate0, up0, ...``), ``has_bias``, ``has_gate`` (False: ``up_proj`` only). The gating itself is the
module's own ``_apply_gate`` (gpt-oss clamps and uses its own GLU), so nothing here re-implements a family.

Neurons of an MoE layer are numbered expert by expert: neuron ``n`` of expert ``e`` is ``e * I + n``; a shared
expert's neurons follow the routed ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers experts module with 3-D fused weights and its layout flags."""
    down = getattr(module, "down_proj", None)
    first = getattr(module, "gate_up_proj", None) if getattr(module, "has_gate", True) else getattr(module, "up_proj", None)
    return (isinstance(down, torch.Tensor) and down.dim() == 3 and isinstance(first, torch.Tensor) and first.dim() == 3
            and hasattr(module, "is_transposed") and not getattr(module, "has_post_expert_norm", False))


class FusedExperts:
    """Per-expert views of one fused experts module (see the module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.has_gate = bool(getattr(module, "has_gate", True))
        self.has_bias = bool(getattr(module, "has_bias", False))
        self.transposed = bool(getattr(module, "is_transposed", False))
        self.concatenated = bool(getattr(module, "is_concatenated", True))
        self.first_name = "gate_up_proj" if self.has_gate else "up_proj"

    def tensor(self, name: str) -> torch.Tensor:
        """One of the module's fused tensors (torch types a module attribute as ``Tensor | Module``)."""
        return cast(torch.Tensor, getattr(self.module, name))

    def _method(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """One of the module's own functions of the projected activations (``_apply_gate``, ``act_fn``)."""
        return cast(Callable[[torch.Tensor], torch.Tensor], getattr(self.module, name))

    @property
    def num_experts(self) -> int:
        return int(self.tensor("down_proj").shape[0])

    @property
    def inter(self) -> int:
        """Neurons per expert."""
        d = self.tensor("down_proj")
        return int(d.shape[1] if self.transposed else d.shape[2])

    def down(self, e: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e``'s down projection as (hidden_out, neuron) (a view)."""
        d = (self.tensor("down_proj") if weight is None else weight)[e]
        return d.t() if self.transposed else d

    def down_bias(self, e: int) -> torch.Tensor | None:
        return self.tensor("down_proj_bias")[e] if self.has_bias else None

    def stored_index(self, e: int, row: int, col: int) -> list[int]:
        """Where entry (row, col) of :meth:`down` sits in the stored ``down_proj`` tensor."""
        return [e, col, row] if self.transposed else [e, row, col]

    def inputs(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s input projections as (neuron, hidden_in) views keyed ``gate`` / ``up``."""
        w = getattr(self.module, self.first_name)[e]
        w = w.t() if self.transposed else w  # (out, in)
        if not self.has_gate:
            return {"up": w}
        inter = w.shape[0] // 2
        if self.concatenated:
            return {"gate": w[:inter], "up": w[inter:]}
        return {"gate": w[0::2], "up": w[1::2]}

    def input_bias(self, e: int) -> dict[str, torch.Tensor]:
        if not self.has_bias:
            return {}
        b = getattr(self.module, f"{self.first_name}_bias")[e]
        if not self.has_gate:
            return {"up": b}
        inter = b.shape[0] // 2
        return {"gate": b[:inter], "up": b[inter:]} if self.concatenated else {"gate": b[0::2], "up": b[1::2]}

    def activations(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s neuron activations (n, I) for tokens ``x`` (n, hidden): the input projection, then the
        module's own gating (``_apply_gate``) or activation."""
        w = getattr(self.module, self.first_name)[e]
        out = x @ w if self.transposed else x @ w.t()
        if self.has_bias:
            out = out + getattr(self.module, f"{self.first_name}_bias")[e]
        return self._method("_apply_gate" if self.has_gate else "act_fn")(out)

    def routed(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(tokens, E x I): each token's neuron activations times its routing weight, zero for experts it did not
        choose (the layout of the neuron numbering)."""
        n, inter = x.shape[0], self.inter
        out = torch.zeros(n, self.num_experts * inter, dtype=torch.float32, device=x.device)
        for e in index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue
            rows, slot = (index == e).nonzero(as_tuple=True)
            act = self.activations(x[rows], e).float() * weights[rows, slot, None].float()
            out[rows, e * inter:(e + 1) * inter] += act
        return out

    def output(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The module's output recomputed from the routed activations (checks the layout reading)."""
        act = self.routed(x, index, weights)
        inter = self.inter
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            out += act[:, e * inter:(e + 1) * inter] @ self.down(e).float().t()
            bias = self.down_bias(e)
            if bias is not None:
                routed = (index == e).float() * weights.float()
                out += routed.sum(-1, keepdim=True) * bias.float()
        return out


def experts_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(hidden (tokens, H), top_k_index, top_k_weights) of an experts module call, else None."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values: list[Any] = list(args[:3]) + [kwargs.get(k) for k in names[len(args[:3]):]]
    if len(values) == 3 and all(isinstance(v, torch.Tensor) for v in values):
        return values[0], values[1], values[2]
    return None


# How a router's logits choose each token's experts and weigh them (``routing`` in a map's ``experts`` flags):
# "softmax": the softmax's k best, renormalised if ``norm`` (Mixtral, Qwen-MoE, OLMoE); "sigmoid_grouped": each
# expert's sigmoid score, the experts chosen by score + a per-expert correction bias among the ``topk_group`` best
# of ``n_group`` groups (a group scored by its two best), weighted by their scores, renormalised if ``norm`` and
# times ``scale`` (DeepSeek-V3, GLM-4-MoE, dots.llm1).
ROUTINGS = ("softmax", "sigmoid_grouped")


def route(logits: torch.Tensor, k: int, routing: str = "softmax", norm: bool = True, bias: torch.Tensor | None = None,
          n_group: int = 1, topk_group: int = 1, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen experts' weights and indices, (tokens, k) each, from router logits (tokens, experts)."""
    logits = logits.float()
    if routing == "softmax":
        weights, index = torch.softmax(logits + (bias if bias is not None else 0.0), dim=-1).topk(k, dim=-1)
        return (weights / weights.sum(-1, keepdim=True) if norm else weights), index
    if routing != "sigmoid_grouped":
        raise ValueError(f"unknown routing {routing!r} (one of {', '.join(ROUTINGS)})")
    scores = logits.sigmoid()
    choice = scores + (bias.float() if bias is not None else 0.0)
    n, experts = choice.shape
    groups = choice.view(n, n_group, experts // n_group).topk(min(2, experts // n_group), dim=-1).values.sum(-1)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, dim=-1).indices, 1.0)
    keep = keep.unsqueeze(-1).expand(n, n_group, experts // n_group).reshape(n, experts).bool()
    index = choice.masked_fill(~keep, float("-inf")).topk(k, dim=-1).indices
    weights = scores.gather(1, index)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, index
