"""Read the ME layer off the weights: the first token's path, computed from the checkpoint alone.

No prompts, no model object and no forward pass over text: tensors are streamed through
:mod:`melayer.models.lazy` (safetensors or GGUF) chunk by chunk, and each chunk is reduced before the next is read.

Why the first token: massive activations sit on the first token of a text (BOS where the tokenizer adds one).
At position 0 attention can attend only to the token itself, so its attention output is exactly
``o(v(norm(x)))`` -- no query, key, position or other token enters. The first token's residual stream is
therefore a function of the weights and of that one token: its embedding, through every layer's norms, value and
output projections and FFN. :func:`candidates` computes it for the first tokens the checkpoint allows (BOS when
the tokenizer always adds it, else BOS and a spread of vocabulary ids) and reads the ME layer off it with the
scan's criterion:

* the **massive dim** of a path is the dim that is the path's largest |x| at the most layers;
* the **ME layer** is the first layer where that dim is massive -- |x| above ``abs_min`` and above
  ``median_ratio`` x the token's *ordinary* median |x| (its median before any dim first dominates it, i.e. while
  it is still an ordinary token) and above ``persist_ratio`` x its own median at that layer -- and persists
  (above ``abs_min`` and ``persist_ratio`` x its own median in the next layer and in ``persist_frac`` of the later
  layers). Massive dims that do not persist are precursors;
* each layer's **write** on the massive dim (attention + FFN) is signed against the sign the earlier layers
  gave that dim: a layer that adds to |x| **creates**, one that takes more than a tenth of it away **removes**
  (writes under 1 % of the dim's largest |x| on the path get no role).
  The **neuron** of a layer is its FFN neuron whose contribution (activation x ``W_down[dim, n]``, x the post-FFN
  norm gain's sign) points the same way as that layer's write; how much of the neuron's input reads the dim
  itself (through the pre-FFN norm gain) is reported as ``reads_dim``: a remover reads the value it cancels;
* tokens vote: the ME layer, dim and neuron are the most common among the first tokens whose path holds a
  persistent massive value.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from melayer.analysis.criterion import Criterion
from melayer.models.experts import route
from melayer.models.lazy import ExpertLayer, LazyWeights, Matrix, open_weights
from melayer.util.console import track
from melayer.util.errors import MelayerError, UnsupportedArchitecture, one_line
from melayer.util.results import Result

if TYPE_CHECKING:
    from melayer.models.loading import DType

SCHEMA = "melayer.weights/2"
REMOVE_SHARE = 0.1  # a layer removes when its write takes away more than this share of |x| on the dim
PEAK_SHARE = 0.01  # writes below this share of the dim's largest |x| on the path get no role

RULE = ("path: the first token's residual stream computed from the weights (embedding, then per layer "
        "x += post_attn_norm(o(v(pre_attn_norm(x)))) -- exact at position 0 -- and x += post_ffn_norm(ffn(pre_ffn_norm(x))); "
        "in a parallel block both read the layer input; each branch times the config's residual_multiplier; an MoE "
        "FFN is its router's chosen experts, weighted, plus a shared expert); "
        "massive dim = the dim that is the path's largest |x| at the most layers; ME layer = first layer where that "
        "dim has |x| > max(abs_min, median_ratio x the token's ordinary median) and > persist_ratio x its own median, "
        "and persists (> abs_min and > persist_ratio x own median in the next layer and in >= persist_frac of later "
        "layers); ordinary median = the token's median |x| at the layer before any dim first exceeds persist_ratio x "
        "its median; a layer creates when its write on the dim has the sign the earlier layers gave it, removes when "
        "it has the other sign and takes > {remove:.0%} of |x| (writes under {peak:.0%} of the dim's peak |x| get no role); neuron = the FFN neuron with the largest contribution "
        "in the direction of its layer's write; tokens vote")
ASSUMPTIONS = [
    "the massive activation sits on the first token of a text (position 0), as in the scan",
    "the first tokens are the BOS token when the tokenizer always adds it, else BOS and a spread of vocabulary ids "
    "(which token starts a text is data; the vote says how much it matters)",
    "at position 0 attention sees only the token itself, so its output is o(v(x)): exact for softmax attention "
    "with any positional scheme; attention with extra terms at position 0 (sink logits, ALiBi biases to nothing) "
    "is still o(v(x)), but a learned attention bias added outside softmax is not modelled",
    "multi-head latent attention (DeepSeek) is o(kv_b(norm(latent)))'s value heads, the latent being "
    "kv_a_proj_with_mqa's first kv_lora_rank outputs",
    "the layer is sequential (attention, then FFN) or parallel (both read the layer input); its FFN is dense or a "
    "mixture of experts: the router's softmax, each token's num_experts_per_tok best experts (weights renormalised "
    "unless the config's norm_topk_prob is false), or (DeepSeek-V3, GLM-4-MoE) sigmoid scores, experts chosen by "
    "score + correction bias among the topk_group best of n_group groups, weighted by score, renormalised, times "
    "routed_scaling_factor; act(gate) x up per expert, a shared expert scaled by the sigmoid of its gate or not "
    "gated; neuron n of expert e is e x I + n, the shared expert's last (other routers are refused)",
    "a family read from its config alone (no named map) was checked on a tiny random-weight twin: the path of the "
    "twin's weights equals the twin's own first-token hidden states (else the family is refused)",
    "the quantised weights of a GGUF file stand for the model (the path is computed from the dequantised values)",
]


@dataclass
class LayerRow:
    """One layer on the first token's path (medians over the voting tokens)."""

    layer: int
    top_dim: int  # the largest |x| after this layer (most common over tokens)
    top_value: float  # its |x|
    median: float  # the token's median |x| after this layer
    write: float  # signed write on the massive dim: + adds to |x|, - takes from it (attention + FFN)
    attn_write: float
    ffn_write: float
    role: str  # "creates", "removes" or ""
    neuron: int  # the FFN neuron contributing most in the direction of the write (on the massive dim)
    neuron_share: float  # its share of the FFN's write on the dim


@dataclass
class Confirmation:
    """A short scan of the layers around the candidate layers (the forward stops after the last one)."""

    layers: list[int]  # the hooked layers: each candidate layer on the massive dim, the one before and after
    prompts: int
    dim: int
    # per hooked layer: median over prompts of max|a| on the dim, of the layer's median |a|, the share of prompts
    # where the dim is massive there (emergence thresholds), and the most common top dim
    dim_max: dict[int, float]
    layer_median: dict[int, float]
    massive_share: dict[int, float]
    top_dim: dict[int, int]
    # per candidate layer: the share of prompts where the dim becomes massive there (massive at the layer, not
    # in the layer before, persisting into the next layer)
    emerges: dict[int, float]
    held: bool  # the predicted ME layer emerges in more than half of the prompts
    first_held: int | None  # the first candidate layer that does
    verdict: str
    seconds: float


@dataclass
class WeightsResult(Result):
    """Result of :func:`weights`; ``to_dict()`` is what ``weights.json`` holds and ``from_dict`` (or
    ``WeightsResult.load(path)``) reads it back."""

    kind = "weights"
    version = 2

    model: str
    source: str
    format: str
    arch: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    me_layer: int | None
    massive_dim: int | None
    neurons: list[int]  # the ME layer's creating neurons, best first
    super_weight: dict[str, Any] | None
    precursors: list[dict[str, Any]]
    removers: list[dict[str, Any]]  # later layers that take the massive value away, with their neuron
    layers: list[LayerRow]
    candidates: list[dict[str, Any]]  # the layers that write most into the massive dim, ranked
    tokens: list[dict[str, Any]]  # per first token: its path's ME layer, dim, neuron, peak |x|
    vote: dict[str, Any]  # how many tokens agree
    attention: str  # "o(v(x))" or why the attention path was left out
    criterion: dict[str, Any]
    cost: dict[str, Any]
    confirm: Confirmation | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def top_neuron(self) -> int | None:
        return self.neurons[0] if self.neurons else None

    def to_dict(self) -> dict[str, Any]:
        """The result as ``weights.json`` holds it (with the rule and the assumptions in words).

        Returns:
            JSON-ready data, with ``"schema": "melayer.weights/<version>"``.
        """
        return {"schema": SCHEMA, "rule": RULE.format(remove=REMOVE_SHARE, peak=PEAK_SHARE), "assumptions": ASSUMPTIONS, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsResult:
        """The result a ``weights.json`` holds.

        Args:
            data: a loaded ``weights.json`` (what :meth:`to_dict` returned).

        Returns:
            The weights result.
        """
        own = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in own}
        kw["layers"] = [LayerRow(**r) for r in data["layers"]]
        c = data.get("confirm")
        if c is not None:
            by_layer = ("dim_max", "layer_median", "massive_share", "top_dim", "emerges")
            confirm: dict[str, Any] = {k: ({int(l): v for l, v in c[k].items()} if k in by_layer else c[k]) for k in c}
            kw["confirm"] = Confirmation(**confirm)
        return cls(**kw)


def _proc_status_mb(name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """Resident memory now (Linux), else the peak so far."""
    now = _proc_status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter carries over the parent's peak
    into a process started by fork + exec."""
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------------
# the path


class _Path:
    """The first tokens' residual stream, layer by layer, from streamed weights."""

    def __init__(self, w: LazyWeights, threads: int) -> None:
        self.w = w
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads)) if threads > 1 else None
        a = w.arch
        self.act = _activation(w)
        self.eps = float(a.extra.get("norm_eps") or w.setting("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps",
                                                                 "norm_epsilon", "norm_eps") or 1e-6)
        self.layer_norm = a.norm_kind == "layer"
        self.heads = int(w.setting("num_attention_heads", "n_head") or 0)
        self.residual = float(w.setting("residual_multiplier") or 1.0)  # Granite scales both branches
        self.kv_heads = int(w.setting("num_key_value_heads") or self.heads or 0)

    def layer(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                                          torch.Tensor, torch.Tensor]:
        """One decoder layer: (its output, the attention's write or None if not found, the FFN's write, its neuron
        activations, the post-FFN norm's factor)."""
        o = self.attention(x, layer)
        if self.w.arch.parallel:  # the FFN reads the layer input, as the attention does
            f, z, factor = self.ffn(x, layer)
            return x + (o if o is not None else 0.0) + f, o, f, z, factor
        x = x + o if o is not None else x
        f, z, factor = self.ffn(x, layer)
        return x + f, o, f, z, factor

    def linear(self, key: str, x: torch.Tensor, bias_key: str | None = None) -> torch.Tensor:
        """x @ W.T (+ bias) for a stored projection, reduced block by block (W is never held whole; the blocks
        are spread over the threads)."""
        w = self.w
        shape = w.shape(key)
        transposed = w.stored_transposed(key)
        if len(shape) != 2 or shape[0 if transposed else 1] != x.shape[1]:
            raise MelayerError(f"{w.source}: tensor {key} has shape {tuple(shape)}, which does not take the "
                               f"{x.shape[1]} inputs the layer before gives it: a mismatched checkpoint")
        out = w.matmul(key, x, self.pool)
        if bias_key is not None:
            out = out + w.tensor(bias_key).reshape(-1)
        return out

    def many(self, jobs: list[tuple[str, torch.Tensor, str | None]]) -> list[torch.Tensor]:
        """Several independent projections (each one's blocks spread over the threads)."""
        return [self.linear(*j) for j in jobs]

    def prefetch(self, layer: int) -> None:
        """Start reading the tensors of ``layer`` into the page cache (a hint to the OS) while this one is reduced."""
        w = self.w
        if 0 <= layer < w.num_layers:
            a = w.arch_at(layer)
            keys = [w.path_key(layer, path) for path in (a.attn_v, a.attn_qkv, a.attn_o)]
            keys += [w.layer_key(layer, role) for role in ("gate", "up", "gate_up", "down", "router")]
            ex = w.experts(layer)
            if ex is not None:
                keys += sorted({m.key for mats in ex.inputs for m in mats.values()} | {m.key for m in ex.downs})
            w.prefetch([k for k in keys if k is not None])

    def norm(self, x: torch.Tensor, layer: int, role: str) -> torch.Tensor:
        w = self.w
        key = w.layer_key(layer, role)
        a = w.arch_at(layer)
        if a.path(role) is None:
            return x
        if self.layer_norm:
            x = x - x.mean(-1, keepdim=True)
            y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)
        else:
            y = self.rms(x)
        if key is not None:
            y = y * a.gain_from_weight(w.tensor(key).reshape(-1))
        bias = w.path_key(layer, a.path(role), "bias")
        return y + w.tensor(bias).reshape(-1) if bias is not None else y

    def rms(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` over its root mean square (with the norms' epsilon), per token."""
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)

    def embed(self, ids: list[int]) -> torch.Tensor:
        w = self.w
        key = w.model_key(w.arch.embed)
        if key is None:
            raise MelayerError(f"{w.source}: no token embedding ({w.arch.embed}.weight): the first token's path needs it")
        x = w.rows(key, ids)
        scale = w.arch.embed_scale
        x = x * (w.hidden_size ** 0.5 if scale == "sqrt_hidden" else float(scale))
        pos = w.model_key(w.arch.pos_embed)
        if pos is not None:  # position 0's row (OPT and BioGPT offset their positions by 2)
            x = x + w.rows(pos, [int(w.arch.extra.get("pos_row", 0))])
        return x

    def attention(self, x: torch.Tensor, layer: int) -> torch.Tensor | None:
        """The attention output at position 0, o(v(norm(x))), or None if this checkpoint's v/o are not found."""
        w, a = self.w, self.w.arch_at(layer)
        o_key = w.path_key(layer, a.attn_o)
        v_key = w.path_key(layer, a.attn_v) or w.path_key(layer, a.attn_qkv)
        if o_key is not None and v_key is None and (mla := self.latent_value(x, layer)) is not None:
            return self.post_attention(self.linear(o_key, mla, w.path_key(layer, a.attn_o, "bias")), layer)
        if o_key is None or v_key is None:
            return None
        h = self.norm(x, layer, "pre_attn_norm")
        fused = w.path_key(layer, a.attn_v) is None
        v = self.linear(v_key, h, w.path_key(layer, a.attn_qkv if fused else a.attn_v, "bias"))
        o_in = w.shape(o_key)[0 if w.stored_transposed(o_key) else 1]
        layout = a.extra.get("qkv_layout")
        if fused and layout == "per_head":  # GPT-NeoX: each head's q, k, v side by side
            v = v.reshape(v.shape[0], self.heads, 3, -1)[:, :, 2].reshape(v.shape[0], -1)
        elif fused and layout in ("stacked", "grouped") and self.heads and o_in % self.heads == 0:
            head_dim = o_in // self.heads  # fewer key/value heads than queries: their count from the shapes
            kv = (v.shape[1] - o_in) // (2 * head_dim)
            if kv < 1 or self.heads % kv or v.shape[1] != (self.heads + 2 * kv) * head_dim:
                raise MelayerError(f"{w.source}: {v_key} has {v.shape[1]} outputs, not (queries + 2 x key/value "
                                   f"heads) x {head_dim} for {self.heads} query heads: a mismatched checkpoint")
            if layout == "stacked":  # all queries, all keys, then the kv values
                v = v[:, v.shape[1] - kv * head_dim:]
            else:  # per key/value head: its queries, its key, its value
                v = v.reshape(v.shape[0], kv, self.heads // kv + 2, head_dim)[:, :, -1].reshape(v.shape[0], -1)
        elif fused:  # q, k, v stacked: v is the last kv_heads x head_dim outputs
            kv = self.kv_heads or self.heads
            head_dim = o_in // max(1, self.heads)
            v = v[:, v.shape[1] - kv * head_dim:] if self.heads else v[:, -o_in:]
        if v.shape[1] != o_in:  # grouped-query attention: each KV head serves heads / kv_heads query heads
            kv = v.shape[1] // (o_in // self.heads) if self.heads else (self.kv_heads or 1)  # from the shapes
            v = v.reshape(v.shape[0], kv, -1).repeat_interleave(o_in // v.shape[1], dim=1).reshape(v.shape[0], -1)
        return self.post_attention(self.linear(o_key, v, w.path_key(layer, a.attn_o, "bias")), layer)

    def post_attention(self, out: torch.Tensor, layer: int) -> torch.Tensor:
        """What the attention adds: its output after the post-attention norm, times the residual multiplier (each
        branch scaled before its residual add, as Granite's)."""
        out = self.norm(out, layer, "post_attn_norm") if self.w.layer_key(layer, "post_attn_norm") else out
        return out * self.residual

    def latent_value(self, x: torch.Tensor, layer: int) -> torch.Tensor | None:
        """Multi-head latent attention's values (DeepSeek-V2/V3, Kimi-K2: the config's ``kv_lora_rank``): the
        input's compressed key/value latent (``kv_a_proj_with_mqa``'s first ``kv_lora_rank`` outputs), RMS-normed
        with ``kv_a_layernorm``'s gain, expanded by ``kv_b_proj`` into each head's key and value, the value its
        last ``v_head_dim``. None where the layer holds no such projections."""
        w, base = self.w, self.w.arch_at(layer).attn
        rank, nope, width = (int(w.setting(k) or 0) for k in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"))
        keys = [w.path_key(layer, f"{base}.{name}") for name in MLA_PROJECTIONS]
        if not base or not rank or not width or None in keys or not self.heads:
            return None
        down, norm, up = (k for k in keys if k is not None)
        h = self.norm(x, layer, "pre_attn_norm")
        c = self.linear(down, h, w.path_key(layer, f"{base}.{MLA_PROJECTIONS[0]}", "bias"))[:, :rank]
        c = self.rms(c) * w.tensor(norm).reshape(-1)
        kv = self.linear(up, c, w.path_key(layer, f"{base}.{MLA_PROJECTIONS[2]}", "bias"))
        if kv.shape[1] != self.heads * (nope + width):
            raise MelayerError(f"{w.source}: {up} has {kv.shape[1]} outputs, not {self.heads} heads x ({nope} + "
                               f"{width}) (qk_nope_head_dim + v_head_dim): a mismatched checkpoint")
        return kv.reshape(kv.shape[0], self.heads, nope + width)[:, :, nope:].reshape(kv.shape[0], -1)

    def ffn(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(FFN output after the post-FFN norm and the residual multiplier, neuron activations, the per-dim factor
        from the down projection's output to what is added: the norm's out/in times the multiplier)."""
        w = self.w
        h = self.norm(x, layer, "pre_ffn_norm")
        experts = w.experts(layer)
        raw, z = self.dense(h, layer) if experts is None else self.moe(h, layer, experts)
        if w.layer_key(layer, "post_ffn_norm") is None:
            return raw * self.residual, z, torch.full_like(raw, self.residual)
        out = self.norm(raw, layer, "post_ffn_norm") * self.residual
        return out, z, out / torch.where(raw == 0, torch.ones_like(raw), raw)

    def dense(self, h: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A dense FFN (or an MoE layer's shared expert) on the normed input: (output, neuron activations)."""
        w, a = self.w, self.w.arch_at(layer)
        gate: torch.Tensor | None
        if a.gate_up is not None:
            key = w.layer_key(layer, "gate_up")
            if key is None:
                raise MelayerError(f"{w.source}: no fused gate/up projection ({a.gate_up}) for layer {layer}")
            gu = self.linear(key, h, w.path_key(layer, a.gate_up, "bias"))
            gate, up = gu[:, : gu.shape[1] // 2], gu[:, gu.shape[1] // 2:]
        else:
            keys = {r: k for r in ("gate", "up") if (k := w.layer_key(layer, r)) is not None}
            if "up" not in keys:
                raise MelayerError(f"{w.source}: no up projection ({a.up}) for layer {layer}")
            outs = dict(zip(keys, self.many([(k, h, w.path_key(layer, a.path(r), "bias")) for r, k in keys.items()])))
            gate, up = outs.get("gate"), outs["up"]
        z = self.act(gate) * up if gate is not None else self.act(up)
        down = w.layer_key(layer, "down")
        if down is None:
            raise MelayerError(f"{w.source}: no down projection ({a.down}) for layer {layer}")
        return self.linear(down, z, w.path_key(layer, a.down, "bias")), z

    def moe(self, h: torch.Tensor, layer: int, ex: ExpertLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """An MoE layer on the normed input: the router's softmax, each token's top-k experts (weights
        renormalised unless the config's ``norm_topk_prob`` is false), only the chosen experts' tensors read; a
        shared expert scaled by the sigmoid of its gate. Activations are numbered expert by expert (``e x I + n``,
        the shared expert's last), each times its routing weight (the factor it enters the output with)."""
        w, a = self.w, self.w.arch_at(layer)
        router = w.layer_key(layer, "router")
        k = int(w.setting("num_experts_per_tok") or 0)
        if router is None or k < 1:
            raise MelayerError(f"{w.source}: layer {layer} is a mixture of experts without a router ({a.router}) or "
                               "num_experts_per_tok in its config")
        n, inter = ex.num_experts, ex.inter
        routing = str((a.extra.get("experts") or {}).get("routing") or "softmax")
        correction = w.path_key(layer, a.router, "e_score_correction_bias")
        bias = w.path_key(layer, a.router, "bias")
        logits = self.linear(router, h, bias if routing == "softmax" else None)
        top_w, top_i = route(logits, min(k, n), routing, norm=w.setting("norm_topk_prob") in (None, True),
                             bias=w.tensor(correction).reshape(-1) if correction and routing != "softmax" else None,
                             n_group=int(w.setting("n_group") or 1), topk_group=int(w.setting("topk_group") or 1),
                             scale=float(w.setting("routed_scaling_factor") or 1.0))
        z = torch.zeros(h.shape[0], n * inter)
        out = torch.zeros(h.shape[0], h.shape[1])
        for e in sorted(set(top_i.flatten().tolist())):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            weight = top_w[rows, slot, None]
            act = self.expert_act(h[rows], ex, e) * weight
            z[rows, e * inter:(e + 1) * inter] = act
            down = ex.downs[e]
            y = w.matmul(down.key, act, self.pool, rows=down.rows, transposed=down.transposed)
            if ex.down_bias is not None:
                y = y + weight * w.rows(ex.down_bias, [e])
            out[rows] += y
        if w.layer_key(layer, "down") is not None:  # a shared expert, gated by a sigmoid (Qwen2-MoE) or not
            shared, zs = self.dense(h, layer)
            gate = w.layer_key(layer, "shared_gate")
            g = torch.sigmoid(self.linear(gate, h)) if gate is not None else torch.ones(h.shape[0], 1)
            out, z = out + g * shared, torch.cat([z, g * zs], dim=1)
        return out, z

    def expert_act(self, h: torch.Tensor, ex: ExpertLayer, e: int) -> torch.Tensor:
        """Expert ``e``'s neuron activations, act(gate) x up, for the tokens ``h``."""
        w, mats, inter = self.w, ex.inputs[e], ex.inter
        outs = {role: w.matmul(m.key, h, self.pool, rows=m.rows, transposed=m.transposed) for role, m in mats.items()}
        if ex.in_bias is not None:
            for role in outs:
                outs[role] = outs[role] + w.rows(ex.in_bias, [e])
        if "gate_up" in outs:
            gu = outs.pop("gate_up")
            outs.update(zip(("gate", "up"), (gu[:, 0::2], gu[:, 1::2]) if ex.interleaved else (gu[:, :inter], gu[:, inter:])))
        return self.act(outs["gate"]) * outs["up"] if "gate" in outs else self.act(outs["up"])


# multi-head latent attention's key/value path, relative to the attention module: the latent's projection, its
# RMS norm, and its expansion into the heads' keys and values (transformers' DeepSeek-V2/V3 modules)
MLA_PROJECTIONS = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _gelu_new(x: torch.Tensor) -> torch.Tensor:  # GPT-2's tanh approximation, as transformers writes it
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# the common FFN activations by their transformers names, the same functions as transformers' ACT2FN (a test
# checks each against it): importing ACT2FN costs seconds, more than reading a small checkpoint
ACTIVATIONS: dict[str, Any] = {"silu": torch.nn.functional.silu, "swish": torch.nn.functional.silu,
                               "relu": torch.nn.functional.relu, "gelu": torch.nn.functional.gelu,
                               "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_new}


def _activation(w: LazyWeights) -> Any:
    name = w.setting("hidden_activation", "hidden_act", "activation_function", "activation")
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise MelayerError(f"{w.source}: unknown FFN activation {name!r}; the first token's path needs it")
    fn = ACT2FN[name]
    if isinstance(fn, torch.nn.Module) and any(True for _ in fn.parameters()):  # Apertus' xIELU
        raise UnsupportedArchitecture(f"{w.source}: its FFN activation {name!r} has parameters learned per layer, "
                                      "which melayer weights does not read; load the model and run melayer scan")
    return fn


def first_tokens(w: LazyWeights, n_tokens: int) -> tuple[list[int], str]:
    """The first tokens to follow, and why: BOS alone when the tokenizer always adds it, else BOS (if any) and
    ``n_tokens`` ids spread evenly over the vocabulary (the embedding's rows)."""
    bos, adds = w.first_token()
    vocab = w.shape(w.model_key(w.arch.embed) or "")[0] if w.model_key(w.arch.embed) else 0
    if bos is not None and adds and 0 <= bos < vocab:
        return [bos], "the tokenizer always adds BOS"
    spread = sorted({int(i * vocab / n_tokens) for i in range(n_tokens)} - {bos})
    ids = ([bos] if bos is not None and 0 <= bos < vocab else []) + spread
    return ids, f"the tokenizer adds no BOS: {'BOS and ' if bos is not None else ''}{len(spread)} ids spread over the vocabulary"


# ------------------------------------------------------------------------------------------------------------
# reading the ME layer off one path


def path_me_layer(values: torch.Tensor, start_median: float, crit: Criterion) -> dict[str, Any] | None:
    """The ME layer of one token's path. ``values``: (layers, hidden) signed x after each layer;
    ``start_median``: the median |x| of the path's input (the embedding). None if nothing massive persists.

    Returns the massive dim, the ME layer, the ordinary median and the precursors (dims massive earlier that do
    not persist)."""
    a = values.abs()
    n_layers = a.shape[0]
    med = a.median(dim=1).values
    top = a.argmax(dim=1)
    counts = Counter(top.tolist())
    dim = min(counts, key=lambda d: (-counts[d], -float(a[:, d].max()), d))
    # the ordinary median: the token's median before any dim first dominates it
    spiky = [i for i in range(n_layers) if float(a[i, top[i]]) > crit.persist_ratio * float(med[i])]
    first_spike = spiky[0] if spiky else n_layers
    ordinary = float(med[first_spike - 1]) if first_spike > 0 else start_median

    def massive(layer: int, d: int) -> bool:
        v = float(a[layer, d])
        return (v > max(crit.abs_min, crit.median_ratio * ordinary) and v > crit.persist_ratio * float(med[layer]))

    def persists(layer: int, d: int) -> bool:
        later = [crit.persists(float(a[i, d]), float(med[i])) for i in range(layer + 1, n_layers)]
        return (not later) or (later[0] and sum(later) >= crit.persist_frac * len(later))

    precursors = []
    me = None
    for layer in range(n_layers):
        for d in a[layer].topk(min(4, a.shape[1])).indices.tolist():
            if not massive(layer, d):
                continue
            if persists(layer, d) and d == dim:
                me = layer
                break
            if d != dim and not persists(layer, d):
                precursors.append((layer, d))
        if me is not None:
            break
    if me is None:
        return None
    return {"me_layer": me, "dim": dim, "ordinary_median": ordinary, "precursors": precursors,
            "peak": float(a[:, dim].max())}


TWIN_TOLERANCE = 1e-3  # the largest relative difference allowed between the path and a twin's own stream


def check_on_twin(w: LazyWeights) -> None:
    """Refuse a family whose first-token path melayer does not compute as the model does. The map of a family
    known only from its config is derived on a tiny random-weight twin (:func:`~melayer.models.derive.config_twin`);
    here the twin is saved as a checkpoint, read back through ``w``'s map and followed like any checkpoint, and its
    path must equal the twin's own hidden states for its first token (within :data:`TWIN_TOLERANCE` of each
    layer's largest value) on every layer but the last (which some families norm). Position embeddings with an
    offset, residual or embedding multipliers, attention that is not o(v(x)), another routing: any of them shows
    as a difference, and the family is refused in one line instead of read wrong. Checked once per config."""
    key = json.dumps(w.config, sort_keys=True, default=str) + repr(w.arch)
    with _TWIN_LOCK:
        if key not in _TWIN_ERRORS:
            _TWIN_ERRORS[key] = _twin_error(w.config, w.arch)
        error = _TWIN_ERRORS[key]
    if error:
        raise UnsupportedArchitecture(f"{w.source}: model_type {w.model_type!r}: {error}")


_TWIN_ERRORS: dict[str, str] = {}
_TWIN_LOCK = threading.Lock()


def _twin_error(config: dict[str, Any], arch: Any) -> str:
    from melayer.models.derive import config_twin
    from melayer.models.lazy import SafetensorsWeights

    twin = config_twin(config)
    token = int(getattr(twin.config, "bos_token_id", None) or 0)
    try:
        with torch.no_grad():
            states = twin(input_ids=torch.tensor([[token]]), output_hidden_states=True, use_cache=False).hidden_states
    except Exception as exc:  # transformers' own failure to run the family alone: nothing to check against
        return (f"a tiny twin of the family cannot run ({type(exc).__name__}), so melayer weights cannot check its "
                "path; load the model and run melayer scan")
    with tempfile.TemporaryDirectory(prefix="melayer-twin-") as directory:
        twin.save_pretrained(directory)
        tw = SafetensorsWeights(Path(directory), arch=arch)
        path = _Path(tw, 1)
        xs = []
        try:
            x = path.embed([token])
            for layer in range(min(tw.num_layers, len(states) - 1) - 1):
                x = path.layer(x, layer)[0]
                xs.append(x)
        except Exception as exc:  # e.g. a layer whose shapes the path does not expect
            why = one_line(exc).replace(f"{directory}: ", "") if isinstance(exc, MelayerError) else type(exc).__name__
            return (f"melayer weights cannot follow the first token through a tiny twin of the family ({why}); "
                    "load the model and run melayer scan")
        for layer, x in enumerate(xs):
            want = states[layer + 1][0, 0].float()
            err = float((x[0] - want).abs().max()) / max(float(want.abs().max()), 1e-12)
            if not err <= TWIN_TOLERANCE:
                return (f"melayer weights' first-token path does not reproduce the family's own hidden states (a "
                        f"relative difference of {err:.2g} at layer {layer} of a tiny twin), so it cannot read this "
                        "family's weights alone; load the model and run melayer scan")
    return ""


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median()) if xs else 0.0


def candidates(
    model: str | LazyWeights | None = None,
    *,
    arch: Any = None,
    n_tokens: int = 16,
    top_k: int = 10,
    top_neurons: int = 3,
    criterion: Criterion | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> WeightsResult:
    """Predict the ME layer, massive dim and creating neuron of a checkpoint from its weights alone (see the
    module docstring), and the layers that remove the massive value again.

    ``model``: an embedded name (``gemma-3-270m``, ``smollm2-135m``), a ``.gguf`` file, a local Hugging Face
    directory (safetensors), or an opened :class:`~melayer.models.lazy.LazyWeights`. ``n_tokens``: vocabulary
    ids followed when the tokenizer adds no BOS. ``threads``: threads reading and reducing blocks of each tensor
    (default: the CPUs, at most 4).
    """
    if n_tokens < 1 or top_k < 1 or top_neurons < 1:
        raise MelayerError("n_tokens, top_k and top_neurons must be >= 1")
    crit = criterion or Criterion()
    t0 = time.perf_counter()
    rss0 = _rss_mb()
    w = model if isinstance(model, LazyWeights) else open_weights(model, arch)
    if w.num_layers < 1:
        raise MelayerError(f"{w.source}: the config gives no number of layers")
    if w.arch_from_config:
        check_on_twin(w)
    threads = threads or min(4, os.cpu_count() or 1)
    path = _Path(w, threads)
    ids, why = first_tokens(w, n_tokens)
    x = path.embed(ids)
    start_median = [float(v) for v in x.abs().median(dim=1).values]
    xs, attn_w, ffn_w, acts, factors = [], [], [], [], []
    attention = "o(v(x))"
    try:
        path.prefetch(0)
        for layer in track(range(w.num_layers), f"following the first token through {w.name}", enabled=progress):
            path.prefetch(layer + 1)
            x, o, f, z, factor = path.layer(x, layer)
            if o is None:
                attention = (f"left out: no {w.arch.attn_v or w.arch.attn_qkv} / {w.arch.attn_o} weights found "
                             "(the path is attention-free)")
                o = torch.zeros_like(x)
            xs.append(x.clone())
            attn_w.append(o)
            ffn_w.append(f)
            acts.append(z)
            factors.append(factor)
    finally:
        if path.pool is not None:
            path.pool.shutdown()
    stream = torch.stack(xs)  # (layers, tokens, hidden)
    per_token = [path_me_layer(stream[:, k], start_median[k], crit) for k in range(len(ids))]
    voting = [(k, r) for k, r in enumerate(per_token) if r is not None]
    notes = []
    inter = acts[0].shape[1]
    if not voting:
        notes.append("no first token's path holds a persistent massive value: no ME layer predicted")
        me = dim = None
    else:
        votes = Counter((r["me_layer"], r["dim"]) for _, r in voting)
        (me, dim), _ = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))
    agree = [k for k, r in voting if (r["me_layer"], r["dim"]) == (me, dim)]
    rows, neurons_by_layer = _layer_rows(w, stream, attn_w, ffn_w, acts, factors, dim, agree or list(range(len(ids))),
                                         top_neurons)
    neurons = neurons_by_layer.get(me, []) if me is not None else []
    tokens = []
    for k, r in enumerate(per_token):
        entry: dict[str, Any] = {"token_id": ids[k], "me_layer": None, "dim": None, "neuron": None, "peak": None}
        if r is not None:
            write = _contributions(w, acts[r["me_layer"]][k:k + 1], factors[r["me_layer"]][k:k + 1], r["me_layer"],
                                   r["dim"], stream, k)
            entry.update(me_layer=r["me_layer"], dim=r["dim"], neuron=int(write.argmax()), peak=round(r["peak"], 1),
                         precursors=[list(p) for p in r["precursors"]])
        tokens.append(entry)
    precursors = []
    if agree:
        pre = Counter((layer, d) for k, r in voting if k in agree for layer, d in r["precursors"])
        precursors = [{"layer": layer, "dim": d, "share": c / len(agree)} for (layer, d), c in sorted(pre.items())
                      if c / len(agree) >= 0.5]
    removers = [{"layer": r.layer, "neuron": r.neuron, "write": r.write, "neuron_share": r.neuron_share}
                for r in rows if r.role == "removes" and me is not None and r.layer > me]
    for rem in removers:
        rem["reads_dim"] = _reads_dim(w, rem["layer"], rem["neuron"], dim)  # type: ignore[arg-type]
    ranked = sorted(rows, key=lambda r: -abs(r.write))[:top_k]
    cands = [{"rank": i + 1, "layer": r.layer, "role": r.role, "write": r.write, "neuron": r.neuron}
             for i, r in enumerate(ranked)]
    sw = None
    if me is not None and neurons:
        sw = _super_weight(w, me, dim, neurons[0])  # type: ignore[arg-type]
        sw["reads_dim"] = _reads_dim(w, me, neurons[0], dim)  # type: ignore[arg-type]
    vote = {"first_tokens": why, "tokens": len(ids), "with_massive": len(voting), "agree": len(agree),
            "share": len(agree) / len(ids)}
    peak = _peak_rss_mb()
    cost = {"seconds": round(time.perf_counter() - t0, 3), "threads": threads, "tensors_read": w.tensors_read,
            "bytes_read_mb": round(w.bytes_read / 2**20, 1), "max_live_tensors": w.max_live,
            "peak_rss_mb": round(peak, 1), "peak_rss_above_start_mb": round(peak - rss0, 1)}
    return WeightsResult(model=w.name, source=w.source, format=w.format, arch=w.arch.name, model_type=w.model_type,
                         num_layers=w.num_layers, hidden_size=w.hidden_size,
                         intermediate_size=acts[me].shape[1] if me is not None else inter, me_layer=me,
                         massive_dim=dim, neurons=neurons, super_weight=sw, precursors=precursors, removers=removers,
                         layers=rows, candidates=cands, tokens=tokens, vote=vote, attention=attention,
                         criterion=crit.to_dict(), cost=cost, notes=notes)


def _contributions(w: LazyWeights, z: torch.Tensor, factor: torch.Tensor, layer: int, dim: int,
                   stream: torch.Tensor, k: int) -> torch.Tensor:
    """Per FFN neuron: its contribution to ``dim`` at ``layer`` for token ``k``, signed so that + points the way
    the dim's value ends up (activation x W_down[dim, n] x the post-FFN norm's factor on dim)."""
    row = _down_row(w, layer, dim)
    sign = float(torch.sign(stream[layer, k, dim])) or 1.0
    return z[0] * row * float(factor[0, dim]) * sign


def _down_row(w: LazyWeights, layer: int, dim: int) -> torch.Tensor:
    """W_down[dim, :] (what each neuron writes into ``dim``; an MoE layer's experts side by side, then its shared
    expert), read alone where the storage allows."""
    ex = w.experts(layer)
    parts = [] if ex is None else [w.matrix_row(d.key, dim, d.rows, d.transposed) for d in ex.downs]
    key = w.layer_key(layer, "down")
    if key is not None:
        parts.append(w.matrix_row(key, dim))
    return torch.cat(parts)


def _neuron_matrices(w: LazyWeights, layer: int, neuron: int) -> tuple[list[torch.Tensor], Matrix, int, int | None]:
    """A neuron's input rows (gate and up, what it reads), its down projection, its index there and its expert
    (None for a dense FFN or the shared expert)."""
    ex = w.experts(layer)
    if ex is not None and neuron < ex.num_experts * ex.inter:
        e, n = divmod(neuron, ex.inter)
        rows = []
        for role, m in ex.inputs[e].items():
            picks = [n] if role != "gate_up" else ([2 * n, 2 * n + 1] if ex.interleaved else [n, ex.inter + n])
            rows += [w.matrix_row(m.key, i, m.rows, m.transposed) for i in picks]
        return rows, ex.downs[e], n, e
    n = neuron - (ex.num_experts * ex.inter if ex is not None else 0)
    rows = []
    for role in ("gate_up",) if w.arch_at(layer).gate_up is not None else ("gate", "up"):
        key = w.layer_key(layer, role)
        if key is None:
            continue
        size = w.shape(key)[1 if w.stored_transposed(key) else 0] // 2
        rows += [w.matrix_row(key, i) for i in ([n, n + size] if role == "gate_up" else [n])]
    return rows, Matrix(w.layer_key(layer, "down") or "", None, w.stored_transposed(w.layer_key(layer, "down") or "")), n, None


def _reads_dim(w: LazyWeights, layer: int, neuron: int, dim: int) -> float:
    """How much of ``neuron``'s input reads ``dim``: |g_pre[dim] W_in[neuron, dim]| / ||g_pre * W_in[neuron]||
    (geometric mean over gate and up; 1 = it reads nothing else)."""
    gain = w.norm_gain(layer, "pre_ffn_norm")
    g = gain.reshape(-1).abs() if gain is not None else None
    shares = []
    for m in _neuron_matrices(w, layer, neuron)[0]:
        m = m * g if g is not None else m
        norm = float(m.norm())
        shares.append(abs(float(m[dim])) / norm if norm > 0 else 0.0)
    return float(torch.tensor(shares).log().mean().exp()) if shares and min(shares) > 0 else 0.0


def _super_weight(w: LazyWeights, layer: int, dim: int, neuron: int) -> dict[str, Any]:
    _, down, n, expert = _neuron_matrices(w, layer, neuron)
    value = float(w.matrix_row(down.key, dim, down.rows, down.transposed)[n])
    sample = torch.cat([rows.reshape(-1)[:: max(1, rows.numel() // 4096)] for _, rows in w.chunks(down.key, rows=down.rows)])
    med = float(sample.abs().median())
    if len(w.shape(down.key)) == 3:  # one expert of a fused (E, out, in) or (E, in, out) tensor
        index = [expert, n, dim] if down.transposed else [expert, dim, n]
    else:
        index = [n, dim] if down.transposed else [dim, n]
    return {"layer": layer, "row": dim, "col": neuron, "tensor": w.disk_key(down.key), "stored_index": index,
            "expert": expert, "value": value, "ratio_to_median": abs(value) / med if med > 0 else None}


def _layer_rows(w: LazyWeights, stream: torch.Tensor, attn_w: list[torch.Tensor], ffn_w: list[torch.Tensor],
                acts: list[torch.Tensor], factors: list[torch.Tensor], dim: int | None, tokens: list[int],
                top_neurons: int) -> tuple[list[LayerRow], dict[int, list[int]]]:
    """Per layer (medians over ``tokens``): the top dim, and the signed write on the massive dim with its role
    and leading neuron."""
    rows, neurons = [], {}
    peak = float(stream[:, tokens, dim].abs().median(dim=1).values.max()) if dim is not None else 0.0
    for layer in range(stream.shape[0]):
        a = stream[layer, tokens].abs()
        tops = Counter(a.argmax(dim=1).tolist())
        top = min(tops, key=lambda d: (-tops[d], d))
        role, neuron, share = "", -1, 0.0
        write = attn = ffn = 0.0
        if dim is not None:
            before = stream[layer - 1, tokens, dim] if layer > 0 else torch.zeros(len(tokens))
            after = stream[layer, tokens, dim]
            # the direction of the value: where it ends when the layer grows it (a creating write may flip a
            # small earlier sign), where it was when the layer shrinks it
            ref = torch.where(after.abs() >= before.abs(), torch.sign(after), torch.sign(before))
            write = _median([float(v) for v in (after.abs() - before.abs())])
            attn = _median([float(v) for v in attn_w[layer][tokens, dim] * ref])
            ffn = _median([float(v) for v in ffn_w[layer][tokens, dim] * ref])
            base = _median([float(v) for v in before.abs()])
            if abs(write) > REMOVE_SHARE * base and abs(write) > PEAK_SHARE * peak:
                role = "creates" if write > 0 else "removes"
            if role:
                row = _down_row(w, layer, dim)
                z = acts[layer][tokens]
                contrib = (z * row[None, :] * factors[layer][tokens, dim][:, None] * ref[:, None]).median(dim=0).values
                signed = contrib if role == "creates" else -contrib
                order = signed.topk(min(top_neurons, signed.numel()))
                neuron = int(order.indices[0])
                total = float(signed.clamp_min(0).sum())
                share = float(signed[neuron]) / total if total > 0 else 0.0
                neurons[layer] = [int(i) for i in order.indices]
        rows.append(LayerRow(layer=layer, top_dim=top, top_value=_median([float(v) for v in a[:, top]]),
                             median=_median([float(v) for v in a.median(dim=1).values]), write=write, attn_write=attn,
                             ffn_write=ffn, role=role, neuron=neuron, neuron_share=share))
    return rows, neurons


# ------------------------------------------------------------------------------------------------------------


def confirm_candidates(lm: Any, result: WeightsResult, prompts: list[str] | None = None, *, n_prompts: int = 8,
                       criterion: Any = None) -> Confirmation:
    """Check the prediction with a short scan that hooks only the candidate layers on the massive dim (the
    predicted ME layer and the ranked layers writing that dim), each with the layer before and after; the forward
    stops after the last hooked layer. A candidate holds when, in most prompts, the dim is massive at its output
    (emergence thresholds), was not in the layer before, and persists into the next layer (persistence
    thresholds)."""
    from melayer.analysis.scan import default_prompts
    from melayer.capture.encoding import batches, encode
    from melayer.capture.hooks import Hooks
    from melayer.capture.sites import forward_until, read_site

    crit = criterion or Criterion()
    if n_prompts < 1:
        raise MelayerError("--n-prompts must be >= 1")
    if result.me_layer is None or result.massive_dim is None:
        raise MelayerError("the weights predict no ME layer: nothing to confirm (run `melayer scan`)")
    if lm.num_layers != result.num_layers or lm.hidden_size != result.hidden_size:
        raise MelayerError(f"the loaded model ({lm.num_layers} layers, hidden {lm.hidden_size}) is not the ranked "
                           f"checkpoint ({result.num_layers} layers, hidden {result.hidden_size})")
    texts = list(prompts or default_prompts())[:n_prompts]
    me, dim = result.me_layer, result.massive_dim
    cands = sorted({me} | {c["layer"] for c in result.candidates if c["role"] == "creates"})
    layers = sorted({x for c in cands for x in (c - 1, c, c + 1) if 0 <= x < lm.num_layers})
    t0 = time.perf_counter()
    # per hooked layer, per prompt: (max |a| on dim over real tokens, median |a| over real tokens and dims, top dim)
    seen: dict[int, list[tuple[float, float, int]]] = {layer: [] for layer in layers}
    real_mask: list[torch.Tensor] = []

    def reader(layer: int) -> Any:
        def fn(h: torch.Tensor) -> None:
            h = h.detach().float().abs()
            for row in range(h.shape[0]):
                real = h[row][real_mask[0][row]]
                seen[layer].append((float(real[:, dim].max()), float(real.median()), int(real.max(dim=0).values.argmax())))

        return fn

    with torch.no_grad(), Hooks() as hooks:
        for layer in layers:
            read_site(hooks, lm, layer, "resid_out", reader(layer))
        for _, chunk in batches(texts, 8):
            batch = encode(lm, chunk)
            real_mask[:] = [batch["attention_mask"].bool()]
            forward_until(lm, batch, last_layer=layers[-1])
    n = len(texts)

    def massive(layer: int, i: int) -> bool:
        v, m, _ = seen[layer][i]
        return v > crit.cutoff(m)

    emerges = {}
    for c in cands:
        rows = [massive(c, i) and not (c - 1 in seen and massive(c - 1, i))
                and (c + 1 not in seen or crit.persists(*seen[c + 1][i][:2])) for i in range(n)]
        emerges[c] = sum(rows) / n
    held = emerges[me] > 0.5
    first = next((c for c in cands if emerges[c] > 0.5), None)
    if held:
        verdict = f"held: dim {dim} becomes massive at layer {me} in {emerges[me]:.0%} of {n} prompts"
    elif first is not None:
        verdict = (f"not held at layer {me} ({emerges[me]:.0%} of {n} prompts); among the candidates, dim {dim} "
                   f"becomes massive first at layer {first} ({emerges[first]:.0%})")
    else:
        verdict = (f"not held: dim {dim} becomes massive at none of the candidate layers {cands}; "
                   "run `melayer scan` for the ME layer")

    def med(xs: list[float]) -> float:
        return float(torch.tensor(xs).median())

    def top_dim(layer: int) -> int:  # the dim most often on top; ties to the lowest dim
        dims = [d for *_, d in seen[layer]]
        return min(set(dims), key=lambda d: (-dims.count(d), d))

    top = {layer: top_dim(layer) for layer in layers}
    return Confirmation(layers=layers, prompts=n, dim=dim,
                        dim_max={layer: med([v for v, _, _ in seen[layer]]) for layer in layers},
                        layer_median={layer: med([m for _, m, _ in seen[layer]]) for layer in layers},
                        massive_share={layer: sum(massive(layer, i) for i in range(n)) / n for layer in layers},
                        top_dim=top, emerges=emerges, held=held, first_held=first, verdict=verdict,
                        seconds=round(time.perf_counter() - t0, 3))


def weights(
    model: str | LazyWeights | None = None,
    *,
    arch: Any = None,
    n_tokens: int = 16,
    top_k: int = 10,
    top_neurons: int = 3,
    threads: int | None = None,
    confirm: bool = False,
    lm: Any = None,
    prompts: list[str] | None = None,
    n_prompts: int = 8,
    dtype: DType = "float32",
    progress: bool = True,
) -> WeightsResult:
    """Predict the ME layer, massive dim and creating neuron from the weights alone (``melayer weights``): the
    first token's path through the checkpoint, read tensor by tensor from the files (no model object).

    Args:
        model: ``gemma-3-270m`` (default) or ``smollm2-135m``, a ``.gguf`` file, a local Hugging Face directory
            (safetensors), or an opened :class:`~melayer.models.lazy.LazyWeights`.
        arch: an architecture-map override (a mapped family name, a dict of role -> module path or a JSON file).
        n_tokens: vocabulary ids followed as first token when the tokenizer adds no BOS.
        top_k: layers listed (those writing most into the massive dim).
        top_neurons: neurons kept per layer.
        threads: threads reading and reducing blocks of each tensor (default: the CPUs, at most 4).
        confirm: check the prediction with a short scan of the candidate layers (``--confirm``); the check is
            kept in ``result.confirm``. The model is loaded after the prediction, unless ``lm`` is given.
        lm: the loaded checkpoint to confirm on (implies ``confirm``).
        prompts: the prompts of that check (default: the shipped prompts).
        n_prompts: use the first this many prompts for the check.
        dtype: the dtype the model is loaded in for the check.
        progress: show a progress bar.

    Returns:
        The prediction, the path per layer, creating and removing layers, as a :class:`WeightsResult`.
    """
    result = candidates(model, arch=arch, n_tokens=n_tokens, top_k=top_k, top_neurons=top_neurons, threads=threads,
                        progress=progress)
    if confirm or lm is not None:
        if lm is None:
            from melayer.models.loading import load

            lm = load(model if isinstance(model, str) or model is None else model.source, dtype=dtype, arch=arch,
                      progress=progress)
        result.confirm = confirm_candidates(lm, result, prompts, n_prompts=n_prompts)
    return result
