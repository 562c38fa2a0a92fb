"""The map from roles (``pre_attn_norm``, ``down``...) to a model's modules.

Every analysis and intervention addresses a model through *roles* and never through module names. The map of
a model is derived from the model itself (:mod:`melayer.models.derive`: transformers' accessors, a traced
forward pass and how each module behaves), so a new family needs no entry here; the named layouts below are
what ``--arch NAME`` reuses, and a role can always be overridden by hand (``--arch FILE.json``).

Paths are dotted attribute paths: model-level roles start at the ``*ForCausalLM`` object,
layer-level roles start at one decoder layer. Layers that differ from the common layout (hybrid models,
dense layers before the first mixture-of-experts layer) carry their own paths in ``layer_paths``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from melayer.util.errors import MelayerError

# Layer-level roles, in the order they act inside a decoder layer.
LAYER_ROLES = (
    "pre_attn_norm",  # norm whose output is the attention input (None for post-norm designs, e.g. OLMo2)
    "attn",
    "mixer_out",  # a layer without FFN: the mixer's output projection (its inputs are the layer's neurons)
    "post_attn_norm",  # norm applied to the attention output before the residual add (Gemma2/3, OLMo2)
    "pre_ffn_norm",  # norm whose output is the FFN input
    "mlp",
    "gate",
    "up",
    "gate_up",  # fused gate+up projection (Phi-3): first half gate, second half up
    "down",
    "post_ffn_norm",  # norm applied to the FFN output before the residual add (Gemma2/3, OLMo2)
    "router",  # mixture of experts: the router (scores each token's experts)
    "experts",  # mixture of experts: the fused experts module (3-D weights; gate/up/down then name a shared expert)
    "shared_gate",  # mixture of experts: the shared expert's gate (sigmoid of one output, Qwen2-MoE)
)
MODEL_ROLES = ("body", "layers", "embed", "final_norm", "lm_head")
NORM_ROLES = ("pre_attn_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")


# Paths read only by `melayer weights` for the first token's path (value/output projections, embedding scale,
# learned positions). Derivation does not measure them yet: a named layout supplies them, a derived map keeps the
# defaults (a checkpoint without those tensors gets the attention-free path), and they take no part in matching.
WEIGHT_PATH_FIELDS = ("attn_v", "attn_o", "attn_qkv", "embed_scale", "pos_embed")


@dataclass(frozen=True)
class ArchSpec:
    """Where each role lives in one family of models, and how its weights are laid out."""

    name: str
    body: str = "model"
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str | None = "model.norm"
    lm_head: str = "lm_head"
    pre_attn_norm: str | None = "input_layernorm"
    attn: str | None = "self_attn"
    mixer_out: str | None = None
    post_attn_norm: str | None = None
    pre_ffn_norm: str | None = "post_attention_layernorm"
    mlp: str | None = "mlp"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    gate_up: str | None = None
    down: str | None = "mlp.down_proj"
    post_ffn_norm: str | None = None
    router: str | None = None
    experts: str | None = None
    shared_gate: str | None = None
    norm_kind: Literal["rms", "layer"] = "rms"
    # Effective gain of a norm = norm_gain_offset + weight (Gemma stores gain - 1).
    norm_gain_offset: float = 0.0
    # GPT-2's Conv1D stores weights as (in, out) instead of nn.Linear's (out, in).
    conv1d: bool = False
    # True: the FFN reads the layer input (GPT-J, GPT-NeoX, Falcon, Cohere, Phi-1/2), not the residual after
    # the attention; the layer output is input + attention branch + FFN branch either way
    parallel: bool = False
    # logits = logit_scale x LM head output (before any final soft-capping): Cohere, Granite, Falcon-H1 scale them
    logit_scale: float = 1.0
    # what the ``attn`` role is: softmax "attention", another token mixer ("other": SSM, convolution, linear
    # attention) or "none" (a layer without mixer)
    mixer_kind: str = "attention"
    # per-layer differences from the layout above: {layer: {role or "parallel"/"mixer_kind": value}}
    layer_paths: dict[int, dict[str, Any]] = field(default_factory=dict)
    # The attention's value and output projections (layer-level paths), read by ``melayer weights`` for the
    # first token, whose attention output is o(v(x)): a fused q/k/v projection (GPT-2, Phi-3) holds v last.
    attn_v: str | None = "self_attn.v_proj"
    attn_o: str | None = "self_attn.o_proj"
    attn_qkv: str | None = None
    # Token embeddings are multiplied by this (Gemma: sqrt(hidden_size), given as the string "sqrt_hidden").
    embed_scale: float | str = 1.0
    # Learned position embeddings added to the token embedding (GPT-2), a model-level path.
    pos_embed: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, role: str, layer: int | None = None) -> str | None:
        """The module path of a role, relative to the decoder layer (layer roles) or to the model (model roles).

        Args:
            role: a role name (``"down"``, ``"pre_attn_norm"``, ``"embed"``, ...).
            layer: a decoder layer whose own path for the role (``layer_paths``) takes precedence.

        Returns:
            The dotted path, or None when the architecture has no such module.

        Raises:
            KeyError: ``role`` is not a role.
        """
        if role not in LAYER_ROLES and role not in MODEL_ROLES:
            raise KeyError(f"unknown role {role!r}")
        if layer is not None and role in self.layer_paths.get(layer, {}):
            return self.layer_paths[layer][role]
        return getattr(self, role)

    def at(self, layer: int) -> ArchSpec:
        """The layout of one decoder layer: the common one with that layer's differences applied.

        Args:
            layer: the decoder layer's index.

        Returns:
            A spec without per-layer differences (this spec itself when the layer has none).
        """
        diff = self.layer_paths.get(layer)
        return dataclasses.replace(self, **diff, layer_paths={}) if diff else self

    def layout(self) -> dict[str, Any]:
        """Everything but the name and notes: two specs with the same layout address a model alike.

        Returns:
            :meth:`to_dict` without ``name``, ``notes`` and ``extra``.
        """
        d = self.to_dict()
        for key in ("name", "notes", "extra"):
            d.pop(key)
        return d

    def derived_layout(self) -> dict[str, Any]:
        """The layout without the fields only ``melayer weights`` reads (:data:`WEIGHT_PATH_FIELDS`).

        This is what derivation measures, and what matching a derived map to a named one compares.

        Returns:
            :meth:`layout` without those fields.
        """
        d = self.layout()
        for key in WEIGHT_PATH_FIELDS:
            d.pop(key, None)
        return d

    def block_kind(self, layer: int | None = None) -> str:
        """The layer's block in words: sequential / parallel, which mixer, FFN or not.

        Args:
            layer: a decoder layer (its own differences applied); None for the common layout.

        Returns:
            E.g. ``"attention + FFN"``, ``"parallel attention + FFN"``, ``"attention + MoE + shared expert"``.
        """
        s = self if layer is None else self.at(layer)
        mixer = {"attention": "attention", "other": "non-attention mixer", "none": ""}.get(s.mixer_kind, s.mixer_kind)
        ffn = ("MoE" + (" + shared expert" if s.down else "")) if s.experts else ("FFN" if s.down else "")
        parts = [p for p in (mixer, ffn) if p]
        return ("parallel " if s.parallel else "") + (" + ".join(parts) if parts else "empty")

    def to_dict(self) -> dict[str, Any]:
        """The map as plain data (what an ``--arch`` JSON file holds).

        Returns:
            Every field by name.
        """
        return dataclasses.asdict(self)

    # -- weight layouts: the only place that knows Conv1D vs nn.Linear, fused gate_up and the norm offset --
    def linear_weight(self, module: nn.Module) -> torch.Tensor:
        """A projection's weight as nn.Linear lays it out, (out_features, in_features), whatever the storage.

        GPT-2's Conv1D stores (in, out). The result is a view: writing into it writes the module's weight.

        Args:
            module: the projection (nn.Linear or Conv1D).

        Returns:
            The (out, in) weight view.
        """
        weight = cast(torch.Tensor, module.weight)  # torch types a module attribute as Tensor | Module
        return weight.t() if self.conv1d else weight

    def down_matrix(self, down: nn.Module) -> torch.Tensor:
        """The down projection as (hidden_out, neuron), a view of the stored weight.

        Args:
            down: the FFN's down projection module.

        Returns:
            The (hidden, neuron) weight view.
        """
        return self.linear_weight(down)

    def ffn_in_matrices(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """A decoder layer's FFN input projections as (neuron, hidden_in) matrices.

        A fused ``gate_up`` is split (first half gate, second half up); GPT-2's ``c_fc`` is ``up``. Views of the
        stored weights, so writing into them edits the model.

        Args:
            layer: the decoder layer module.

        Returns:
            ``{"gate": ..., "up": ...}`` (``gate`` absent when the FFN has none).
        """
        if self.gate_up is not None:
            w = self.linear_weight(resolve(layer, self.gate_up))  # type: ignore[arg-type]
            inter = w.shape[0] // 2
            return {"gate": w[:inter], "up": w[inter:]}
        out = {}
        for role in ("gate", "up"):
            mod = resolve(layer, getattr(self, role))
            if mod is not None:
                out[role] = self.linear_weight(mod)
        return out

    @staticmethod
    def projections(module: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
        """Every projection inside ``module`` with its weight as an (out, in) view (nn.Linear or GPT-2's Conv1D).

        Args:
            module: any module (a block, an attention or FFN module).

        Returns:
            ``(projection, weight view)`` pairs in module order.
        """
        found: list[tuple[nn.Module, torch.Tensor]] = []
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                found.append((sub, sub.weight))
            elif type(sub).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores (in, out)
                found.append((sub, cast(torch.Tensor, sub.weight).t()))
        return found

    def stored_index(self, row: int, col: int) -> list[int]:
        """Where entry (row, col) of :meth:`linear_weight` sits in the stored weight tensor.

        Args:
            row: the output feature.
            col: the input feature.

        Returns:
            ``[row, col]``, or ``[col, row]`` for Conv1D storage.
        """
        return [col, row] if self.conv1d else [row, col]

    def gain_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A norm's effective per-dim gain from its stored weight (Gemma stores gain - 1).

        Args:
            weight: the norm's stored weight.

        Returns:
            The effective gain, per dim.
        """
        return weight + self.norm_gain_offset

    def weight_for_gain(self, gain: float) -> float:
        """The stored norm weight that gives effective gain ``gain``.

        Args:
            gain: the effective gain wanted.

        Returns:
            The value to store.
        """
        return gain - self.norm_gain_offset

    def with_overrides(self, **overrides: Any) -> ArchSpec:
        """A copy with some fields replaced (how an ``--arch`` JSON file adjusts a named map).

        Args:
            **overrides: field values by name; ``layer_paths`` keys may be strings (JSON).

        Returns:
            The new spec.

        Raises:
            MelayerError: an unknown field or a malformed ``layer_paths``.
        """
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise MelayerError(f"unknown architecture-map keys: {', '.join(sorted(unknown))}")
        if "layer_paths" in overrides:  # JSON keys are strings
            try:
                overrides["layer_paths"] = {int(k): dict(v) for k, v in (overrides["layer_paths"] or {}).items()}
            except (TypeError, ValueError):
                raise MelayerError("layer_paths must map layer numbers to {role: path}") from None
        return dataclasses.replace(self, **overrides)


LLAMA = ArchSpec(name="llama", notes="pre-norm RMSNorm, SwiGLU (Llama, Mistral, Qwen2, Qwen3, SmolLM2)")
GEMMA = ArchSpec(name="gemma", norm_gain_offset=1.0, gate="mlp.gate_proj", embed_scale="sqrt_hidden",
                 notes="Gemma 1: RMSNorm gain is 1 + weight")
GEMMA2 = ArchSpec(
    name="gemma2",
    post_attn_norm="post_attention_layernorm",
    pre_ffn_norm="pre_feedforward_layernorm",
    post_ffn_norm="post_feedforward_layernorm",
    norm_gain_offset=1.0,
    embed_scale="sqrt_hidden",
    notes="Gemma 2/3: four norms per layer (sandwich), RMSNorm gain is 1 + weight",
)
PHI3 = ArchSpec(name="phi3", gate=None, up=None, gate_up="mlp.gate_up_proj", attn_v=None, attn_qkv="self_attn.qkv_proj",
                notes="fused gate_up and qkv projections")
OLMO2 = ArchSpec(
    name="olmo2",
    pre_attn_norm=None,
    post_attn_norm="post_attention_layernorm",
    pre_ffn_norm=None,
    post_ffn_norm="post_feedforward_layernorm",
    notes="post-norm: the attention and FFN see the raw residual stream",
)
GPT2 = ArchSpec(
    name="gpt2",
    body="transformer",
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    pre_attn_norm="ln_1",
    attn="attn",
    pre_ffn_norm="ln_2",
    gate=None,
    up="mlp.c_fc",
    down="mlp.c_proj",
    norm_kind="layer",
    conv1d=True,
    attn_v=None,
    attn_qkv="attn.c_attn",
    attn_o="attn.c_proj",
    pos_embed="transformer.wpe",
    notes="LayerNorm, GELU MLP, Conv1D weights stored (in, out)",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "phi3": PHI3,
    "olmo2": OLMO2,
    "gpt2": GPT2,
}


def resolve(root: nn.Module, path: str | None) -> nn.Module | None:
    """Follow a dotted path from ``root``; ``None`` if any step is missing."""
    if path is None:
        return None
    obj: Any = root
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            idx = int(part)
            if idx >= len(obj):
                return None
            obj = obj[idx]
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def load_override(value: str | Path | dict[str, Any] | ArchSpec | None) -> dict[str, Any] | ArchSpec | None:
    """Parse an override: an ArchSpec, a dict, a JSON file, or the name of a mapped architecture."""
    if value is None or isinstance(value, (ArchSpec, dict)):
        return value
    text = str(value)
    if text in ARCHITECTURES:
        return ARCHITECTURES[text]
    path = Path(text)
    if not path.exists():
        raise MelayerError(
            f"architecture override {text!r} is neither a known architecture "
            f"({', '.join(sorted(ARCHITECTURES))}) nor an existing JSON file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MelayerError(f"cannot read architecture map {path}: {exc}") from None
    if not isinstance(data, dict):
        raise MelayerError(f"architecture map {path} must hold a JSON object of role -> module path")
    return data


def missing_roles(model: nn.Module, spec: ArchSpec) -> list[str]:
    missing = []
    for role in MODEL_ROLES:
        path = spec.path(role)
        if path is not None and resolve(model, path) is None:
            missing.append(f"{role}={path}")
    layers = resolve(model, spec.layers)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
        return missing or [f"layers={spec.layers} (not a non-empty ModuleList)"]
    for i, layer in enumerate(layers):
        s = spec.at(i)
        if s.down is not None and s.gate_up is None and s.up is None and s.experts is None:
            missing.append("up (or gate_up)")
        for role in LAYER_ROLES:
            path = s.path(role)
            if path is not None and resolve(layer, path) is None:
                missing.append(f"{role}={spec.layers}.{i}.{path}")
        if missing:
            break
    return missing


def describe_architectures() -> list[dict[str, str]]:
    """One row per mapped ``model_type`` (what ``melayer ls archs`` prints): the map's name, its norm, its FFN
    input form and its notes."""
    rows = []
    for model_type, spec in ARCHITECTURES.items():
        ffn = "gate_up (fused)" if spec.gate_up else "gate + up" if spec.gate else "up"
        norms = [r for r in NORM_ROLES if getattr(spec, r)]
        rows.append({"model_type": model_type, "map": spec.name, "norm": f"{spec.norm_kind} ({', '.join(norms)})",
                     "ffn_in": ffn, "notes": spec.notes})
    return rows


def named_layout(spec: ArchSpec) -> ArchSpec:
    """The named layout (``ARCHITECTURES``) with exactly ``spec``'s layout, else ``spec`` itself."""
    layout = spec.derived_layout()
    return next((named for named in ARCHITECTURES.values() if named.derived_layout() == layout), spec)
