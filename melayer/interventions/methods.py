"""Interventions as a registry: a validated spec ("wemask:rate=0.01") -> bound to a model -> removable hooks.

Every method is a :class:`Method` in :data:`METHODS` (add your own with :func:`register_method`). A
:class:`MethodSpec` is parsed and validated without a model (``parse_method("act:tau=0.1")``); ``bind(lm,
calibration)`` returns a re-enterable context manager with ``to_dict()`` and ``describe()``, applied around
every model call by ``eval``, ``compare``, ``generate``, sweeps and lm-eval's wrapper. Leaving the block removes
every hook (and restores the attention implementation): the model is exactly as before.

Methods that need data (the ME layer, the massive dims, ACT's heads, ZeroTuning's gamma) take it from a
:class:`Calibration`: prompts that are never evaluated (in ``compare``: task items after the evaluated ones,
else melayer's shipped prompts), stated in every output.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from melayer.capture import Hooks, call_tokens, encode, hidden_arg, layer_output, position_ids
from melayer.capture.attention import Edit, edit_attention, first_key
from melayer.interventions.wemask import SELECT_RULES, WeMask, format_layers, parse_layers
from melayer.models.loading import LM
from melayer.util.errors import MelayerError

CALIBRATION_PROMPTS = 16
CALIBRATION_TOKENS = 128


# ----------------------------------------------------------------------------------------------------
# calibration


class Calibration:
    """What methods learn from never-evaluated prompts: the ME layer, the massive dims, activations, entropies."""

    def __init__(self, lm: LM, prompts: Sequence[str] | None = None, source: str = "", me_layer: int | None = None,
                 ids: Sequence[str] = ()) -> None:
        from melayer.analysis.scan import default_prompts

        self.lm = lm
        self.prompts = list(prompts) if prompts else default_prompts()
        self.source = source or "melayer's shipped prompts (melayer/data/prompts.txt)"
        self.ids = list(ids)
        self._me_layer = me_layer
        self.me_layer_source = "given" if me_layer is not None else None
        self._scan: Any = None
        self.choices: dict[str, Any] = {}  # what each method chose on these prompts (heads, gamma, dims)

    def scan(self) -> Any:
        if self._scan is None:
            from melayer.analysis.scan import scan

            self._scan = scan(self.lm, None, progress=False)  # the ME layer comes from the shipped prompts
        return self._scan

    @property
    def me_layer(self) -> int:
        if self._me_layer is None:
            found = self.scan().me_layer
            if found is None:
                raise MelayerError(f"no ME layer found in {self.lm.name}; pass --me-layer")
            self._me_layer, self.me_layer_source = int(found), "scan"
        return self._me_layer

    def batches(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(self.prompts), 8):
            batch = encode(self.lm, self.prompts[i: i + 8], max_tokens=CALIBRATION_TOKENS)
            out.append({k: v.to(self.lm.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        return out

    @torch.no_grad()
    def forward(self, intervention: Any = None, layers: Sequence[int] = (), site: str = "resid_out"
                ) -> tuple[list[torch.Tensor], dict[int, list[torch.Tensor]]]:
        """Per batch: the log-probs of the next token at each row's last position, and per layer the ``site``
        activation of the first real token (B, D), under ``intervention``."""
        from melayer.capture import read_site

        logps: list[torch.Tensor] = []
        acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        grabbed: dict[int, torch.Tensor] = {}
        for batch in self.batches():
            mask = batch["attention_mask"]
            first = mask.to(torch.int8).argmax(dim=1)
            grabbed.clear()
            with Hooks() as hooks, (intervention if intervention is not None else contextlib.nullcontext()):
                for layer in layers:
                    read_site(hooks, self.lm, layer, site, functools.partial(grabbed.__setitem__, layer))
                out = self.lm.model(**batch, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1)
            logps.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu())
            rows = torch.arange(mask.shape[0])
            for layer in layers:
                acts[layer].append(grabbed[layer][rows, first.to(grabbed[layer].device)].float().cpu())
        return logps, acts

    def entropy(self, intervention: Any = None) -> float:
        """Mean entropy (nats) of the next-token distribution at the prompts' last positions."""
        logps, _ = self.forward(intervention)
        ent = torch.cat([-(lp.exp() * lp).sum(-1) for lp in logps])
        return float(ent.mean())

    def top_dims(self, layer: int, k: int, site: str = "attn_in") -> list[int]:
        """The k dims with the largest mean |activation| of the first real token at ``layer``'s ``site``."""
        _, acts = self.forward(layers=[layer], site=site)
        mean = torch.cat(acts[layer]).abs().mean(0)
        return sorted(mean.topk(k).indices.tolist())

    def massive_dims(self) -> list[int]:
        from melayer.analysis.me_layer import massive_dims_at

        dims, _ = massive_dims_at(self.scan(), self.me_layer)
        return dims

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "prompts": len(self.prompts), "ids": self.ids[:50],
                "max_tokens": CALIBRATION_TOKENS, "me_layer": self._me_layer, "me_layer_source": self.me_layer_source,
                "disjoint_from_evaluated": True, "choices": self.choices}


# ----------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # what check requires, for the error message


@dataclass(frozen=True)
class Method:
    """A registered intervention: its parameters and how to bind it to a model."""

    name: str
    description: str
    params: tuple[Param, ...]
    build: Callable[[LM, dict[str, Any], Calibration], Any]
    calibrates: str = ""  # what it learns from the calibration prompts ("" if nothing)
    training: str = ""  # why it is refused in fine-tuning ("" if it may run in every training forward)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise MelayerError(f"method {self.name} has no parameter {name!r}; it takes "
                           f"{', '.join(p.name for p in self.params) or 'none'}")


METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add an intervention to the registry (``--method NAME:...`` on the command line)."""
    if method.name in METHODS and not replace:
        raise MelayerError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


@dataclass(frozen=True)
class MethodSpec:
    """A validated method with its parameters (defaults filled in); ``label`` names it in tables."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    given: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        args = ",".join(f"{k}={self.params[k]}" for k in self.given)
        return f"{self.name}:{args}" if args else self.name

    def bind(self, lm: LM, calibration: Calibration | None = None) -> Any:
        return METHODS[self.name].build(lm, dict(self.params), calibration or Calibration(lm))


def method_spec(name: str, **params: Any) -> MethodSpec:
    """Validate ``params`` for method ``name`` (unknown names, types and ranges are one-line errors)."""
    if name not in METHODS:
        raise MelayerError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    values = {}
    for key, raw in params.items():
        p = method.param(key)
        try:
            value = raw if p.type is str or raw is None else p.type(raw)
        except (TypeError, ValueError):
            raise MelayerError(f"{name}: {key} must be a {p.type.__name__} (got {raw!r})") from None
        if value is not None and p.check is not None and not p.check(value):
            raise MelayerError(f"{name}: {key}={value} is out of range ({p.rule})")
        values[key] = value
    full = {p.name: values.get(p.name, p.default) for p in method.params}
    return MethodSpec(name, full, tuple(k for k in (p.name for p in method.params) if k in values))


def training_spec(text: str) -> MethodSpec:
    """``parse_method(text)``, refused in one line (saying why) when the method makes no sense in fine-tuning."""
    spec = parse_method(text)
    why = METHODS[spec.name].training
    if why:
        trainable = ", ".join(m.name for m in METHODS.values() if not m.training)
        raise MelayerError(f"method {spec.name} is not used in fine-tuning: {why}; trainable: {trainable}")
    return spec


def parse_method(text: str) -> MethodSpec:
    """``"NAME"`` or ``"NAME:key=value,key=value"`` -> a validated :class:`MethodSpec`."""
    name, _, rest = text.strip().partition(":")
    params: dict[str, Any] = {}
    for part in (p.strip() for p in rest.replace(";", ",").split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise MelayerError(f"--method {text!r}: write parameters as key=value (e.g. wemask:rate=0.01)")
        params[key.strip()] = value.strip()
    return method_spec(name.strip(), **params)


# ----------------------------------------------------------------------------------------------------
# WeMask and its controls

_RATE = Param("rate", float, 0.01, "fraction of the hidden size masked (k = int(rate x hidden))",
              lambda v: 0 < v <= 1, "0 < rate <= 1")
_GAMMA = Param("gamma", float, 1.0, "masked dims are scaled by 1 - gamma", lambda v: 0 <= v <= 1, "0 <= gamma <= 1")
_SEED = Param("seed", int, 0, "seed of the random choice")
_LAYERS = Param("layers", str, None, "layers to mask, e.g. 4-17 (default: depends on the method)")


def _wemask(lm: LM, p: dict[str, Any], cal: Calibration) -> WeMask:
    layers = parse_layers(p["layers"], lm.num_layers)
    me = cal.me_layer if layers is None else None
    return WeMask(lm, p["rate"], layers=layers, select=p["select"], gamma=p["gamma"], me_layer=me)


def _k(lm: LM, rate: float) -> int:
    k = int(rate * lm.hidden_size)
    if k < 1:
        raise MelayerError(f"rate {rate:g} masks no dim of {lm.name} (k = int(rate x {lm.hidden_size}) = 0)")
    return k


def _massive_token_dims(lm: LM, p: dict[str, Any], cal: Calibration) -> list[int]:
    """The k dims WeMask masks on the massive token: the top-k mean |attention input| of the first real token at
    the first layer after the ME layer, on the calibration prompts."""
    k = _k(lm, p["rate"])
    key = f"massive_token_dims_k{k}"
    if key not in cal.choices:
        layer = min(cal.me_layer + 1, lm.num_layers - 1)
        cal.choices[key] = {"layer": layer, "site": "attn_in", "dims": cal.top_dims(layer, k)}
    return cal.choices[key]["dims"]


def _before(lm: LM, p: dict[str, Any], cal: Calibration) -> WeMask:
    layers = parse_layers(p["layers"], lm.num_layers) or list(range(0, cal.me_layer))
    if not layers:
        raise MelayerError(f"the ME layer of {lm.name} is layer 0: no layer before it; pass layers=")
    return WeMask(lm, p["rate"], layers=layers, gamma=p["gamma"], dims=_massive_token_dims(lm, p, cal))


def _random_dims(lm: LM, p: dict[str, Any], cal: Calibration) -> WeMask:
    k = _k(lm, p["rate"])
    gen = torch.Generator().manual_seed(int(p["seed"]))
    dims = torch.randperm(lm.hidden_size, generator=gen)[:k].tolist()
    layers = parse_layers(p["layers"], lm.num_layers)
    return WeMask(lm, p["rate"], layers=layers, gamma=p["gamma"], me_layer=None if layers else cal.me_layer, dims=dims)


def _other_token(lm: LM, p: dict[str, Any], cal: Calibration) -> WeMask:
    gen = torch.Generator().manual_seed(int(p["seed"]))
    offset = 1 + int(torch.randint(0, int(p["max_offset"]), (1,), generator=gen))
    layers = parse_layers(p["layers"], lm.num_layers)
    return WeMask(lm, p["rate"], layers=layers, gamma=p["gamma"], me_layer=None if layers else cal.me_layer,
                  dims=_massive_token_dims(lm, p, cal), token="offset", offset=offset)


def _me_only(lm: LM, p: dict[str, Any], cal: Calibration) -> WeMask:
    return WeMask(lm, p["rate"], layers=[cal.me_layer], select=p["select"], gamma=p["gamma"])


_SELECT = Param("select", str, "activation", "dims by |activation| or by |pre-attention norm gain|",
                lambda v: v in SELECT_RULES, " or ".join(SELECT_RULES))

# ----------------------------------------------------------------------------------------------------
# attention-probability methods


class AttentionMethod:
    """An attention-probability edit on chosen (layer, heads), applied through :func:`edit_attention`."""

    def __init__(self, lm: LM, name: str, heads: dict[int, list[int]], edit: Callable[[list[int]], Edit],
                 settings: dict[str, Any], rule: str) -> None:
        self.lm, self.name, self.heads, self.settings, self.rule = lm, name, heads, settings, rule
        self._edits = {layer: edit(hs) for layer, hs in heads.items() if hs}
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> AttentionMethod:
        if self._stack is not None:
            raise MelayerError(f"this {self.name} is already applied")
        stack = contextlib.ExitStack()
        if self._edits:
            stack.enter_context(edit_attention(self.lm, self._edits))
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def describe(self) -> str:
        n = sum(len(h) for h in self.heads.values())
        return f"{self.rule}; {n} heads in layers {format_layers([k for k, v in self.heads.items() if v])}"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "melayer.method/1", "method": self.name, "model": self.lm.name, **self.settings,
                "heads": {str(k): v for k, v in self.heads.items() if v}, "rule": self.describe()}


def zerotuning_edit(gamma: float) -> Callable[[list[int]], Edit]:
    """Scale the attention to each row's first real key by gamma in the heads, then renormalise each row."""
    def make(heads: list[int]) -> Edit:
        def fn(probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            first = first_key(allowed)
            h = torch.tensor(heads, device=probs.device)
            sub = probs[:, h]
            rows = torch.arange(probs.shape[0], device=probs.device)
            scale = torch.ones_like(sub[0, 0, 0]).expand(probs.shape[0], -1).clone()
            scale[rows, first.to(probs.device)] = gamma
            sub = sub * scale[:, None, None, :]
            out = probs.clone()
            out[:, h] = sub / sub.sum(-1, keepdim=True).clamp_min(1e-30)
            return out
        return fn
    return make


def act_edit(tau: float, beta: float) -> Callable[[list[int]], Edit]:
    """ACT (Yu et al. 2024) in the heads: key columns whose mean attention from the queries that see them exceeds
    tau are sinks; the first sink of each row is kept; the others are scaled by beta and the removed mass goes to
    the row's other keys in proportion to their attention."""
    def make(heads: list[int]) -> Edit:
        def fn(probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            h = torch.tensor(heads, device=probs.device)
            a = probs[:, h]  # (B, h, Q, K)
            vis = allowed[:, None].to(a.dtype)  # padding queries (that see no real key) do not vote
            seen = allowed.sum(1).clamp_min(1).to(a.dtype)[:, None, :]  # (B, 1, K)
            sink = ((a * vis).sum(2) / seen) > tau  # (B, h, K)
            first = sink.to(torch.int8).argmax(-1, keepdim=True)
            sink = sink.scatter(-1, first, False)  # the first sink stays
            s = sink[:, :, None, :].to(a.dtype)
            removed = (a * s).sum(-1, keepdim=True) * (1 - beta)
            rest = a * (1 - s)
            share = rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)
            out = probs.clone()
            out[:, h] = a * (1 - s) + a * s * beta + removed * share
            return out
        return fn
    return make


def _all_heads(lm: LM, layers: Sequence[int]) -> dict[int, list[int]]:
    n = int(getattr(lm.config, "num_attention_heads", 0) or getattr(lm.config, "n_head", 0))
    return {layer: list(range(n)) for layer in layers}


def _act(lm: LM, p: dict[str, Any], cal: Calibration) -> AttentionMethod:
    tau, beta = p["tau"], p["beta"]
    key = f"act_tau{tau:g}_frac{p['min_frac']:g}"
    choice: dict[str, Any]
    if p["heads"] == "all":
        choice = {"heads": {str(k): v for k, v in _all_heads(lm, range(lm.num_layers)).items()}, "rule": "all heads"}
    else:
        if key not in cal.choices:
            cal.choices[key] = _act_heads(lm, tau, cal, p["min_frac"])
        choice = cal.choices[key]
    heads = {int(k): v for k, v in choice["heads"].items()}
    return AttentionMethod(lm, "act", heads, act_edit(tau, beta), {"tau": tau, "beta": beta},
                           f"ACT tau={tau:g} beta={beta:g}: non-first sink keys scaled by beta, mass redistributed "
                           f"(heads: {choice['rule']})")


@torch.no_grad()
def _act_heads(lm: LM, tau: float, cal: Calibration, min_frac: float) -> dict[str, Any]:
    """The cheaper head rule: heads where a sink other than the first (mean received attention > tau) appears in at
    least ``min_frac`` of the calibration prompts (ACT's own search keeps heads that raise accuracy)."""
    counts: dict[int, torch.Tensor] = {}
    total = 0

    def record(layer: int) -> Edit:
        def fn(probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            seen = allowed.sum(1).clamp_min(1).to(probs.dtype)[:, None, :]
            sink = ((probs * allowed[:, None].to(probs.dtype)).sum(2) / seen) > tau  # (B, H, K)
            n_sinks = sink.sum(-1)  # (B, H)
            hit = (n_sinks >= 2).sum(0).cpu()
            counts[layer] = counts.get(layer, torch.zeros_like(hit)) + hit
            return probs
        return fn

    with edit_attention(lm, {layer: record(layer) for layer in range(lm.num_layers)}):
        for batch in cal.batches():
            lm.model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False, logits_to_keep=1)
            total += batch["input_ids"].shape[0]
    heads = {str(layer): [int(h) for h in (c >= min_frac * total).nonzero().flatten().tolist()]
             for layer, c in sorted(counts.items())}
    heads = {k: v for k, v in heads.items() if v}
    return {"heads": heads, "rule": f"heads with a non-first sink (mean attention > {tau:g}) in >= {min_frac:.0%} of "
                                    f"{total} calibration prompts"}


ZT_GAMMAS = (0.25, 0.5, 0.75, 1.25, 1.5, 2.0)


def _zerotuning(lm: LM, p: dict[str, Any], cal: Calibration) -> AttentionMethod:
    n = lm.num_layers
    groups = {"first third": list(range(max(1, n // 3))), "first half": list(range(max(1, n // 2))),
              "all": list(range(n))}
    if p["gamma"] is not None:
        choice = {"gamma": p["gamma"], "layers": groups[p["layers"]], "group": p["layers"], "rule": "given"}
    else:
        key = "zerotuning"
        if key not in cal.choices:
            base = cal.entropy()
            trials = []
            for group, layers in groups.items():
                for g in ZT_GAMMAS:
                    m = AttentionMethod(lm, "zerotuning", _all_heads(lm, layers), zerotuning_edit(g), {}, "")
                    trials.append((cal.entropy(m), g, group))
            best = min(trials)
            gamma, group = (best[1], best[2]) if best[0] < base else (1.0, "all")
            cal.choices[key] = {"gamma": gamma, "layers": groups[group], "group": group, "entropy_base": base,
                                "entropy_best": min(best[0], base),
                                "rule": f"unsupervised: gamma in {list(ZT_GAMMAS)} x heads in "
                                        f"{list(groups)} layers, minimising the mean next-token entropy on the "
                                        "calibration prompts (gamma 1 if none lowers it)"}
        choice = cal.choices[key]
    heads = _all_heads(lm, choice["layers"])
    return AttentionMethod(lm, "zerotuning", heads, zerotuning_edit(choice["gamma"]),
                           {"gamma": choice["gamma"], "layer_group": choice["group"]},
                           f"ZeroTuning gamma={choice['gamma']:g} on the first real token ({choice['rule']})")


# ----------------------------------------------------------------------------------------------------
# massive values at the ME layer (Sun et al. 2024)


class MassiveValue:
    """Set the massive (first real token, dim) values of the ME layer's output to their calibration mean or zero."""

    def __init__(self, lm: LM, me_layer: int, dims: list[int], values: list[float], mode: str) -> None:
        self.lm, self.me_layer, self.dims, self.values, self.mode = lm, me_layer, dims, values, mode
        self._hooks = Hooks()

    def __enter__(self) -> MassiveValue:
        dims = torch.tensor(self.dims)
        values = torch.tensor(self.values)

        def fn(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            h = layer_output(output)
            tokens = call_tokens(hidden_arg(args, kwargs), kwargs)
            hit = tokens.starts.nonzero()
            if hit.numel() == 0:
                return None
            new = h.clone()
            r, c = hit[:, 0].to(h.device), hit[:, 1].to(h.device)
            d = dims.to(h.device)
            new[r[:, None], c[:, None], d[None, :]] = values.to(h.device, h.dtype)[None, :].expand(len(r), -1)
            return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

        self._hooks.forward(self.lm.layers[self.me_layer], fn, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    def describe(self) -> str:
        what = "their calibration mean" if self.mode == "mean" else "zero"
        return f"massive values of the first real token at ME layer {self.me_layer}'s output, dims {self.dims}, set to {what}"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "melayer.method/1", "method": f"set_{self.mode}", "model": self.lm.name,
                "me_layer": self.me_layer, "dims": self.dims, "values": self.values, "rule": self.describe()}


def _set_value(mode: str) -> Callable[[LM, dict[str, Any], Calibration], MassiveValue]:
    def build(lm: LM, p: dict[str, Any], cal: Calibration) -> MassiveValue:
        me, dims = cal.me_layer, cal.massive_dims()
        if mode == "zero":
            values = [0.0] * len(dims)
        else:
            key = "massive_means"
            if key not in cal.choices:
                _, acts = cal.forward(layers=[me], site="resid_out")
                mean = torch.cat(acts[me]).mean(0)
                cal.choices[key] = {"layer": me, "dims": dims, "means": [float(mean[d]) for d in dims]}
            values = cal.choices[key]["means"]
        return MassiveValue(lm, me, dims, values, mode)
    return build


_NOT_TRAINED = ("a training-free, inference-time method: {what}, which training changes; apply it at evaluation "
                "(eval/compare --method)")

for _m in (
    Method("wemask", "WeMask: top-k dims of the massive token's attention input zeroed after the ME layer",
           (_RATE, _SELECT, _GAMMA, _LAYERS), _wemask),
    Method("wemask_before", "control: the massive token's k dims masked at the layers before the ME layer",
           (_RATE, _GAMMA, _LAYERS), _before, "the k dims (top mean |attention input| of the massive token)"),
    Method("wemask_random_dims", "control: k random dims (seeded) of the massive token, layers after the ME layer",
           (_RATE, _GAMMA, _SEED, _LAYERS), _random_dims),
    Method("wemask_other_token", "control: the massive token's k dims masked on a non-massive token (seeded index)",
           (_RATE, _GAMMA, _SEED, _LAYERS, Param("max_offset", int, 4, "the token index is drawn from 1..max_offset",
                                                  lambda v: v >= 1, ">= 1")),
           _other_token, "the k dims (top mean |attention input| of the massive token)"),
    Method("wemask_me_only", "control: WeMask at the ME layer alone", (_RATE, _SELECT, _GAMMA), _me_only),
    Method("act", "ACT (Yu et al. 2024): non-first attention sinks scaled by beta, mass redistributed",
           (Param("tau", float, 0.1, "sink threshold on mean received attention", lambda v: 0 < v < 1, "0 < tau < 1"),
            Param("beta", float, 0.4, "scale of the sink columns", lambda v: 0 <= v <= 1, "0 <= beta <= 1"),
            Param("min_frac", float, 0.5, "head rule: share of calibration prompts with a non-first sink",
                  lambda v: 0 < v <= 1, "0 < min_frac <= 1"),
            Param("heads", str, "calibrated", "calibrated (the head rule) or all", lambda v: v in ("calibrated", "all"),
                  "calibrated or all")),
           _act, "heads", _NOT_TRAINED.format(what="its heads are picked on the frozen model's attention sinks")),
    Method("zerotuning", "ZeroTuning (Han et al. 2025): attention to the first token scaled by gamma, renormalised",
           (Param("gamma", float, None, "scale (default: chosen on the calibration prompts)", lambda v: v > 0, "> 0"),
            Param("layers", str, "all", "heads of: first third, first half or all layers (with gamma=)",
                  lambda v: v in ("first third", "first half", "all"), "first third, first half or all")),
           _zerotuning, "gamma and layer group (minimum output entropy)",
           _NOT_TRAINED.format(what="its gamma and heads are tuned on the frozen model's output entropy")),
    Method("set_mean", "negative control (Sun et al. 2024): massive values at the ME layer set to their mean",
           (), _set_value("mean"), "the mean massive values",
           "a diagnostic of the frozen model (its massive values pinned to a constant), not a training intervention"),
    Method("set_zero", "massive values at the ME layer set to zero (expected to break the model)",
           (), _set_value("zero"), "",
           "a negative control that breaks the model by design; there is nothing to train under it"),
):
    register_method(_m)


def describe_methods() -> list[dict[str, Any]]:
    """Every registered method with its parameters (for ``melayer ls methods``)."""
    return [{"name": m.name, "description": m.description, "calibrates": m.calibrates or None,
             "in_training": m.training or "yes",
             "params": {p.name: {"default": p.default, "help": p.help} for p in m.params}} for m in METHODS.values()]


__all__ = ["METHODS", "Calibration", "Method", "MethodSpec", "Param", "describe_methods", "method_spec",
           "parse_method", "register_method", "training_spec"]
