"""Super experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models").

Their criterion, measured on melayer's prompts: for every (MoE layer, expert) the largest |output| of the
expert's down projection over every real token of the prompts (the expert's own output, before its routing
weight; a shared expert's output before its gate). An expert is *super* when that maximum is above the 99.5th
percentile of all the (layer, expert) maxima **and** above a tenth of the largest one (floor-divided, as they
write it), counting only the first 75 % of the layers. Each row also names the channel (hidden dim) where the
maximum sits.

Routed experts are fused tensors in transformers 5, so no module outputs one expert's down projection: each
expert's output is recomputed from the fused weights for the tokens routed to it
(:class:`melayer.models.experts.FusedExperts`). Dense layers of an MoE model (DeepSeek's first layers) are not
experts and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from melayer.capture import Hooks, body_call, forward_body, layer_output
from melayer.capture.batching import planned
from melayer.capture.encoding import tokenize
from melayer.models.experts import FusedExperts, experts_call
from melayer.models.loading import LM

PERCENTILE = 99.5
INCLUDE_LAYERS = 0.75
CRITERION = ("Su et al. 2025: per (MoE layer, expert) the largest |down-projection output| over every real token "
             "of the prompts (before the routing weight / shared-expert gate); super when above the 99.5th "
             "percentile of all those maxima and above floor(largest / 10), in the first 75% of the layers")


def moe_layers(lm: LM) -> list[int]:
    """The layers whose FFN is a mixture of experts."""
    return [i for i in range(lm.num_layers) if lm.experts(i) is not None]


@torch.no_grad()
def expert_maxima(lm: LM, prompts: Sequence[str], batch_size: int | None = None) -> list[dict[str, Any]]:
    """One row per (MoE layer, expert): the largest |down output| over the prompts' real tokens and its channel
    (``expert`` is the routed expert's number, or ``"shared"``)."""
    best: dict[tuple[int, int | str], tuple[float, int]] = {}
    real: dict[str, torch.Tensor] = {}

    def keep(layer: int, expert: int | str, out: torch.Tensor) -> None:
        if out.numel() == 0:
            return
        flat = out.float().abs().reshape(-1, out.shape[-1])
        value = flat.max(dim=0).values
        dim = int(value.argmax())
        if float(value[dim]) > best.get((layer, expert), (-1.0, 0))[0]:
            best[(layer, expert)] = (float(value[dim]), dim)

    def on_body(m: Any, args: tuple, kwargs: dict) -> None:
        call = body_call(args, kwargs)
        assert call is not None
        mask = call.mask2d.bool() if call.mask2d is not None else torch.ones(call.batch, call.length, dtype=torch.bool)
        real["tokens"] = mask.reshape(-1)

    def on_experts(layer: int, fused: FusedExperts):
        def fn(m: Any, args: tuple, kwargs: dict) -> None:
            call = experts_call(args, kwargs)
            if call is None:
                return
            x, index, _ = call
            ok = real["tokens"].to(x.device)
            if ok.numel() != x.shape[0]:  # not one row per token of the batch: read every row
                ok = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            for e in index[ok].unique().tolist():
                if not 0 <= e < fused.num_experts:
                    continue
                rows = ((index == e).any(dim=-1) & ok).nonzero(as_tuple=True)[0]
                out = fused.activations(x[rows], e).float() @ fused.down(e).float().t()
                bias = fused.down_bias(e)
                keep(layer, e, out + bias.float() if bias is not None else out)
        return fn

    def on_shared(layer: int):
        def fn(m: Any, args: tuple, out: Any) -> None:
            y = layer_output(out)
            y = y.reshape(-1, y.shape[-1])
            ok = real["tokens"].to(y.device)
            keep(layer, "shared", y[ok] if ok.numel() == y.shape[0] else y)
        return fn

    with Hooks() as hooks:
        hooks.pre(lm.body, on_body, with_kwargs=True)
        for layer in moe_layers(lm):
            fused = lm.experts(layer)
            assert fused is not None
            hooks.pre(fused.module, on_experts(layer, fused), with_kwargs=True)
            shared = lm.module(layer, "down")
            if shared is not None:
                hooks.forward(shared, on_shared(layer))
        for _, batch in planned(lm, [tokenize(lm, p) for p in prompts], max_batch=batch_size):
            forward_body(lm, batch)
    rows = [{"layer": l, "expert": e, "max_abs_output": v, "dim": d} for (l, e), (v, d) in best.items()]
    return sorted(rows, key=lambda r: (r["layer"], str(r["expert"]).zfill(8)))


def super_experts(lm: LM, prompts: Sequence[str], batch_size: int | None = None, percentile: float = PERCENTILE,
                  include_layers: float = INCLUDE_LAYERS, top: int = 10) -> dict[str, Any] | None:
    """Su et al.'s super experts of ``lm`` on ``prompts`` (None for a model without an MoE layer).

    Args:
        lm: the model.
        prompts: the calibration prompts.
        batch_size: at most this many prompts per forward pass.
        percentile: the percentile of all (layer, expert) maxima an expert must exceed.
        include_layers: only layers below this fraction of the depth can hold a super expert.
        top: how many of the largest (layer, expert) maxima to list beside the super experts.

    Returns:
        ``criterion``, ``threshold`` (the percentile), ``tenth_of_max``, ``last_layer`` considered,
        ``super_experts`` (rows: layer, expert, max_abs_output, dim) and ``largest`` (the ``top`` rows by maximum).
    """
    if not moe_layers(lm):
        return None
    rows = expert_maxima(lm, prompts, batch_size)
    values = np.array([r["max_abs_output"] for r in rows])
    threshold = float(np.percentile(values, percentile))
    tenth = float(values.max() // 10)
    last = int(include_layers * lm.num_layers) - 1
    chosen = [r for r in rows if r["layer"] <= last and r["max_abs_output"] > threshold and r["max_abs_output"] > tenth]
    return {
        "criterion": CRITERION, "percentile": percentile, "include_layers": include_layers,
        "threshold": threshold, "tenth_of_max": tenth, "last_layer": last, "experts_measured": len(rows),
        "super_experts": sorted(chosen, key=lambda r: -r["max_abs_output"]),
        "largest": sorted(rows, key=lambda r: -r["max_abs_output"])[:top],
    }
