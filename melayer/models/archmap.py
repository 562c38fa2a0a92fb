"""One declarative map from a transformers ``model_type`` to the modules melayer needs.

Every analysis and intervention addresses a model through *roles* (``pre_attn_norm``, ``down``...)
and never through module names, so supporting a new architecture means adding one entry here
(or passing an override), not writing code.

Paths are dotted attribute paths: model-level roles start at the ``*ForCausalLM`` object,
layer-level roles start at one decoder layer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from melayer.util.errors import MelayerError, UnsupportedArchitecture

# Layer-level roles, in the order they act inside a decoder layer.
LAYER_ROLES = (
    "pre_attn_norm",  # norm whose output is the attention input (None for post-norm designs, e.g. OLMo2)
    "attn",
    "post_attn_norm",  # norm applied to the attention output before the residual add (Gemma2/3, OLMo2)
    "pre_ffn_norm",  # norm whose output is the FFN input
    "mlp",
    "gate",
    "up",
    "gate_up",  # fused gate+up projection (Phi-3): first half gate, second half up
    "down",
    "post_ffn_norm",  # norm applied to the FFN output before the residual add (Gemma2/3, OLMo2)
)
MODEL_ROLES = ("body", "layers", "embed", "final_norm", "lm_head")
NORM_ROLES = ("pre_attn_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")


@dataclass(frozen=True)
class ArchSpec:
    """Where each role lives in one family of models, and how its weights are laid out."""

    name: str
    body: str = "model"
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    pre_attn_norm: str | None = "input_layernorm"
    attn: str = "self_attn"
    post_attn_norm: str | None = None
    pre_ffn_norm: str | None = "post_attention_layernorm"
    mlp: str = "mlp"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    gate_up: str | None = None
    down: str = "mlp.down_proj"
    post_ffn_norm: str | None = None
    norm_kind: Literal["rms", "layer"] = "rms"
    # Effective gain of a norm = norm_gain_offset + weight (Gemma stores gain - 1).
    norm_gain_offset: float = 0.0
    # GPT-2's Conv1D stores weights as (in, out) instead of nn.Linear's (out, in).
    conv1d: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, role: str) -> str | None:
        if role not in LAYER_ROLES and role not in MODEL_ROLES:
            raise KeyError(f"unknown role {role!r}")
        return getattr(self, role)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- weight layouts: the only place that knows Conv1D vs nn.Linear, fused gate_up and the norm offset --
    def linear_weight(self, module: nn.Module) -> torch.Tensor:
        """A projection's weight as nn.Linear lays it out, (out_features, in_features), whatever the storage
        (GPT-2's Conv1D stores (in, out)). A view: writing into it writes the module's weight."""
        weight = module.weight
        return weight.t() if self.conv1d else weight

    def down_matrix(self, down: nn.Module) -> torch.Tensor:
        """The down projection as (hidden_out, neuron) (a view of the stored weight)."""
        return self.linear_weight(down)

    def ffn_in_matrices(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """A decoder layer's FFN input projections as (neuron, hidden_in) matrices keyed ``gate`` / ``up``: a
        fused ``gate_up`` is split (first half gate, second half up); GPT-2's ``c_fc`` is ``up``. Views of the
        stored weights, so writing into them edits the model."""
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
        """Every projection inside ``module`` with its weight as an (out, in) view (nn.Linear or GPT-2's Conv1D)."""
        found = []
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                found.append((sub, sub.weight))
            elif type(sub).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores (in, out)
                found.append((sub, sub.weight.t()))
        return found

    def stored_index(self, row: int, col: int) -> list[int]:
        """Where entry (row, col) of :meth:`linear_weight` sits in the stored weight tensor."""
        return [col, row] if self.conv1d else [row, col]

    def gain_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A norm's effective per-dim gain from its stored weight (Gemma stores gain - 1)."""
        return weight + self.norm_gain_offset

    def weight_for_gain(self, gain: float) -> float:
        """The stored norm weight that gives effective gain ``gain``."""
        return gain - self.norm_gain_offset

    def with_overrides(self, **overrides: Any) -> ArchSpec:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise MelayerError(f"unknown architecture-map keys: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)


LLAMA = ArchSpec(name="llama", notes="pre-norm RMSNorm, SwiGLU (Llama, Mistral, Qwen2, Qwen3, SmolLM2)")
GEMMA = ArchSpec(name="gemma", norm_gain_offset=1.0, gate="mlp.gate_proj", notes="Gemma 1: RMSNorm gain is 1 + weight")
GEMMA2 = ArchSpec(
    name="gemma2",
    post_attn_norm="post_attention_layernorm",
    pre_ffn_norm="pre_feedforward_layernorm",
    post_ffn_norm="post_feedforward_layernorm",
    norm_gain_offset=1.0,
    notes="Gemma 2/3: four norms per layer (sandwich), RMSNorm gain is 1 + weight",
)
PHI3 = ArchSpec(name="phi3", gate=None, up=None, gate_up="mlp.gate_up_proj", notes="fused gate_up projection")
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


def arch_for(model: nn.Module, override: dict[str, Any] | ArchSpec | str | Path | None = None) -> ArchSpec:
    """Pick the map entry for ``model`` (by ``config.model_type``), apply overrides, and validate it."""
    override = load_override(override)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(override, ArchSpec):
        spec = override
    else:
        base = ARCHITECTURES.get(model_type or "")
        if base is None:
            if not override:
                missing = _missing_roles(model, LLAMA)
                hint = f"; a Llama-style layout would lack: {', '.join(missing)}" if missing else ""
                raise UnsupportedArchitecture(
                    f"model_type {model_type!r} is not in melayer's architecture map "
                    f"(mapped: {', '.join(sorted(ARCHITECTURES))}){hint}. "
                    "Pass --arch NAME to reuse a mapped layout or --arch FILE.json naming the module paths"
                )
            base = LLAMA.with_overrides(name=str(model_type))
        spec = base.with_overrides(**override) if override else base
    missing = _missing_roles(model, spec)
    if missing:
        raise UnsupportedArchitecture(
            f"architecture map {spec.name!r} does not fit model_type {model_type!r}: not found: {', '.join(missing)}"
        )
    return spec


def _missing_roles(model: nn.Module, spec: ArchSpec) -> list[str]:
    missing = []
    for role in MODEL_ROLES:
        path = spec.path(role)
        if path is not None and resolve(model, path) is None:
            missing.append(f"{role}={path}")
    layers = resolve(model, spec.layers)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
        return missing or [f"layers={spec.layers} (not a non-empty ModuleList)"]
    if spec.gate_up is None and spec.up is None:
        missing.append("up (or gate_up)")
    for role in LAYER_ROLES:
        path = spec.path(role)
        if path is not None and resolve(layers[0], path) is None:
            missing.append(f"{role}={spec.layers}.0.{path}")
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
