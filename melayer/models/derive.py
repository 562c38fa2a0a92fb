"""Derive a model's architecture map (:class:`~melayer.models.archmap.ArchSpec`) from the model itself.

Nothing here is keyed on a family name. The decoder comes from transformers' own accessors
(``get_decoder()``, ``get_input_embeddings()``, ``get_output_embeddings()``, the text config's layer count); the
roles inside each decoder layer come from one short traced forward pass and from how each module *behaves*:

* a **norm** gives the same output when its input is doubled (scale invariance); its kind (mean-centred
  LayerNorm or RMSNorm) and how its stored weight maps to its gain (Gemma and Qwen3-Next store gain - 1) are
  measured by running it on a known +/-1 vector;
* a **mixer** (attention, SSM, convolution) changes later positions when an earlier one changes; an **FFN**
  does not (it is position-wise); a mixer is softmax **attention** when, under eager attention, it returns
  attention probabilities (rows that sum to at most 1);
* the data flow between them (which norm's output each block reads, which norm reads each block's output)
  gives pre/post norms and whether the block is **parallel** (the FFN reads the layer input, as in GPT-J,
  GPT-NeoX, Falcon, Cohere, Phi-1/2) or sequential;
* inside the FFN, ``down`` is the last projection writing the residual width; the projections reading the FFN
  input are ``gate``/``up`` (told apart by linearity: doubling ``up``'s output doubles the down input), or one
  fused ``gate_up`` of twice the width; GPT-2-style Conv1D storage is read from the weight's shape.

Every derived map is then checked by planting (:mod:`melayer.testing`), as hand-written ones were.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from melayer.models.archmap import (
    ARCHITECTURES,
    LAYER_ROLES,
    ArchSpec,
    load_override,
    missing_roles,
    named_layout,
    resolve,
)
from melayer.models.devices import execution_device, read_param
from melayer.models.experts import ROUTINGS, FusedExperts, experts_call, is_fused_experts, route
from melayer.models.guard import overflow_message
from melayer.models.hf_internals import attention_implementation, attn_implementation
from melayer.util.errors import MelayerError, NumericOverflow, UnsupportedArchitecture

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SEQ = 6  # tokens of the traced forward


class DerivationError(UnsupportedArchitecture):
    """The model's roles could not be derived (the message says which and why)."""


@dataclass
class Call:
    """One module call seen during the traced forward."""

    order: int
    module: nn.Module
    args: tuple
    kwargs: dict
    x: torch.Tensor | None  # hidden-states input
    y: torch.Tensor | None = None  # first tensor of the output
    extra: Any = None  # the whole output
    end: int = -1

    @property
    def xin(self) -> torch.Tensor:
        """The hidden-states input (every call :func:`_units` and :func:`_leaves` select has one)."""
        if self.x is None:
            raise DerivationError(f"{type(self.module).__name__} was not called with hidden states")
        return self.x

    @property
    def yout(self) -> torch.Tensor:
        """The first output tensor (every call :func:`_units` selects has one)."""
        if self.y is None:
            raise DerivationError(f"{type(self.module).__name__} returned no tensor")
        return self.y


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    return None


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def _same(a: torch.Tensor | None, b: torch.Tensor | None, rtol: float = 1e-4) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    a, b = a.detach().float(), b.detach().float()
    scale = float(b.abs().max()) or 1.0
    return bool(((a - b).abs().max()) <= rtol * scale)


class Trace:
    """Records the first call of every module under ``root`` during one forward pass."""

    def __init__(self, root: nn.Module) -> None:
        self.calls: dict[int, Call] = {}
        self.counter = 0
        self.active = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for mod in root.modules():
            self._handles.append(mod.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._post, with_kwargs=True))

    def _pre(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.active and id(mod) not in self.calls:
            self.counter += 1
            x = _hidden_in(args, kwargs)
            self.calls[id(mod)] = Call(self.counter, mod, args, dict(kwargs), None if x is None else x.detach().clone())

    def _post(self, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        call = self.calls.get(id(mod))
        if self.active and call is not None and call.end < 0:
            self.counter += 1
            y = _first_tensor(out)
            call.y, call.extra, call.end = None if y is None else y.detach().clone(), out, self.counter

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def get(self, mod: nn.Module) -> Call | None:
        return self.calls.get(id(mod))

    def called(self, mod: nn.Module) -> Call:
        """The call of a module the traced forward ran (the layers, the FFN's projections)."""
        call = self.calls.get(id(mod))
        if call is None:
            raise DerivationError(f"{type(mod).__name__} was not called in the traced forward")
        return call

    def rerun(self, call: Call, x: torch.Tensor) -> torch.Tensor | None:
        """Call the module again with ``x`` as its hidden-states input and the traced other arguments."""
        was, self.active = self.active, False
        try:
            if call.args and isinstance(call.args[0], torch.Tensor):
                out = call.module(x, *call.args[1:], **call.kwargs)
            else:
                out = call.module(*call.args, **{**call.kwargs, "hidden_states": x})
            return _first_tensor(out)
        finally:
            self.active = was


# ----------------------------------------------------------------------------------------------------
# module classification


def _weight2d(mod: nn.Module) -> torch.Tensor | None:
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(mod, nn.Embedding) and not list(mod.children()):
        return w
    return None


def _shape2d(mod: nn.Module) -> tuple[int, ...]:
    """The weight shape of a projection (a module :func:`_leaves` returns); () for any other module."""
    w = _weight2d(mod)
    return () if w is None else tuple(w.shape)


def is_norm(trace: Trace, call: Call, hidden: int) -> bool:
    """Scale invariance: the output for 2x equals the output for x (RMSNorm, LayerNorm, with or without gain)."""
    if call.x is None or call.y is None or call.x.shape[-1] != hidden or call.y.shape != call.x.shape:
        return False
    if sum(p.numel() for p in call.module.parameters()) > 2 * hidden:
        return False
    x = call.x.float()
    x = (x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12) * 10).to(call.x.dtype)  # RMS 10: eps is moot
    try:
        y1, y2 = trace.rerun(call, x), trace.rerun(call, x * 2)
    except Exception:
        return False
    return _same(y2, y1, 1e-3)


def mixes_tokens(trace: Trace, call: Call) -> bool:
    """Does changing the first position change later positions' outputs?"""
    x = call.xin.clone()
    x[:, 0] = x[:, 0] + torch.randn_like(x[:, 0]) * (x.abs().mean() + 1)
    y2 = trace.rerun(call, x)
    if y2 is None:
        raise DerivationError(f"{type(call.module).__name__} returned no tensor when called again")
    return not _same(y2[:, 1:], call.yout[:, 1:], 1e-3)


def norm_probe(norm: nn.Module, hidden: int) -> tuple[str, float | None]:
    """(kind, offset): ``layer`` if the norm removes the mean, else ``rms``; offset = effective gain - stored
    weight (1 for norms that store gain - 1), measured on a +/-1 vector (mean 0, RMS 1)."""
    w = read_param(norm, "weight") if isinstance(getattr(norm, "weight", None), torch.Tensor) else None
    ref = w if w is not None else next(norm.parameters(), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = execution_device(norm)
    v = torch.ones(1, 1, hidden, device=device, dtype=dtype)
    v[..., 1::2] = -1

    def run(t: torch.Tensor) -> torch.Tensor:
        out = _first_tensor(norm(t))
        if out is None:
            raise DerivationError(f"the norm {type(norm).__name__} returned no tensor")
        return out.float()

    pos, neg, shifted = (run(t) for t in (v, -v, v + 3))
    gain = ((pos - neg) / (2 * v.float()))[0, 0]
    kind = "layer" if _same(shifted, pos) else "rms"
    if not isinstance(w, torch.Tensor) or w.shape != (hidden,):
        return kind, None
    offset = float((gain - w.detach().float().to(gain.device)).median())
    return kind, float(round(offset))


# ----------------------------------------------------------------------------------------------------
# the derivation


@dataclass
class LayerRoles:
    """Roles found in one decoder layer (paths relative to the layer)."""

    paths: dict[str, str | None] = field(default_factory=dict)
    parallel: bool = False
    mixer_kind: str = "none"  # attention / other / none
    conv1d: bool = False
    norms: list[nn.Module] = field(default_factory=list)
    post_ln: bool = False  # the layer renormalises the residual stream (see _renormalises)

    def key(self) -> tuple:
        return tuple(sorted((k, v) for k, v in self.paths.items())) + (self.parallel, self.mixer_kind)


def _names(root: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, mod in root.named_modules():
        out.setdefault(id(mod), name)
    return out


def _decoder_layers(model: PreTrainedModel, body: nn.Module) -> tuple[str, nn.ModuleList]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = next((getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(getattr(cfg, k, None), int)), None)
    lists = [(name, m) for name, m in body.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [(name, m) for name, m in lists if len(m) == n]
    pool = exact or lists
    if not pool:
        raise DerivationError("no list of decoder layers found under the decoder")
    return min(pool, key=lambda nm: (nm[0].count("."), -len(nm[1])))


def _units(trace: Trace, module: nn.Module, hidden: int, prefix: str = "") -> list[tuple[str, Call]]:
    """The outermost called submodules of ``module`` that read and write the residual width, in call order
    ((batch, tokens, hidden), or (tokens, hidden) where the layer flattens the tokens, as OPT does for its FFN)."""
    found = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        call = trace.get(child)
        if (call is not None and call.x is not None and call.y is not None and call.x.shape[-1] == hidden
                and call.y.shape[-1] == hidden and call.x.dim() == call.y.dim() and call.x.dim() in (2, 3)):
            found.append((path, call))
        elif any(True for _ in child.children()):
            found.extend(_units(trace, child, hidden, f"{path}."))
    return sorted(found, key=lambda pc: pc[1].order)


def _is_softmax_attention(call: Call) -> bool:
    out = call.extra
    if not isinstance(out, (tuple, list)):
        return False
    probs = next((o for o in out[1:] if isinstance(o, torch.Tensor) and o.dim() == 4), None)
    if probs is None:
        return False
    sums = probs.float().sum(-1)
    return bool((probs >= 0).all() and (sums <= 1 + 1e-3).all() and (sums > 0).any())


def _leaves(trace: Trace, module: nn.Module) -> list[tuple[nn.Module, Call]]:
    """The called projections (leaf modules with a 2-D weight) inside ``module``, in call order."""
    found = [(m, c) for m in module.modules() if _weight2d(m) is not None and (c := trace.get(m)) is not None]
    return sorted(found, key=lambda mc: mc[1].order)


def _dense_roles(trace: Trace, rel: Any, path: str, call: Call, hidden: int, skip: tuple = (),
                 loose: list[tuple[nn.Module, Call]] | None = None) -> dict[str, Any]:
    """gate / up / gate_up / down (paths from ``rel``) and conv1d of a dense FFN module call; ``loose``: the FFN is
    these projections, called by the decoder layer ``call`` itself (no FFN module; OPT's ``fc1``/``fc2``)."""
    leaves = loose if loose is not None else [(m, c) for m, c in _leaves(trace, call.module)
                                               if not any(m is s or _inside(m, s) for s in skip)]
    writers = [(m, c) for m, c in leaves if c.y is not None and c.y.shape[-1] == hidden]
    if not writers:
        raise DerivationError(f"no projection in {path} writes the residual width")
    down, down_call = writers[-1]
    inter = down_call.xin.shape[-1]
    x_in = call.x if loose is None else next((c.x for m, c in leaves if m is not down and c.order < down_call.order
                                              and c.x is not None and c.x.shape[-1] == hidden), None)
    readers = [(m, c) for m, c in leaves if m is not down and _same(_flat(c.x, hidden), _flat(x_in, hidden))]
    out: dict[str, Any] = dict(down=rel(down), gate=None, up=None, gate_up=None)
    out["conv1d"] = not isinstance(down, nn.Linear) and _shape2d(down) == (inter, hidden) and inter != hidden
    widths = [c.yout.shape[-1] for _, c in readers]
    if len(readers) == 1 and widths[0] == inter:
        out["up"] = rel(readers[0][0])
    elif len(readers) == 1 and widths[0] == 2 * inter:
        out["gate_up"] = rel(readers[0][0])
    elif len(readers) == 2 and widths == [inter, inter]:
        a, b = readers[0][0], readers[1][0]
        out["up"], out["gate"] = (rel(a), rel(b)) if _is_linear_branch(trace, call, a, down) else (rel(b), rel(a))
    else:
        raise DerivationError(f"cannot tell the input projections of {path} ({len(readers)} read its input)")
    return out


def _flat(t: torch.Tensor | None, hidden: int) -> torch.Tensor | None:
    return None if t is None or t.shape[-1] != hidden else t.reshape(-1, hidden)


def _inside(module: nn.Module, container: nn.Module) -> bool:
    return any(m is module for m in container.modules())


def _ffn_roles(trace: Trace, names: dict[int, str], layer: nn.Module, path: str, call: Call, hidden: int,
               roles: LayerRoles, beside: tuple[str, Call] | None = None) -> None:
    """The FFN's roles; ``beside``: a dense shared expert the layer calls next to this MoE block on the same input
    (Granite-MoE's ``shared_mlp``), whose output the layer adds to the block's."""
    ffn = call.module
    base = names[id(layer)]
    rel = lambda m: names[id(m)][len(base) + 1 if base else 0:]  # noqa: E731
    roles.paths["mlp"] = path
    fused = [m for m in ffn.modules() if is_fused_experts(m)]
    if fused:
        _moe_roles(trace, rel, path, call, fused[0], hidden, roles, beside)
        return
    if any(p.dim() == 3 for p in ffn.parameters()) or any(isinstance(m, nn.ModuleList) for m in ffn.modules()):
        raise DerivationError(f"{path} is a mixture of experts whose experts are not fused 3-D tensors with "
                              "transformers' layout flags")
    dense = _dense_roles(trace, rel, path, call, hidden)
    roles.conv1d = dense.pop("conv1d")
    roles.paths.update(dense)


def _moe_roles(trace: Trace, rel: Any, path: str, call: Call, experts: nn.Module, hidden: int,
               roles: LayerRoles, beside: tuple[str, Call] | None = None) -> None:
    """Router, fused experts, shared expert and its gate of an MoE block, checked by recomputing its output; a
    shared expert ``beside`` the block (called by the layer on the block's input) is checked as a dense FFN."""
    ecall = trace.get(experts)
    parsed = experts_call(ecall.args, ecall.kwargs) if ecall is not None else None
    if ecall is None or parsed is None or ecall.y is None:
        raise DerivationError(f"the experts of {path} are not called with (tokens, expert ids, routing weights)")
    fused = FusedExperts(experts)
    n_exp = fused.num_experts
    router = [m for m, c in _leaves(trace, call.module)
              if _shape2d(m) == (n_exp, hidden) and not _inside(m, experts)]
    if not router:
        raise DerivationError(f"no router (a {n_exp} x {hidden} projection) in {path}")
    x_in = _flat(call.x, hidden)
    gate = next((m for m, c in _leaves(trace, call.module) if c.y is not None and c.y.shape[-1] == 1
                 and _same(_flat(c.x, hidden), x_in)), None)
    shared = [(n, c) for n, child in call.module.named_children() if (c := trace.get(child)) is not None
              and c.module is not experts and not _inside(router[0], c.module) and not _inside(experts, c.module)
              and _leaves(trace, c.module) and _same(_flat(c.x, hidden), x_in) and c.y is not None
              and c.y.shape[-1] == hidden]
    if len(shared) + (beside is not None) > 1:
        raise DerivationError(f"several shared experts in {path}")
    x, idx, w = parsed
    y_experts = fused.output(x.float(), idx, w)
    if not _same(y_experts, ecall.y.float().reshape(y_experts.shape), 1e-3):
        raise DerivationError(f"the experts of {path} do not compute what their layout flags say")
    total = ecall.y.float().reshape(call.yout.shape)
    roles.paths.update(router=rel(router[0]), experts=rel(experts), shared_gate=None, gate=None, up=None,
                       gate_up=None, down=None)
    if shared:
        scall = shared[0][1]
        dense = _dense_roles(trace, rel, f"{path}.{shared[0][0]}", scall, hidden)
        dense.pop("conv1d")
        roles.paths.update(dense)
        factor = torch.sigmoid(trace.called(gate).yout.float()).reshape(-1, 1) if gate is not None else 1.0
        total = total + (factor * scall.yout.float().reshape(-1, hidden)).reshape(total.shape)
        roles.paths["shared_gate"] = rel(gate) if gate is not None else None
    if not _same(total, call.yout.float(), 1e-3):
        raise DerivationError(f"{path}'s output is not its routed experts' sum (plus a shared expert)")
    if beside is not None:
        bpath, bcall = beside
        if any(p.dim() == 3 for p in bcall.module.parameters()):
            raise DerivationError(f"{bpath} beside the mixture of experts {path} is not a dense FFN")
        dense = _dense_roles(trace, rel, bpath, bcall, hidden)
        dense.pop("conv1d")
        roles.paths.update(dense)


def _loose_ffn_roles(trace: Trace, names: dict[int, str], layer: nn.Module, lcall: Call,
                     loose: list[tuple[nn.Module, Call]], hidden: int, roles: LayerRoles) -> tuple[Call, Call]:
    """An FFN made of projections the decoder layer calls itself (``mlp`` is None; ``up``/``gate``/``gate_up`` and
    ``down`` name them): the last one writing the residual width is ``down``, those reading what the first reads
    are its inputs, as in an FFN module. Returns the calls of the first input projection and of ``down``."""
    base = names[id(layer)]
    rel = lambda m: names[id(m)][len(base) + 1 if base else 0:]  # noqa: E731
    dense = _dense_roles(trace, rel, "the decoder layer", lcall, hidden, loose=loose)
    used = {dense[k] for k in ("gate", "up", "gate_up", "down") if dense[k]}
    extra = [rel(m) for m, _ in loose if rel(m) not in used]
    if extra:
        raise DerivationError(f"{', '.join(extra)} is called in a decoder layer beside its FFN projections but "
                              "is not one of them")
    roles.conv1d = dense.pop("conv1d")
    roles.paths.update(dense, mlp=None)
    calls = {rel(m): c for m, c in loose}
    return min((calls[p] for p in used if p != dense["down"]), key=lambda c: c.order), calls[dense["down"]]


def _is_linear_branch(trace: Trace, ffn_call: Call, proj: nn.Module, down: nn.Module) -> bool:
    """Doubling ``proj``'s output doubles the down projection's input (``up``), or not (``gate``)."""
    seen: dict[str, torch.Tensor] = {}
    h1 = proj.register_forward_hook(lambda m, a, out: out * 2)
    h2 = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        trace.rerun(ffn_call, ffn_call.xin)
    finally:
        h1.remove()
        h2.remove()
    return _same(seen.get("x"), trace.called(down).xin * 2)


def _layer_roles(trace: Trace, names: dict[int, str], layer: nn.Module, hidden: int) -> LayerRoles:
    roles = LayerRoles()
    lcall = trace.get(layer)
    if lcall is None or lcall.x is None:
        raise DerivationError("a decoder layer was not called with the hidden states")
    for name, child in layer.named_children():
        c = trace.get(child)
        if c is not None and c.x is not None and c.y is not None and c.x.dim() == 3 and c.y.dim() == 2 \
                and c.x.shape[-1] == c.y.shape[-1] == hidden:
            raise DerivationError(f"{name} takes (batch, tokens, hidden) and returns the tokens flattened, (tokens, "
                                  "hidden): a block melayer does not read")
    units = _units(trace, layer, hidden)
    norms = [(p, c) for p, c in units if is_norm(trace, c, hidden)]
    blocks = [(p, c) for p, c in units if all(c is not n for _, n in norms)
              and any(True for _ in c.module.parameters())]  # dropout and other parameter-free identities
    mixers: list[tuple[str, Call]] = []
    ffns: list[tuple[str, Call]] = []
    for p, c in blocks:
        if c.xin.dim() != 3:  # flattened tokens: only a norm is told apart on them
            raise DerivationError(f"{p} reads the tokens flattened and is not a norm")
        (mixers if mixes_tokens(trace, c) else ffns).append((p, c))
    covered = [c.module for _, c in units]
    # an FFN of projections called by the layer itself (OPT, XGLM, BioGPT: fc1 -> activation -> fc2, no FFN module)
    loose = [(child, lc) for _, child in layer.named_children()
             if _weight2d(child) is not None and (lc := trace.get(child)) is not None and lc.x is not None]
    loose.sort(key=lambda mc: mc[1].order)
    for name, child in layer.named_children():
        if (trace.get(child) is not None and any(True for _ in child.parameters())
                and not any(child is m for m, _ in loose)
                and not any(child is m or _inside(child, m) or _inside(m, child) for m in covered)):
            raise DerivationError(f"{name} is called in a decoder layer but does not read and write "
                                  "(batch, tokens, hidden) like a norm, a mixer or an FFN")
    if len(mixers) > 1:
        where = "side by side" if _same(mixers[0][1].x, mixers[1][1].x) else "in a row"
        raise DerivationError(f"several token mixers {where} ({', '.join(p for p, _ in mixers)})")
    beside = None
    if len(ffns) == 2 and _same(_flat(ffns[0][1].x, hidden), _flat(ffns[1][1].x, hidden)):
        # an MoE block and a dense shared expert on the same input, their outputs added (Granite-MoE's shared_mlp)
        moe = [i for i, (_, c) in enumerate(ffns) if any(is_fused_experts(m) for m in c.module.modules())]
        if len(moe) == 1:
            beside = ffns.pop(1 - moe[0])
    if len(ffns) + bool(loose) > 1:
        names_ = [p for p, _ in ffns] + (["the projections called by the layer itself"] if loose else [])
        raise DerivationError(f"several position-wise blocks side by side ({', '.join(names_)})")

    def reads(block: Call) -> str | None:  # the last norm before the block whose output the block reads
        return next((p for p, n in reversed(norms)
                     if n.order < block.order and _same(_flat(n.y, hidden), _flat(block.x, hidden))), None)

    def follows(block: Call) -> str | None:  # the first norm after the block that reads its output
        return next((p for p, n in norms
                     if n.order > block.order and _same(_flat(n.x, hidden), _flat(block.y, hidden))), None)

    for role in LAYER_ROLES:
        roles.paths[role] = None
    roles.norms = [c.module for _, c in norms]
    roles.post_ln = _renormalises(trace, lcall, norms, hidden)
    if mixers:
        path, mcall = mixers[0]
        roles.paths.update(attn=path, pre_attn_norm=reads(mcall), post_attn_norm=follows(mcall))
        roles.mixer_kind = "attention" if _is_softmax_attention(mcall) else "other"
        writers = [m for m, c in _leaves(trace, mcall.module) if c.y is not None and c.y.shape[-1] == hidden]
        if not ffns and not loose and writers:  # no FFN: the mixer's last projection writing the residual width
            base = names[id(layer)]
            roles.paths["mixer_out"] = names[id(writers[-1])][len(base) + 1 if base else 0:]
    if ffns:
        path, fcall = ffns[0]
        roles.paths.update(pre_ffn_norm=reads(fcall), post_ffn_norm=follows(fcall))
        _ffn_roles(trace, names, layer, path, fcall, hidden, roles, beside)
        src = trace.called(layer.get_submodule(roles.paths["pre_ffn_norm"])).x if roles.paths["pre_ffn_norm"] else fcall.x
        roles.parallel = bool(mixers) and _same(src, lcall.x)
    elif loose:
        first, down = _loose_ffn_roles(trace, names, layer, lcall, loose, hidden, roles)
        roles.paths.update(pre_ffn_norm=reads(first), post_ffn_norm=follows(down))
        src = trace.called(layer.get_submodule(roles.paths["pre_ffn_norm"])).x if roles.paths["pre_ffn_norm"] else first.x
        roles.parallel = bool(mixers) and _same(_flat(src, hidden), _flat(lcall.x, hidden))
    if not mixers and not ffns and not loose:
        raise DerivationError("no mixer and no FFN found in a decoder layer")
    return roles


def _renormalises(trace: Trace, lcall: Call, norms: list[tuple[str, Call]], hidden: int) -> bool:
    """Post-LN: the layer's output is a norm's output (GPT-1), or its input reaches the output only through a norm
    (MiniMax carries the pre-attention norm's output as the residual): doubling the input leaves the output as
    it is. Either way every layer renormalises the residual stream."""
    if not norms:
        return False
    if _same(_flat(norms[-1][1].y, hidden), _flat(lcall.y, hidden)):
        return True
    try:
        doubled = trace.rerun(lcall, lcall.xin * 2)
    except Exception:  # a layer that cannot be called again on its own: not measured
        return False
    return _same(doubled, lcall.yout, 1e-3)


def _logit_scale(model: PreTrainedModel, head: nn.Module, body_call: Call | None, out: Any) -> float:
    """The factor between the LM head's output and the model's logits (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``...), measured; 1.0 for most families. Final soft-capping is undone first."""
    logits = getattr(out, "logits", None)
    if body_call is None or body_call.y is None or logits is None:
        raise DerivationError("the model returned no logits")
    z = head(body_call.y).float()
    target = logits.float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        target = torch.atanh((target / cap).clamp(-0.999999, 0.999999)) * cap
    if z.shape != target.shape:
        raise DerivationError("the LM head's output does not match the logits' shape")
    scale = float((z * target).sum() / (z * z).sum().clamp_min(1e-30))
    scale = 1.0 if abs(scale - 1.0) < 1e-4 else scale
    if not _same(z * scale, target, 1e-3):
        raise DerivationError("the logits are not a fixed multiple of the LM head's output")
    return scale


def _probe_ids(model: PreTrainedModel) -> torch.Tensor:
    emb = model.get_input_embeddings()
    vocab = int(getattr(emb, "num_embeddings", 0) or model.config.get_text_config().vocab_size)
    ids = [(3 + 7919 * i) % vocab for i in range(SEQ)]
    return torch.tensor([ids], device=execution_device(emb))


@torch.no_grad()
def derive_arch(model: PreTrainedModel) -> ArchSpec:
    """The architecture map of ``model``, derived as the module docstring says (raises :class:`DerivationError`
    with the reason when a role cannot be told)."""
    names = _names(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None:
        raise DerivationError("no input or output embeddings")
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(body, nn.Module) or body is model:
        body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:  # the child that holds the token embedding
        body = next((c for c in model.children() if any(m is embed for m in c.modules())), None)
    if not isinstance(body, nn.Module) or id(body) not in names:
        raise DerivationError("no decoder module (get_decoder() / base_model) separate from the LM head")
    layers_rel, layers = _decoder_layers(model, body)
    hidden = int(cast(torch.Tensor, embed.weight).shape[-1])  # torch types it Tensor | Module
    eager = "eager" if attn_implementation(model) not in (None, "eager") else None
    training = model.training
    model.eval()  # dropout off: the probes compare outputs
    trace = Trace(model)
    try:
        if eager:
            with attention_implementation(model, "eager"):
                out = model(input_ids=_probe_ids(model), use_cache=False)
        else:
            out = model(input_ids=_probe_ids(model), use_cache=False)
        for i, layer in enumerate(layers):  # a model that overflows cannot be probed: say so as the guard would
            y = lcall.y if (lcall := trace.get(layer)) is not None else None
            if y is not None and y.is_floating_point() and not bool(torch.isfinite(y).all()):
                raise NumericOverflow(overflow_message(f"layer {i}", y.dtype))
        scale = _logit_scale(model, head, trace.get(body), out)
        per_layer = [_layer_roles(trace, names, layer, hidden) for layer in layers]
        last_end = trace.called(layers[-1]).end
        final = sorted((c for c in trace.calls.values() if c.order > last_end and c.module is not head
                        and is_norm(trace, c, hidden)), key=lambda c: c.order)
        probes = {norm_probe(m, hidden) for r in per_layer for m in r.norms}
    except MelayerError:
        raise
    except Exception as exc:
        raise DerivationError(f"tracing the model failed ({type(exc).__name__}: {exc})") from None
    finally:
        trace.remove()
        model.train(training)
    if 2 * sum(r.post_ln for r in per_layer) > len(per_layer):
        raise DerivationError("post-LN layers: every layer renormalises the residual stream (its output is a "
                              "norm's output, or its input reaches the output only through a norm), so no "
                              "activation can stay massive in it")
    kinds = {k for k, _ in probes}
    offsets = {o for _, o in probes if o is not None}
    if len(kinds) > 1 or len(offsets) > 1:
        raise DerivationError(f"the layers' norms differ in kind or stored gain ({sorted(kinds)}, offsets {sorted(offsets)})")
    common = Counter(r.key() for r in per_layer).most_common(1)[0][0]
    base = next(r for r in per_layer if r.key() == common)
    layer_paths = {}
    for i, r in enumerate(per_layer):
        if r.key() != common:
            diff: dict[str, Any] = {k: v for k, v in r.paths.items() if base.paths.get(k) != v}
            if r.parallel != base.parallel:
                diff["parallel"] = r.parallel
            if r.mixer_kind != base.mixer_kind:
                diff["mixer_kind"] = r.mixer_kind
            layer_paths[i] = diff
    conv1d = {r.conv1d for r in per_layer if r.paths.get("down")}
    if len(conv1d) > 1:
        raise DerivationError("some layers store projections as Conv1D and some as Linear")
    body_path = names[id(body)]
    spec = ArchSpec(
        name=str(getattr(model.config, "model_type", "") or type(model).__name__),
        body=body_path,
        layers=f"{body_path}.{layers_rel}" if body_path else layers_rel,
        embed=names[id(embed)],
        final_norm=names[id(final[0].module)] if final else None,
        lm_head=names[id(head)],
        norm_kind=kinds.pop() if kinds else "rms",  # type: ignore[arg-type]
        norm_gain_offset=offsets.pop() if offsets else 0.0,
        conv1d=conv1d.pop() if conv1d else False,
        parallel=base.parallel,
        logit_scale=scale,
        mixer_kind=base.mixer_kind,
        layer_paths=layer_paths,
        **base.paths,  # type: ignore[arg-type]
    )
    return spec


# the roles in which the layers of a family read from its config alone may differ (see arch_from_config)
FFN_ROLES = frozenset({"mlp", "gate", "up", "gate_up", "down", "router", "experts", "shared_gate"})


def config_twin(config: dict[str, Any]) -> PreTrainedModel:
    """A tiny random-weight model of ``config``'s family (the config with tiny sizes, :func:`shrink_config`), made
    once per config and process (the same module each time: callers must not change its weights). Every 1-D
    parameter gets its own random offset: norms initialised alike give equal outputs, and then which one a block
    reads is ambiguous (Falcon's ln_attn / ln_mlp)."""
    return _config_twin(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _config_twin(config_json: str) -> PreTrainedModel:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from melayer.models.shrink import shrink_config

    config = json.loads(config_json)
    model_type = str(config.get("model_type") or "")
    tiny = shrink_config(config)
    if int(config.get("n_group") or 1) > 1:  # grouped routing: two groups of the twin's four experts, one kept,
        tiny.update(n_group=2, topk_group=1)  # so that checking the routing checks the grouping too
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        twin = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **tiny), dtype=torch.float32)
    except Exception as exc:
        raise UnsupportedArchitecture(f"cannot map model_type {model_type!r}: transformers cannot build it from its "
                                      f"config ({type(exc).__name__}); pass --arch NAME or --arch FILE.json") from None
    finally:
        transformers.logging.set_verbosity(level)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for param in twin.parameters():
            if param.dim() == 1 and param.is_floating_point():
                param.add_(0.1 * torch.randn(param.shape, generator=g, dtype=param.dtype))
        for name, buffer in twin.named_buffers():  # routers' correction biases (DeepSeek-V3): random, so that
            if name.endswith("e_score_correction_bias"):  # checking the routing checks that they are added
                buffer.copy_(torch.rand(buffer.shape, generator=g))
    return twin.eval()


def arch_from_config(config: dict[str, Any]) -> ArchSpec:
    """The architecture map of a checkpoint known only by its ``config.json`` (``melayer weights`` reads tensors
    without building the model): derived on a tiny random-weight twin of the same family (the config with tiny
    sizes). Where the twin's layers differ only in their FFN (dense layers before mixtures of experts), the map
    lists both layouts (``extra["ffn_variants"]``) and each layer of a checkpoint takes the one whose tensors it holds;
    families whose layers differ otherwise need the real layer pattern: load the model instead."""
    model_type = str(config.get("model_type") or "")
    twin = config_twin(config)
    try:
        spec = named_layout(derive_arch(twin))
    except DerivationError as exc:
        raise UnsupportedArchitecture(f"cannot map model_type {model_type!r}: {exc}; pass --arch NAME or "
                                      "--arch FILE.json naming the module paths") from None
    variants = [diff for _, diff in sorted(spec.layer_paths.items())]
    if any(set(diff) - FFN_ROLES for diff in variants):
        raise UnsupportedArchitecture(f"model_type {model_type!r}: its layers differ from each other; reading its "
                                      "weights without the model needs --arch FILE.json (or load the model)")
    if variants:  # layers that differ in their FFN only (dense layers before the mixtures of experts): each layer
        # of a checkpoint takes the layout whose FFN tensors it holds (LazyWeights.arch_at)
        unique = [dict(d) for d in {tuple(sorted(d.items())): d for d in variants}.values()]
        spec = spec.with_overrides(layer_paths={}, extra={**spec.extra, "ffn_variants": unique})
    if spec.experts is not None:
        spec = spec.with_overrides(extra={**spec.extra, "experts": _experts_layout(twin, spec, model_type)})
    spec = spec.with_overrides(**_value_output(twin.eval(), spec))
    spec = spec.with_overrides(**_first_input(twin, spec))
    layers = resolve(twin, spec.layers)
    first = layers[0] if isinstance(layers, nn.ModuleList) and len(layers) else None
    norm = resolve(first, spec.pre_attn_norm or spec.pre_ffn_norm or "") if first is not None else None
    eps = _norm_eps(norm, spec.norm_kind) if norm is not None else None
    return spec.with_overrides(extra={**spec.extra, "norm_eps": eps}) if eps is not None else spec


@torch.no_grad()
def _norm_eps(norm: nn.Module, kind: str) -> float | None:
    """A norm's epsilon: the module's own attribute (OPT's LayerNorm: 1e-5, not in its config), else measured
    (OLMo's weightless LayerNorm fixes it in its code): a norm scales ``x`` by ``1 / sqrt(v + eps)`` (``v`` its
    variance, or mean square), so with ``r = |norm(2x)| / |norm(x)|``, ``eps = 4 v (1 - r^2) / (r^2 - 4)``, for an
    ``x`` whose ``v`` is near the usual epsilons."""
    eps = next((v for k in ("eps", "variance_epsilon") if isinstance(v := getattr(norm, k, None), float)), None)
    if eps is not None:
        return eps
    weight = next((p for p in norm.parameters() if p.dim() == 1), None)
    size = weight.numel() if weight is not None else getattr(norm, "normalized_shape", (0,))[0]
    if not size:
        return None
    x = torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3e-3
    v = float(x.var(unbiased=False) if kind == "layer" else (x * x).mean())
    try:
        a, b = (float(norm(t.float()[None]).double().norm()) for t in (x, 2 * x))
    except Exception:  # a norm that cannot be called alone
        return None
    r2 = (b / a) ** 2 if a > 0 else 0.0
    measured = 4 * v * (1 - r2) / (r2 - 4) if r2 != 4 else 0.0
    return float(f"{measured:.2g}") if 0 < measured < 1e-2 else None


@torch.no_grad()
def _first_input(twin: PreTrainedModel, spec: ArchSpec) -> dict[str, Any]:
    """How the first layer's input at position 0 is made, measured on the twin: the token's embedding row times a
    scale (``"sqrt_hidden"`` when it is the square root of the hidden size, else the number), plus a row of a learned
    position table (OPT and BioGPT start at row 2). Nothing found that reproduces it: no change."""
    words = twin.get_input_embeddings()
    weight = cast(torch.Tensor, words.weight)
    first = int(getattr(twin.config, "bos_token_id", None) or 0)
    tokens = [first, (first + 1) % weight.shape[0]]  # two tokens: a scale must be the same for both (a norm of
    try:  # the embedding also scales each row, by its own factor)
        h0 = [twin(input_ids=torch.tensor([[t]]), output_hidden_states=True, use_cache=False).hidden_states[0][0, 0]
              for t in tokens]
    except Exception:  # a family that cannot run alone: the map keeps the plain embedding
        return {}
    tables = [(name, m) for name, m in twin.named_modules() if isinstance(m, nn.Embedding) and m is not words]
    hidden = weight.shape[1]

    def fit(h: torch.Tensor, token: int, row: torch.Tensor | None) -> float | None:
        emb, rest = weight[token].float(), h.float() - (row if row is not None else 0.0)
        scale = float(rest @ emb / (emb @ emb))
        return scale if float((rest - scale * emb).abs().max()) <= 1e-5 * float(h.abs().max()) else None

    for name, rows in [("", None)] + [(n, m.weight.float()) for n, m in tables if m.weight.shape[-1] == hidden]:
        for row in range(min(8, rows.shape[0]) if rows is not None else 1):
            scales = [fit(h, t, rows[row] if rows is not None else None) for h, t in zip(h0, tokens, strict=True)]
            if None not in scales and abs(cast(float, scales[0]) - cast(float, scales[1])) <= 1e-5 * abs(
                    cast(float, scales[0])):
                scale = cast(float, scales[0])
                named = "sqrt_hidden" if abs(scale - hidden ** 0.5) <= 1e-4 * scale else (1.0 if abs(scale - 1) <= 1e-6
                                                                                            else scale)
                found: dict[str, Any] = {"embed_scale": named}
                if rows is not None:
                    found.update(pos_embed=name, extra={**spec.extra, "pos_row": row})
                return found
    return {}


@torch.no_grad()
def _value_output(twin: nn.Module, spec: ArchSpec) -> dict[str, Any]:
    """The attention's value and output projections (``attn_v`` / ``attn_qkv``, ``attn_o``), measured on the twin
    where the map's own paths are absent: with one token, attention's output is o(v(x)), so the output projection
    is the one whose output is the attention's, and the value is the projection of the attention's input whose
    output (all of it, the last part of a fused q/k/v, or the last third of each head's q/k/v as GPT-NeoX lays
    them out) is exactly what the output projection reads. Nothing found: no change (the path is attention-free)."""
    layers = resolve(twin, spec.layers)
    layer = layers[0] if isinstance(layers, nn.ModuleList) and len(layers) else None
    attn = resolve(layer, spec.attn) if layer is not None else None
    if layer is None or attn is None or (resolve(layer, spec.attn_o) is not None
                                         and resolve(layer, spec.attn_v or spec.attn_qkv) is not None):
        return {}
    names = {id(m): n for n, m in layer.named_modules()}
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda m, a, out: seen.__setitem__(id(m), (a[0].detach(), out.detach())))
               for m in attn.modules() if isinstance(m, nn.Linear)]
    handles.append(attn.register_forward_hook(lambda m, a, out: seen.__setitem__(
        id(m), (torch.zeros(0), (out[0] if isinstance(out, tuple) else out).detach()))))
    try:
        twin(input_ids=torch.tensor([[1]]), use_cache=False)
    except Exception:  # a family that cannot run alone: nothing measured (melayer weights' twin check refuses it)
        return {}
    finally:
        for h in handles:
            h.remove()
    if id(attn) not in seen:
        return {}
    out = seen[id(attn)][1].reshape(-1)
    o = next((m for m in attn.modules() if isinstance(m, nn.Linear) and id(m) in seen
              and _same(seen[id(m)][1].reshape(-1), out, 1e-5)), None)
    if o is None:
        return {}
    o_in = seen[id(o)][0].reshape(-1)
    heads = int(getattr(twin.config, "num_attention_heads", 0) or 0)
    for m in attn.modules():
        if not isinstance(m, nn.Linear) or m is o or id(m) not in seen:
            continue
        y = seen[id(m)][1].reshape(-1)
        if y.numel() == o_in.numel() and _same(y, o_in, 1e-6):
            return {"attn_v": names[id(m)], "attn_qkv": None, "attn_o": names[id(o)]}
        if y.numel() > o_in.numel() and _same(y[-o_in.numel():], o_in, 1e-6):
            return {"attn_v": None, "attn_qkv": names[id(m)], "attn_o": names[id(o)]}
        if heads and y.numel() == 3 * o_in.numel() and _same(y.reshape(heads, 3, -1)[:, 2].reshape(-1), o_in, 1e-6):
            return {"attn_v": None, "attn_qkv": names[id(m)], "attn_o": names[id(o)],
                    "extra": {**spec.extra, "qkv_layout": "per_head"}}
        layout = _grouped_qkv(y, o_in, heads)
        if layout is not None:
            return {"attn_v": None, "attn_qkv": names[id(m)], "attn_o": names[id(o)],
                    "extra": {**spec.extra, "qkv_layout": layout}}
    return {}


def _grouped_qkv(y: torch.Tensor, o_in: torch.Tensor, heads: int) -> str | None:
    """How a fused q/k/v output ``y`` with fewer key/value heads than query heads holds the values, if one token's
    attention input to the output projection (``o_in``: each query head reads its group's value) says so:
    "stacked" (all queries, all keys, then all values: Falcon with multi-query attention) or "grouped" (per key/value
    head, its queries, its key, its value: Falcon's newer layout). The key/value head count is the shapes' own:
    (outputs - o_in) / (2 x head size)."""
    if not heads or o_in.numel() % heads:
        return None
    head_dim = o_in.numel() // heads
    kv = (y.numel() - o_in.numel()) // (2 * head_dim) if head_dim else 0
    if kv < 1 or heads % kv or y.numel() != (heads + 2 * kv) * head_dim:
        return None
    want = o_in.reshape(heads, head_dim)
    stacked = y[-kv * head_dim:].reshape(kv, head_dim)
    grouped = y.reshape(kv, heads // kv + 2, head_dim)[:, -1]
    for name, v in (("stacked", stacked), ("grouped", grouped)):
        if _same(v.repeat_interleave(heads // kv, dim=0).reshape(-1), want.reshape(-1), 1e-6):
            return name
    return None


def _experts_layout(twin: nn.Module, spec: ArchSpec, model_type: str) -> dict[str, Any]:
    """The fused experts' layout flags (what a checkpoint's 3-D expert tensors mean), read off the twin's experts
    module; families whose experts gate with a function of their own are refused."""
    layers = resolve(twin, spec.layers)  # the first layer with experts (DeepSeek-V3's first layers are dense)
    first = next((layer for layer in (layers if isinstance(layers, nn.ModuleList) else [])
                  if resolve(layer, spec.experts) is not None), None)
    module = resolve(first, spec.experts) if first is not None else None
    if module is None:
        raise UnsupportedArchitecture(f"model_type {model_type!r}: no experts module at {spec.experts}")
    gating = getattr(type(module), "_apply_gate", None)
    if gating is not None and getattr(gating, "__name__", "") != "_default_apply_gate":  # transformers' act(gate) x up
        raise UnsupportedArchitecture(f"model_type {model_type!r}: its experts gate with a function of their own "
                                      "(not act(gate) x up), which melayer weights does not compute; load the model "
                                      "and run melayer scan")
    routing = _routing(first, spec, twin.config) if first is not None else None
    if routing is None:
        raise UnsupportedArchitecture(f"model_type {model_type!r}: its router chooses experts neither by softmax "
                                      "top-k nor by grouped sigmoid scores with a correction bias, which melayer "
                                      "weights computes; load the model and run melayer scan")
    fused = FusedExperts(module)
    return {"has_gate": fused.has_gate, "transposed": fused.transposed, "concatenated": fused.concatenated,
            "has_bias": fused.has_bias, "routing": routing}


@torch.no_grad()
def _routing(layer: nn.Module, spec: ArchSpec, config: Any) -> str | None:
    """Which of :data:`~melayer.models.experts.ROUTINGS` the MoE block routes by, as
    :func:`melayer.models.experts.route` computes it with the config's ``num_experts_per_tok``, ``norm_topk_prob``,
    ``n_group``, ``topk_group`` and ``routed_scaling_factor`` (None: neither): the block is run once on random
    tokens (the twin's correction biases are random, :func:`config_twin`) and each routing compared with what its
    experts were called with."""
    block, experts, router = (resolve(layer, p) for p in (spec.mlp, spec.experts, spec.router))
    weight = getattr(router, "weight", None)
    k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if block is None or experts is None or not isinstance(weight, torch.Tensor) or k < 1:
        return None
    seen: list[Any] = []
    handle = experts.register_forward_hook(lambda m, a, kw, out: seen.append(experts_call(a, kw)), with_kwargs=True)
    x = torch.randn(1, 6, weight.shape[1], generator=torch.Generator().manual_seed(0))
    try:
        block(x)
    except Exception:  # a block that cannot be called alone: its routing is not checked, so not computed
        return None
    finally:
        handle.remove()
    if not seen or seen[0] is None:
        return None
    _, index, chosen = seen[0]
    order = index.sort(dim=-1)
    correction = getattr(router, "e_score_correction_bias", None)
    bias = correction if isinstance(correction, torch.Tensor) else getattr(router, "bias", None)
    logits = x.reshape(-1, weight.shape[1]) @ weight.float().T
    for routing in ROUTINGS:
        top_w, top_i = route(logits, k, routing, norm=getattr(config, "norm_topk_prob", None) in (None, True),
                             bias=bias if isinstance(bias, torch.Tensor) else None,
                             n_group=int(getattr(config, "n_group", None) or 1),
                             topk_group=int(getattr(config, "topk_group", None) or 1),
                             scale=float(getattr(config, "routed_scaling_factor", None) or 1.0))
        mine = top_i.sort(dim=-1)
        if torch.equal(order.values, mine.values) and torch.allclose(
                chosen.float().gather(-1, order.indices), top_w.gather(-1, mine.indices), atol=1e-5):
            return routing
    return None


def arch_for(model: PreTrainedModel, override: dict[str, Any] | ArchSpec | str | Path | None = None) -> ArchSpec:
    """The architecture map of ``model``: derived from the model (:func:`melayer.models.derive.derive_arch`; a
    named layout when the derived one equals it), then ``override`` applied, then checked against the model."""
    override = load_override(override)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(override, ArchSpec):
        spec = override
    elif override and "layers" in override and "name" in override:  # a complete hand-written map
        spec = ArchSpec(**{k: v for k, v in override.items() if k != "layer_paths"}).with_overrides(
            layer_paths=override.get("layer_paths") or {})
    else:
        try:
            base = named_layout(derive_arch(model))
        except DerivationError as exc:
            raise UnsupportedArchitecture(
                f"cannot map model_type {model_type!r}: {exc}. Pass --arch NAME to reuse a named layout "
                f"({', '.join(sorted(ARCHITECTURES))}) or --arch FILE.json naming the module paths") from None
        spec = base.with_overrides(**override) if override else base
    missing = missing_roles(model, spec)
    if missing:
        raise UnsupportedArchitecture(
            f"architecture map {spec.name!r} does not fit model_type {model_type!r}: not found: {', '.join(missing)}"
        )
    return spec
