"""Attribution inside one decoder layer at the massive token: what each site holds there, the branch
decomposition of the layer's update, FFN-neuron contributions (activation x ``down`` weight), the FFN-input dims
that drive those neurons, and each norm's gain on the relevant dims.

Only the massive token's rows are kept from any forward pass (reduced inside hooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from melayer.capture import (
    Hooks,
    TokenTracker,
    forward_until,
    read_site,
)
from melayer.capture.batching import planned
from melayer.capture.encoding import tokenize
from melayer.models.archmap import NORM_ROLES
from melayer.models.loading import LM

RECORDED = ("resid_in", "attn_out", "post_attn_out", "pre_ffn_norm_in", "mlp_in", "mlp_out", "post_ffn_out", "down_in",
            "resid_out")


@torch.no_grad()
def record_layers(lm: LM, prompts: Sequence[str], positions: Sequence[int], layers: Sequence[int],
                  batch_size: int | None = None) -> dict[int, dict[str, Any]]:
    """For each layer in ``layers``: the massive token's vectors at every recorded site (prompts x dim), and for
    each norm the token's 1/scale (1/rms for RMSNorm, 1/std for LayerNorm) against the median over the other
    real tokens."""
    data: dict[int, dict[str, list[torch.Tensor]]] = {l: {s: [] for s in RECORDED} for l in layers}
    scales: dict[int, dict[str, dict[str, list[float]]]] = {l: {} for l in layers}
    tracker = TokenTracker(positions)
    layer_norm = lm.arch.norm_kind == "layer"

    def keep(layer: int, name: str):
        return lambda x: data[layer][name].append(tracker.rows(x))

    def norm_scale(layer: int, role: str):
        def fn(x: torch.Tensor) -> None:
            x = x.float()
            s = x.std(dim=-1, unbiased=False) if layer_norm else x.pow(2).mean(-1).sqrt()
            inv = 1.0 / s.clamp_min(1e-12)
            rec = scales[layer].setdefault(role, {"massive": [], "others": []})
            cols, real_rows = tracker.current()
            for b in range(x.shape[0]):
                col = int(cols[b])
                real = real_rows[b].clone()
                real[col] = False
                rec["massive"].append(float(inv[b, col]))
                if real.any():
                    rec["others"].append(float(inv[b][real].median()))
        return fn

    with Hooks() as hooks:
        tracker.install(hooks, lm)
        for l in layers:
            for name in RECORDED:
                read_site(hooks, lm, l, name, keep(l, name))
            for role in NORM_ROLES:
                read_site(hooks, lm, l, f"{role}_in", norm_scale(l, role))
        order: list[int] = []
        for idx, batch in planned(lm, [tokenize(lm, p) for p in prompts], max_batch=batch_size):
            tracker.expect(idx)
            order.extend(idx)
            forward_until(lm, batch, max(layers))
    back = torch.tensor(order).argsort()  # fed order -> input order
    out: dict[int, dict[str, Any]] = {}
    for l in layers:
        out[l] = {s: torch.cat(v)[back] for s, v in data[l].items() if v}
        out[l]["norm_scale"] = {
            role: {"massive_inv_scale": float(np.mean(r["massive"])),
                   "others_median_inv_scale": float(np.median(r["others"])) if r["others"] else None}
            for role, r in scales[l].items()
        }
    return out


def ffn_in_weights(lm: LM, layer: int) -> dict[str, torch.Tensor]:
    """The FFN input projections of ``layer`` as (intermediate, hidden) matrices (see ``ArchSpec.ffn_in_matrices``)."""
    return lm.ffn_in_weights(layer)


def neuron_contributions(lm: LM, layer: int, down_in: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Mean over prompts of activation x ``down`` weight: (len(dims), intermediate)."""
    w = lm.down_weight(layer).float().cpu()[list(dims)]  # (D, I)
    return down_in.mean(0)[None, :] * w


def rank_neurons(contrib: torch.Tensor) -> torch.Tensor:
    """Neurons ordered by their largest signed share of any massive dim's FFN output."""
    total = contrib.sum(1, keepdim=True)
    share = contrib * torch.sign(total) / total.abs().clamp_min(1e-30)
    return share.max(0).values.argsort(descending=True)


def select_neurons(contrib: torch.Tensor, share: float, max_neurons: int) -> tuple[list[int], list[float]]:
    """Per massive dim, the fewest neurons whose contributions (same sign as the total) reach ``share`` of
    the FFN output on that dim; the union over dims, at most ``max_neurons``, strongest first. Returns the
    neurons and the share of each dim's FFN output they cover."""
    total = contrib.sum(1)
    chosen: dict[int, float] = {}
    for i in range(contrib.shape[0]):
        signed = contrib[i] * torch.sign(total[i])
        order = signed.argsort(descending=True)
        acc = 0.0
        for n in order.tolist():
            if signed[n] <= 0:
                break
            s = float(signed[n] / total[i].abs().clamp_min(1e-30))
            chosen[n] = max(chosen.get(n, 0.0), s)
            acc += s
            if acc >= share:
                break
    neurons = [n for n, _ in sorted(chosen.items(), key=lambda kv: -kv[1])][:max_neurons]
    covered = [float(contrib[i, neurons].sum() / total[i]) if float(total[i]) != 0 else 0.0
               for i in range(contrib.shape[0])]
    return neurons, covered


def driving_inputs(lm: LM, layer: int, mlp_in: torch.Tensor, neuron: int, top: int = 5) -> list[dict[str, Any]]:
    """The FFN-input dims with the largest |x_i * W[neuron, i]| through each input projection."""
    x = mlp_in.mean(0)
    rows = []
    scores = torch.zeros_like(x)
    contribs: dict[str, torch.Tensor] = {}
    for name, w in ffn_in_weights(lm, layer).items():
        c = x * w[neuron].float().cpu()
        contribs[name] = c
        scores = torch.maximum(scores, c.abs() / c.abs().sum().clamp_min(1e-30))
    for i in scores.argsort(descending=True)[:top].tolist():
        rows.append({"dim": i, "x": float(x[i]), "share": float(scores[i]),
                     **{f"{name}_contribution": float(c[i]) for name, c in contribs.items()},
                     **{f"{name}_preact": float(c.sum()) for name, c in contribs.items()}})
    return rows


def driving_dims(rows_per_neuron: dict[int, list[dict[str, Any]]], min_share: float = 0.1, per_neuron: int = 3) -> list[int]:
    """Input dims that carry at least ``min_share`` of a top neuron's input (at most ``per_neuron`` each;
    at least the strongest one)."""
    dims: set[int] = set()
    for rows in rows_per_neuron.values():
        picked = [r["dim"] for r in rows[:per_neuron] if r["share"] >= min_share] or [rows[0]["dim"]]
        dims.update(picked)
    return sorted(dims)


def branch_scales(rec: dict[str, Any], parallel: bool) -> dict[str, float]:
    """How much of each branch's output the residual stream receives, measured where it differs from 1 (MiniCPM
    scales both branches by ``scale_depth / sqrt(num_layers)`` before the residual add): the least-squares factor
    between what the residual gained across the branch (pre-FFN-norm input minus layer input, then layer output
    minus pre-FFN-norm input) and the branch output: the median ratio over the entries (prompts x dims) where
    the branch is large enough against the residual for the difference to be exact to 0.1 % in float32, kept
    only when nearly every entry agrees with it (a block whose branch modules are not what it adds, e.g. BLOOM's,
    whose attention and MLP add the residual themselves, gets none). Only sequential blocks, where the pre-FFN
    norm reads the residual between the two branches."""
    if parallel or "pre_ffn_norm_in" not in rec:
        return {}
    mid = rec["pre_ffn_norm_in"].float()
    out: dict[str, float] = {}
    for name, before, after, branch in (
            ("attn", rec["resid_in"].float(), mid, rec.get("post_attn_out", rec.get("attn_out"))),
            ("ffn", mid, rec["resid_out"].float(), rec.get("post_ffn_out", rec.get("mlp_out")))):
        if branch is None:
            continue
        branch = branch.float()
        exact = branch.abs() > 1e4 * torch.finfo(torch.float32).eps * torch.maximum(before.abs(), after.abs())
        if int(exact.sum()) < 8:
            continue
        ratios = (after - before)[exact] / branch[exact]
        scale = float(ratios.median())
        consistent = float(((ratios - scale).abs() <= 1e-2 * abs(scale)).float().mean()) >= 0.9
        if consistent and abs(scale - 1.0) > 1e-2:  # one factor for (nearly) every entry: a scaled branch
            out[name] = scale
    return out


def decompose(lm: LM, rec: dict[str, Any], dims: Sequence[int], layer: int | None = None) -> list[dict[str, Any]]:
    """Per massive dim: residual in, attention branch, FFN branch, residual out (they sum). In a parallel block
    (``ffn_reads``) the FFN read the layer input, not the residual after the attention branch. A branch the block
    scales before the residual add (:func:`branch_scales`) is counted as added, with its scale recorded."""
    rows = []
    parallel = (lm.arch if layer is None else lm.arch.at(layer)).parallel
    has_pa = "post_attn_out" in rec
    has_pf = "post_ffn_out" in rec
    scales = branch_scales(rec, parallel)
    for d in dims:
        r_in = rec["resid_in"][:, d]
        none = torch.zeros_like(rec["resid_in"][:, d])  # a layer without mixer (or without FFN): no such branch
        attn = rec["post_attn_out"][:, d] if has_pa else rec["attn_out"][:, d] if "attn_out" in rec else none
        ffn = rec["post_ffn_out"][:, d] if has_pf else rec["mlp_out"][:, d] if "mlp_out" in rec else none
        attn, ffn = attn * scales.get("attn", 1.0), ffn * scales.get("ffn", 1.0)
        out = rec["resid_out"][:, d]
        row: dict[str, Any] = {
            "dim": d,
            "residual_in": float(r_in.mean()),
            "attn_branch": float(attn.mean()),
            "ffn_branch": float(ffn.mean()),
            "residual_out": float(out.mean()),
            "residual_out_min_abs": float(out.abs().min()),
            "sum_check_error": float((r_in + attn + ffn - out).abs().max()),
        }
        if parallel:
            row["ffn_reads"] = "layer input (parallel block)"
        for name, scale in scales.items():
            row[f"{name}_branch_scale"] = scale
        delta = float((out - r_in).mean())
        row["update"] = delta
        row["ffn_share_of_update"] = float(ffn.mean()) / delta if delta else None
        row["attn_share_of_update"] = float(attn.mean()) / delta if delta else None
        if has_pa:
            row["attn_raw"] = float(rec["attn_out"][:, d].mean())
            row["post_attn_norm_realised_gain"] = float((attn / rec["attn_out"][:, d]).mean())
        if has_pf:
            row["mlp_raw"] = float(rec["mlp_out"][:, d].mean())
            row["post_ffn_norm_realised_gain"] = float((ffn / rec["mlp_out"][:, d]).mean())
        rows.append(row)
    return rows


def norm_report(lm: LM, layer: int, rec: dict[str, Any], dims: Sequence[int], drive: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    arch = lm.arch
    for role in NORM_ROLES:
        gain = lm.norm_gain(layer, role)
        if gain is None:
            continue
        g = gain.float().cpu()
        median = float(g.median())
        order = g.abs().argsort(descending=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        entries = []
        for kind, ds in (("massive", dims), ("driving", drive)):
            for d in ds:
                entries.append({"dim": int(d), "kind": kind, "gain": float(g[d]),
                                "ratio_to_median": float(g[d]) / median if median else None,
                                "rank_by_abs_gain": int(rank[d]) + 1})
        scale = rec.get("norm_scale", {}).get(role, {})
        ms, os_ = scale.get("massive_inv_scale"), scale.get("others_median_inv_scale")
        out.append({
            "role": role, "module": f"{arch.layers}.{layer}.{arch.path(role, layer)}", "median_gain": median,
            "max_abs_gain": float(g.abs().max()), "max_abs_gain_dim": int(order[0]),
            "top_dims": [{"dim": int(i), "gain": float(g[i])} for i in order[:5].tolist()],
            "dims": entries,
            "token_inv_scale": {"massive": ms, "others_median": os_,
                                "ratio": (ms / os_) if ms is not None and os_ else None,
                                "meaning": "1/rms (RMSNorm) or 1/std (LayerNorm) of this norm's input; the norm's "
                                           "output on dim d is gain[d] x this x input[d]"},
        })
    return out
