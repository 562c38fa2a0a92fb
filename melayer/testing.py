"""Tiny real checkpoints with a planted massive activation: for tests, and to validate an architecture map.

``tiny_lm("llama")`` builds a random-weight transformers model of that ``model_type`` (a few layers,
hidden 64) and plants a massive activation the way real models grow one: on the first token (BOS), at
decoder layer ``me_layer``, one FFN neuron fires only for BOS and its ``down`` weight writes a huge
value into one hidden dim, which then rides the residual stream to the last layer. Families with a
norm after the FFN (Gemma 2/3, OLMo2) also get a large gain on that dim in that norm, so there the norm
and the FFN create it jointly. In a layer without FFN (pure SSMs) the neuron is a channel of the mixer's
output projection that the plant opens on BOS only (``Plant.mixer``; ``Plant.neuron`` is the channel found).

Everything is addressed through the architecture map (roles), so the same code validates a map: if a role
points at the wrong module, the planted activation does not appear where it was planted. :func:`check_arch`
does this for a family melayer does not map (or a map you wrote for ``--arch``): build a small random model of
that family, plant, scan, and compare::

    from transformers import AutoConfig, AutoModelForCausalLM
    from melayer.testing import check_arch

    config = AutoConfig.for_model("gpt_neox", vocab_size=300, hidden_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, intermediate_size=128)
    model = AutoModelForCausalLM.from_config(config)
    result = check_arch(model, arch="my_neox_map.json")
    assert result.ok, result.message
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from melayer.models.archmap import resolve
from melayer.models.experts import FusedExperts
from melayer.models.loading import LM, from_model
from melayer.models.shrink import BOS, EOS, HEADS, HIDDEN, INTER, KV_HEADS, PAD, VOCAB, tiny_config
from melayer.util.errors import MelayerError


def _param(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A module's parameter, to write into (torch types a module attribute as ``Tensor | Module``)."""
    return cast(torch.Tensor, getattr(module, name))

__all__ = ["BOS", "EOS", "HEADS", "HIDDEN", "INTER", "KV_HEADS", "PAD", "VOCAB", "tiny_config"]  # re-exported

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
                               max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                               tie_word_embeddings=False)
_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {}, "gemma": {},
    "gemma2": {"query_pre_attn_scalar": HIDDEN // HEADS},
    "gemma3_text": {"query_pre_attn_scalar": HIDDEN // HEADS, "sliding_window": 64},
    "phi3": {}, "olmo2": {},
    # GPT-2 is multi-head attention with its own size keys: no GQA / head_dim / intermediate_size keys
    "gpt2": {"n_embd": HIDDEN, "n_inner": INTER, "n_head": HEADS, "n_positions": 256},
}
MODEL_TYPES = tuple(_CONFIGS)
# keys GPT2Config would keep as stray attributes though the model ignores them (a config claiming 2 KV heads on
# a 4-head MHA model misleads readers of the config, e.g. TransformerLens, which then splits K/V wrongly)
_NOT_GPT2 = ("num_key_value_heads", "head_dim", "intermediate_size")


def tiny_tokenizer() -> Any:
    """A real byte-level BPE tokenizer (no merges) that prepends <bos>; pads on the left when asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD}
    vocab.update({ch: 3 + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@dataclass(frozen=True)
class Plant:
    """Where the massive activation was planted."""

    me_layer: int
    neuron: int
    dim: int
    carrier: int  # input dim that only BOS carries; the planted neuron reads it
    precursor: tuple[int, int] | None = None  # (layer, dim) of a transient spike removed one layer later
    expert: int | None = None  # MoE layer: the routed expert BOS is sent to, whose neuron ``neuron`` writes the dim
    flat_neuron: int | None = None  # the neuron's number in melayer's neuron numbering (expert x I + neuron)
    remover: tuple[int, float] | None = None  # (layer, share): a later FFN neuron takes this share of the value away
    mixer: bool = False  # planted through the mixer's output projection (a layer without FFN, as in pure SSMs)


def _set_neuron(lm: LM, layer: int, neuron: int, read_dim: int, gain: float) -> None:
    """Make FFN ``neuron`` of ``layer`` read only ``read_dim`` (positively) through gate and up."""
    for w in lm.arch.at(layer).ffn_in_matrices(lm.layers[layer]).values():  # (neuron, hidden) views of the weights
        w[neuron].zero_()
        w[neuron, read_dim] = gain
    if lm.arch.at(layer).gate_up is not None:
        return
    biased = False
    for role in ("gate", "up"):
        mod = lm.module(layer, role)
        if mod is not None and getattr(mod, "bias", None) is not None:
            # LayerNorm subtracts the mean, so tokens without the carrier still read a small (-mean/std)
            # on it; a threshold of 2 (BOS reads ~sqrt(hidden)) keeps the neuron silent for them.
            _param(mod, "bias")[neuron] = -2.0 * gain if lm.arch.norm_kind == "layer" else 0.0
            biased = True
    norm = lm.module(layer, "pre_ffn_norm")
    gains = lm.norm_gain(layer, "pre_ffn_norm")
    if not biased and lm.arch.norm_kind == "layer" and norm is not None and getattr(norm, "bias", None) is not None \
            and gains is not None:
        # no bias in the FFN (Nemotron's relu^2): the same threshold goes into the norm's bias on the read dim
        _param(norm, "bias")[read_dim] = -2.0 * float(gains[read_dim]) * (1.0 if gain >= 0 else -1.0)


def _set_down(lm: LM, layer: int, neuron: int, dim: int, value: float) -> None:
    """``down`` writes ``value`` x activation into ``dim`` only, and ``dim`` hears from ``neuron`` only."""
    w = lm.arch.at(layer).down_matrix(lm.required(layer, "down"))  # (hidden, neuron) view
    w[dim].zero_()
    w[:, neuron].zero_()
    w[dim, neuron] = value


@torch.no_grad()
def plant_massive(lm: LM, me_layer: int, neuron: int, dim: int, carrier: int | None = None,
                  strength: float = 2000.0, precursor: tuple[int, int] | None = None,
                  remover: tuple[int, float] | None = None) -> Plant:
    """Plant a BOS-only massive activation at ``me_layer`` (see module docstring)."""
    hidden = lm.hidden_size
    carrier = (dim + hidden // 2) % hidden if carrier is None else carrier
    model = lm.model
    # 1. only BOS carries the carrier dim: clear it in every embedding, and stop every layer from writing it
    embed = resolve(model, lm.arch.embed)
    if embed is None:
        raise MelayerError(f"{lm.name}: no token embedding at {lm.arch.embed!r}")
    for table in model.modules():  # the token embedding and any learned position embedding (GPT-2's wpe)
        if isinstance(table, torch.nn.Embedding) and table.embedding_dim == hidden:
            table.weight[:, carrier] = 0.0
    _param(embed)[BOS, carrier] = 1.0
    for i in range(lm.num_layers):
        for role in ("attn", "mlp", "down"):  # down: an FFN of projections the layer calls itself (no mlp module)
            block = lm.module(i, role)
            for sub, weight in lm.arch.projections(block) if block is not None else ():
                if weight.shape[0] != hidden:  # only projections that write the residual width
                    continue
                weight[carrier].zero_()
                if getattr(sub, "bias", None) is not None:
                    _param(sub, "bias")[carrier] = 0.0
        fused = lm.experts(i)
        if fused is None:
            continue
        for e in range(fused.num_experts):
            fused.down(e)[carrier] = 0.0
            if (bias := fused.down_bias(e)) is not None:
                bias[carrier] = 0.0
    # 2. the planted neuron reads the carrier; its down column writes the massive dim
    expert = flat = None
    mixer = lm.module(me_layer, "down") is None and lm.experts(me_layer) is None
    if mixer:
        flat = neuron = _plant_mixer(lm, me_layer, carrier, dim, 2 * strength)
    elif (me_experts := lm.experts(me_layer)) is not None:
        expert = 1
        flat = _plant_expert(lm, me_layer, me_experts, expert, neuron, carrier, dim, strength / math.sqrt(hidden))
    else:
        _set_neuron(lm, me_layer, neuron, carrier, gain=2.0)
        _set_down(lm, me_layer, neuron, dim, strength / math.sqrt(hidden))
    # 3. a norm after the FFN would rescale the output to O(1): give it a large gain on the dim
    post = lm.module(me_layer, "post_ffn_norm")
    if post is not None and getattr(post, "weight", None) is not None:
        _param(post)[dim] = lm.arch.weight_for_gain(strength / 4)
    if precursor is not None:
        _plant_precursor(lm, precursor, carrier, neuron, strength)
    if remover is not None:
        _plant_remover(lm, remover, dim, neuron + 3)
    return Plant(me_layer=me_layer, neuron=neuron, dim=dim, carrier=carrier, precursor=precursor, remover=remover, expert=expert,
                 flat_neuron=neuron if flat is None else flat, mixer=mixer)


class _Stop(Exception):
    """Ends a probing forward pass once the hooked module has been reached."""


def _plant_mixer(lm: LM, layer: int, carrier: int, dim: int, value: float) -> int:
    """A layer without FFN (pure SSMs): make one input channel of the mixer's output projection (``mixer_out``)
    non-zero on BOS only, and write ``value`` into ``dim`` from it. The channel is found by trying each row of
    the mixer's input projections in turn (the row reads only the carrier, which is zero on every other token):
    the first row after which some channel is non-zero on BOS and exactly zero on every later token -- a gate
    row, as Mamba's ``z`` (silu(0) = 0). Returns the channel (the planted neuron)."""
    out_proj, mixer = lm.required(layer, "mixer_out"), lm.required(layer, "attn")
    ids = lm.tokenizer(PROBE_TEXTS[0], return_tensors="pt")["input_ids"]
    seen: dict[str, torch.Tensor] = {}

    def grab(m: Any, args: tuple) -> None:
        seen["a"] = args[0].detach()
        raise _Stop

    def channels() -> torch.Tensor:
        handle = out_proj.register_forward_pre_hook(grab)
        try:
            lm.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        a = seen["a"].reshape(ids.shape[0], ids.shape[1], -1)[0].float()
        return (a[0].abs() > 1e-3 * a[0].abs().max().clamp_min(1e-30)) & (a[1:].abs().amax(0) == 0)

    before = channels()
    for proj, weight in lm.arch.projections(mixer):
        if proj is out_proj or weight.shape[1] != lm.hidden_size:
            continue
        for row in range(weight.shape[0]):
            saved = weight[row].clone()
            weight[row].zero_()
            weight[row, carrier] = 2.0
            found = (channels() & ~before).nonzero().flatten()
            if len(found):
                c = int(found[0])
                w = lm.arch.linear_weight(out_proj)  # (hidden, channel) view
                w[dim].zero_()
                w[:, c].zero_()
                w[dim, c] = value / float(seen["a"].reshape(ids.shape[0], ids.shape[1], -1)[0, 0, c])
                return c
            weight[row] = saved
    raise MelayerError(f"{lm.name}: no row of layer {layer}'s mixer input opens a channel of {lm.arch.path('mixer_out', layer)} "
                       "on the first token only")


def _plant_expert(lm: LM, layer: int, fused: FusedExperts, expert: int, neuron: int, carrier: int, dim: int,
                  value: float) -> int:
    """MoE layer: the router sends BOS (the carrier) to ``expert`` with a routing weight near 1; that expert's
    ``neuron`` reads the carrier and writes ``value`` x activation into ``dim``. Returns the neuron's number in
    melayer's numbering (``LM.ffn_segments``)."""
    router = _param(lm.required(layer, "router"))  # (experts, hidden)
    router[:, carrier] = 0.0
    router[expert, carrier] = 50.0
    biases = fused.input_bias(expert)
    for name, w in fused.inputs(expert).items():
        w[neuron].zero_()
        w[neuron, carrier] = 2.0
        if name in biases:
            biases[name][neuron] = 0.0
    down = fused.down(expert)  # (hidden, neuron) view
    down[dim].zero_()
    down[:, neuron].zero_()
    down[dim, neuron] = value
    return expert * fused.inter + neuron


def _plant_remover(lm: LM, remover: tuple[int, float], dim: int, neuron: int) -> None:
    """A later FFN neuron that reads the massive dim itself and writes it down by ``share`` of its value (BOS).

    It reads the dim weakly (gain 0.25, the sign of the value, so its gate opens), so its down weight must be
    large -- larger than the creating neuron's -- as for a real canceller. Families with a post-FFN norm get the
    size from that norm's gain on the dim instead. Both are affine in the parameter, so two forwards fix it."""
    layer, share = remover
    seen: dict[str, float] = {}

    def run() -> tuple[float, float]:
        def before(m: Any, a: Any) -> None:
            seen["in"] = float(a[0][0, 0, dim])

        def after(m: Any, a: Any, out: Any) -> None:
            seen["out"] = float((out[0] if isinstance(out, tuple) else out)[0, 0, dim])

        handles = [lm.layers[layer].register_forward_pre_hook(before), lm.layers[layer].register_forward_hook(after)]
        try:
            lm.model(input_ids=torch.tensor([[BOS]]))
        finally:
            for h in handles:
                h.remove()
        return seen["in"], seen["out"]

    x_in, _ = run()
    sign = 1.0 if x_in >= 0 else -1.0
    _set_neuron(lm, layer, neuron, dim, gain=0.25 * sign)
    post = lm.module(layer, "post_ffn_norm")
    down = lm.arch.down_matrix(lm.required(layer, "down"))
    if post is not None and getattr(post, "weight", None) is not None:
        _set_down(lm, layer, neuron, dim, -sign)
        post_gain = _param(post)

        def put(p: float) -> None:
            post_gain[dim] = lm.arch.weight_for_gain(p)
    else:
        _set_down(lm, layer, neuron, dim, 0.0)

        def put(p: float) -> None:
            down[dim, neuron] = p
    values = []
    for p in (0.0, 1.0):
        put(p)
        values.append(run()[1])
    slope = values[1] - values[0]
    put((((1 - share) * x_in) - values[0]) / slope if slope else 0.0)


def _plant_precursor(lm: LM, precursor: tuple[int, int], carrier: int, neuron: int, strength: float) -> None:
    """A BOS spike at layer p on dim d that the FFN of layer p+1 cancels again (families without post-FFN norm).

    Both neurons read the BOS-only carrier dim, so no other token is touched. The spike is kept moderate
    (|a| ~ strength / 8) so that it does not disturb the planted ME layer further down.
    """
    layer, dim = precursor
    if lm.module(layer, "post_ffn_norm") is not None:
        raise ValueError("precursor planting needs a family without a post-FFN norm")
    spike, cancel = neuron + 1, neuron + 2
    _set_neuron(lm, layer, spike, carrier, gain=2.0)
    _set_down(lm, layer, spike, dim, strength / 8 / 256)
    # layer p+1 must not read the spike dim (else the spike leaks into other dims before it is cancelled)
    for role in ("attn", "mlp"):
        for _, weight in lm.arch.projections(lm.required(layer + 1, role)):
            if weight.shape[1] == lm.hidden_size:
                weight[:, dim] = 0.0
    _set_neuron(lm, layer + 1, cancel, carrier, gain=2.0)
    _set_down(lm, layer + 1, cancel, dim, 0.0)
    # measure the residual entering layer p+1's FFN and the cancel neuron's activation, then cancel exactly
    seen: dict[str, torch.Tensor] = {}
    handles = [  # models/ sits below capture/, so plain PyTorch hooks, removed in the finally
        lm.required(layer + 1, "down").register_forward_pre_hook(lambda m, a: seen.__setitem__("act", a[0][0, 0].clone())),
        lm.required(layer + 1, "pre_ffn_norm").register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][0, 0].clone())),
    ]
    try:
        lm.model(input_ids=torch.tensor([[BOS]]))
    finally:
        for h in handles:
            h.remove()
    _set_down(lm, layer + 1, cancel, dim, float(-seen["x"][dim] / seen["act"][cancel]))


def tiny_lm(model_type: str = "llama", plant: bool = True, me_layer: int = 1, neuron: int = 5, dim: int = 7,
            num_layers: int = 4, seed: int = 0, precursor: tuple[int, int] | None = None,
            remover: tuple[int, float] | None = None) -> LM:
    """A tiny real model of ``model_type``, optionally with a planted massive activation.

    The families of :data:`MODEL_TYPES` get hand-picked tiny configs; any other causal-LM model type of the
    installed transformers gets its default config shrunk (:func:`tiny_config`).

    Args:
        model_type: a transformers model type (``"llama"``, ``"gemma3_text"``, ...).
        plant: plant a BOS-only massive activation (:func:`plant_massive`).
        me_layer: the layer the planted activation is born in.
        neuron: the FFN ``down`` neuron that writes it (a layer without FFN: the plant picks the mixer channel).
        dim: the residual dim it appears in.
        num_layers: decoder layers.
        seed: the random seed of the weights.
        precursor: ``(layer, dim)`` of a planted precursor: a transient spike that the next layer removes.
        remover: ``(layer, share)``: a later FFN neuron takes this share of the massive value away.

    Returns:
        The model as an :class:`~melayer.models.loading.LM`, with the plant recorded as ``lm.plant`` (a
        :class:`Plant`, or None without one).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if model_type in _CONFIGS:
        kwargs = {**_COMMON, **_CONFIGS[model_type]}
        if model_type == "gpt2":
            for key in _NOT_GPT2:
                kwargs.pop(key)
            kwargs.update(n_layer=num_layers)
        kwargs["num_hidden_layers"] = num_layers
        config = AutoConfig.for_model(model_type, **kwargs)
    else:
        try:
            config = tiny_config(model_type, num_layers)
        except ValueError as exc:
            raise ValueError(f"no tiny config for {model_type!r}: {exc}") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()  # as melayer.load leaves a model (GPT-2's config has dropout)
    lm = from_model(model, tiny_tokenizer(), name=f"tiny-{model_type}", overflow_guard=True)
    planted = plant_massive(lm, me_layer, neuron, dim, precursor=precursor, remover=remover) if plant else None
    lm.plant = planted  # type: ignore[attr-defined]  # the test fixture's record, not an LM field
    return lm


PROMPTS = ("The capital of France is Paris.", "Hello world, this is a test!", "1 2 3 4 5 6 7 8")


@dataclass(frozen=True)
class ArchCheck:
    """What :func:`check_arch` planted and what melayer's scan found; ``ok`` when they agree."""

    plant: Plant
    me_layer: int | None  # the scan's ME layer
    massive_dims: list[int] = field(default_factory=list)  # the scan's massive dims
    tokens: list[str] = field(default_factory=list)  # the tokens that carry them

    @property
    def ok(self) -> bool:
        return self.me_layer == self.plant.me_layer and self.massive_dims == [self.plant.dim] and self.tokens == ["<bos>"]

    @property
    def message(self) -> str:
        if self.ok:
            return f"the map is consistent: the activation planted at layer {self.plant.me_layer}, dim {self.plant.dim} was found"
        return (f"the map does not fit: planted layer {self.plant.me_layer}, dim {self.plant.dim} on <bos>; the scan "
                f"found layer {self.me_layer}, dims {self.massive_dims} on {self.tokens or 'no token'}")


def check_arch(model: Any, arch: Any = None, *, me_layer: int = 1, neuron: int = 5, dim: int = 7,
               prompts: Sequence[str] = PROMPTS) -> ArchCheck:
    """Validate an architecture map on a small random-weight model of its family.

    Args:
        model: a transformers causal LM with random weights, built from a small config of the family (a few layers,
            ``vocab_size`` at least :data:`VOCAB`; the weights are changed in place by the plant,
            and it is put in eval mode).
        arch: the architecture map to check, as ``--arch`` takes it (a mapped family name, a dict of role -> module
            path, a JSON file, or an :class:`~melayer.models.archmap.ArchSpec`); None checks melayer's own map.
        me_layer: the decoder layer (0-based) where the massive activation is planted (see :func:`plant_massive`).
        neuron: the FFN neuron that writes it.
        dim: the hidden dim it is written to.
        prompts: the texts the scan reads.

    Returns:
        An :class:`ArchCheck`: ``ok`` is true when the scan finds the planted ME layer and dim on ``<bos>`` only.
        A role that points at a module of the wrong shape raises
        :class:`~melayer.util.errors.UnsupportedArchitecture` already when the map is bound.
    """
    from melayer.analysis.scan import scan

    vocab = getattr(model.config, "vocab_size", 0) or 0
    if vocab < VOCAB:
        raise MelayerError(f"check_arch needs vocab_size >= {VOCAB} (the test tokenizer's bytes); the model has {vocab}")
    model.float().eval()
    lm = from_model(model, tiny_tokenizer(), name=f"tiny-{model.config.model_type}", arch=arch)
    if not 0 <= me_layer < lm.num_layers - 1:
        raise MelayerError(f"me_layer must leave a layer after it: 0 <= me_layer < {lm.num_layers - 1}")
    plant = plant_massive(lm, me_layer, neuron, dim)
    result = scan(lm, list(prompts), progress=False)
    return ArchCheck(plant=plant, me_layer=result.me_layer, massive_dims=list(result.massive_dims),
                     tokens=sorted({t["token"] for t in result.massive_tokens()}))


PROBE_TEXTS = ("The cat sat on the mat.", "Massive activations are rare.", "1 2 3 4 5 6 7 8")


@torch.no_grad()
def plant_found(lm: LM, plant: Plant, texts: tuple[str, ...] = PROBE_TEXTS) -> str | None:
    """Check a plant with plain forward hooks (no melayer analysis): None if, on every text, the planted dim of the
    first token is massive (|a| > 100 and > 1000 x that row's median |a|) in the output of the planted layer and of
    every later one and nowhere before it, and no other token or dim is; else what went wrong, in words."""
    def layer_output(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out

    rows: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: rows.__setitem__(i, layer_output(out).detach()))
               for i, layer in enumerate(lm.layers)]
    try:
        for text in texts:
            ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
            rows.clear()
            lm.model(input_ids=ids, use_cache=False)
            for i in range(lm.num_layers):
                a = rows[i][0].float().abs()
                massive = (a > 100) & (a > 1000 * a.median(dim=-1, keepdim=True).values)
                hits = sorted(map(tuple, massive.nonzero().tolist()))
                want = [(0, plant.dim)] if i >= plant.me_layer else []
                if hits != want:
                    return f"layer {i} on {text!r}: massive (token, dim) {hits[:4]}, expected {want}"
    finally:
        for h in handles:
            h.remove()
    return None
