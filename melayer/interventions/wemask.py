"""WeMask: scale down the top-k dims of the massive token's *attention input* in the layers after the ME layer.

What it does (the released reference code is described in shared/research/paper.md, sections 5.2 and 8):

* At each chosen decoder layer, a forward pre-hook on the ``attn`` role module rewrites its
  ``hidden_states`` argument, i.e. the attention input *after* the pre-attention norm (for post-norm
  families such as OLMo2 the attention reads the raw residual stream, and that is what is masked).
  The residual stream, the FFN and every other token are untouched; only the massive token's Q/K/V change.
* Only the massive token is masked: by default each sequence's first *real* token. Which tokens those are is
  a pure function of each attention call's own arguments (``melayer.capture.call_tokens``: the token that may
  attend only to itself under the call's attention mask, or position 0 when there is no mask), never state
  kept between hooks. So left padding is respected, tokens of cached decode steps are never masked
  (``generate()`` with a KV cache equals a no-cache recompute under the same mask), every sequence start of a
  packed batch with a block-diagonal mask is masked (a packed batch without one is refused), and gradient
  checkpointing, which re-runs each layer during backward, masks exactly what the first pass masked.
* ``token="massive"`` masks, at each chosen layer, every real token whose largest |value| entering the layer
  passes the :class:`Criterion` cutoff computed from *that token's own* median |value| (abs_min, median_ratio),
  in every pass. The decision depends only on the token itself, so a massive token is masked alike in the
  prompt, in a cached continuation and in decoding: cached and uncached scoring agree.
* ``k = int(rate * hidden_size)`` dims are scaled by ``1 - gamma`` (``gamma = 1``: zeroed), chosen by
  |value| of that token's attention input (``select="activation"``, the released code's rule, but per row
  instead of averaged over the batch) or by |effective gain| of the pre-attention norm (``select="weight"``,
  the paper's "weight-guided" wording).

* Hybrid models (SSM, gated delta-net or short-convolution layers beside attention): by default only the
  softmax-attention layers after the ME layer are masked; a layer whose token mixer is not attention has no
  attention pattern for the massive token to dominate and is left alone. ``mask_mixers=True`` masks the input
  of those mixers too (the same rule, at the mixer's input). Layers given explicitly are masked whatever their
  mixer. The hooks act on each call's input only, so every family's cache (KV caches, SSM and convolution
  states of hybrid caches) sees the masked inputs alike with and without it.

Nothing is monkey-patched and no weight is touched: ``remove()`` (or leaving the ``with`` block) removes
every hook and the model is exactly what it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal, cast, get_args

import torch

from melayer.analysis.criterion import Criterion
from melayer.analysis.me_layer import cached_me_layer, find_me_layer
from melayer.capture import Hooks, call_tokens, edit_site, hidden_arg
from melayer.models.loading import LM
from melayer.util.errors import MelayerError

_log = logging.getLogger("melayer")

SelectRule = Literal["activation", "weight"]  # which dims: the largest |activation| or |pre-attention norm gain|
TokenRule = Literal["first", "massive", "offset"]  # which token's attention input is masked
SELECT_RULES: tuple[SelectRule, ...] = get_args(SelectRule)
TOKEN_RULES: tuple[TokenRule, ...] = get_args(TokenRule)


def select_rule(select: str) -> SelectRule:
    """``select`` checked to be one of :data:`SELECT_RULES` (a :class:`MelayerError` naming them if not)."""
    if select not in SELECT_RULES:
        raise MelayerError(f"unknown --select / WeMask select rule {select!r}; use one of {', '.join(SELECT_RULES)}")
    return cast(SelectRule, select)


def token_rule(token: str) -> TokenRule:
    """``token`` checked to be one of :data:`TOKEN_RULES` (a :class:`MelayerError` naming them if not)."""
    if token not in TOKEN_RULES:
        raise MelayerError(f"unknown WeMask token rule {token!r}; use one of {', '.join(TOKEN_RULES)}")
    return cast(TokenRule, token)


# ----------------------------------------------------------------------------------------------------
# small parsers shared by the CLI and the lm-eval wrapper


def parse_layers(spec: str | int | Iterable[int] | None, num_layers: int) -> list[int] | None:
    """``"4,5,6"``, ``"4-17"``, ``"4-6,9"`` (also ``;``/``+``/space separated, for lm-eval's comma-split
    model_args), an int, or a list of ints -> sorted unique layer indices; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise MelayerError(f"invalid layer list {spec!r}")
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise MelayerError("empty layer list: give e.g. 4,5,6 or 4-17")
        items = []
        for part in re.split(r"[,;+\s]+", text):
            if not part:
                continue
            m = re.fullmatch(r"(-?\d+)(?:(?:-|\.\.|:)(-?\d+))?", part)
            if not m:
                raise MelayerError(f"invalid layer list {spec!r}: {part!r} is not a layer or a range A-B")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise MelayerError(f"invalid layer range {part!r}: end before start")
            items.extend(range(lo, hi + 1))
    else:
        try:
            items = [int(x) for x in spec]
        except (TypeError, ValueError):
            raise MelayerError(f"invalid layer list {spec!r}") from None
    bad = [i for i in items if not 0 <= i < num_layers]
    if bad:
        raise MelayerError(f"layer {bad[0]} is out of range: the model has layers 0-{num_layers - 1}")
    return sorted(set(items))


def format_layers(layers: Sequence[int]) -> str:
    """[4, 5, 6, 9] -> "4-6,9"."""
    out: list[str] = []
    layers = sorted(layers)
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(out) or "none"


# ----------------------------------------------------------------------------------------------------


def mask_width(rate: float, hidden_size: int) -> int:
    """Dims masked per token: ``k = int(rate x hidden_size)`` (the floor; 0 masks nothing)."""
    return int(float(rate) * hidden_size)


def check_settings(rate: float, *, select: str = "activation", gamma: float = 1.0,
                   token: str = "first") -> tuple[float, float]:
    """Validate WeMask settings before anything is loaded (the CLI, lm-eval's wrapper and :class:`WeMask` call
    it); returns ``(rate, gamma)`` as floats. Raises :class:`MelayerError` naming the bad setting."""
    try:
        rate, gamma = float(rate), float(gamma)
    except (TypeError, ValueError):
        raise MelayerError(f"WeMask rate and gamma must be numbers (got rate={rate!r}, gamma={gamma!r})") from None
    if not 0.0 <= rate <= 1.0:
        raise MelayerError(f"WeMask rate {rate:g} is out of range: rate must be in [0, 1] (a fraction of the "
                           "hidden size)")
    if not 0.0 <= gamma <= 1.0:
        raise MelayerError(f"WeMask gamma must be in [0, 1] (1 zeroes the dims), got {gamma:g}")
    select_rule(select)
    token_rule(token)
    return rate, gamma


class WeMask:
    """A WeMask intervention bound to one model; :func:`wemask` builds one with the same arguments.

    Use it as a context manager (re-enterable: each ``with`` applies and removes the hooks) or with
    :meth:`apply` / :meth:`remove`.

    Args:
        lm: the model.
        rate: the fraction of the hidden size masked per token (see :func:`wemask`).
        layers: the layers to mask (see :func:`wemask`).
        select: ``"activation"`` or ``"weight"`` (see :func:`wemask`).
        gamma: the masked dims are scaled by ``1 - gamma``.
        token: ``"first"``, ``"massive"``, or ``"offset"`` (the real token at index ``offset``; a control).
        me_layer: the ME layer, when known (else one scan finds it, cached on ``lm``).
        criterion: the massive-activation criterion.
        scan_prompts: the prompts of the scan that finds the ME layer.
        dims: a control: these fixed dims (exactly ``k`` of them) instead of each token's top ``k``.
        offset: with ``token="offset"``, the index of the real token masked.
        mask_mixers: also mask layers whose token mixer is not softmax attention (see the module docstring).

    Raises:
        MelayerError: a setting is out of range, or no ME layer is found.
    """

    def __init__(
        self,
        lm: LM,
        rate: float,
        layers: str | Iterable[int] | None = None,
        select: SelectRule = "activation",
        gamma: float = 1.0,
        token: TokenRule = "first",
        me_layer: int | None = None,
        criterion: Criterion | None = None,
        scan_prompts: Sequence[str] | None = None,
        *,
        dims: Sequence[int] | None = None,
        offset: int = 0,
        mask_mixers: bool = False,
    ) -> None:
        self.rate, self.gamma = check_settings(rate, select=select, gamma=gamma, token=token)
        self.lm = lm
        self.select = select
        self.token = token
        self.criterion = criterion or Criterion()
        self.hidden_size = lm.hidden_size
        self.k = mask_width(self.rate, self.hidden_size)
        n = lm.num_layers
        if me_layer is not None and not 0 <= int(me_layer) < n:
            raise MelayerError(f"ME layer {me_layer} is out of range: the model has layers 0-{n - 1}")
        parsed = parse_layers(layers, n)
        self.me_layer_source = "given" if me_layer is not None else None
        if parsed is None:
            if me_layer is None and self.k > 0:
                cached = cached_me_layer(lm, scan_prompts, self.criterion)
                me_layer = find_me_layer(lm, scan_prompts, criterion=self.criterion,
                                         hint=" (no persistent massive activation); pass layers= or me_layer= explicitly")
                self.me_layer_source = "scan (cached on the LM)" if cached else "scan"
                _log.info("WeMask: no ME layer or layers given; %s ME layer %s of %s",
                          "reusing the scanned" if cached else "one scan found", me_layer, lm.name)
            if me_layer is None:  # rate too small to mask anything: no layers needed
                parsed = []
            else:
                # softmax-attention layers only, unless asked: an SSM, convolution or linear-attention mixer has no
                # attention pattern for the massive token to dominate
                parsed = [i for i in range(int(me_layer) + 1, n)
                          if mask_mixers or lm.arch.at(i).mixer_kind == "attention"]
                if not parsed and self.k > 0:
                    raise MelayerError(f"the ME layer ({me_layer}) is the last layer: no layer after it to mask; "
                                       "pass layers= explicitly")
        self.me_layer = None if me_layer is None else int(me_layer)
        self.mask_mixers = mask_mixers
        self.layers: list[int] = parsed
        # controls: fixed dims instead of the top-k of each token; token="offset": the real token at that index
        self.dims = None if dims is None else sorted({int(d) for d in dims})
        if self.dims is not None and (len(self.dims) != self.k or not all(0 <= d < self.hidden_size for d in self.dims)):
            raise MelayerError(f"WeMask dims must be {self.k} distinct dims in 0-{self.hidden_size - 1}")
        self.offset = int(offset)
        if token == "offset" and self.offset < 0:
            raise MelayerError("WeMask token offset must be >= 0")
        self._weight_idx: dict[int, torch.Tensor] = {}
        if select == "weight":
            for layer in self.layers:
                self._weight_idx[layer] = self._top_gain_dims(layer)
        self._hooks = Hooks()
        self._active = False
        self._peaks: dict[int, torch.Tensor] = {}  # token="massive": per layer, |layer input| of the current call
        self._record: dict[int, list[dict[str, Any]]] = {}
        self.forwards_masked = 0  # forward passes of the decoder stack in which something was masked

    # -- setup -----------------------------------------------------------------------------------------
    def _top_gain_dims(self, layer: int) -> torch.Tensor:
        if self.lm.arch.pre_attn_norm is None:
            raise MelayerError(
                f"select='weight' needs a pre-attention norm, but {self.lm.arch.name} ({self.lm.name}) has none "
                "(its attention reads the raw residual stream); use select='activation'")
        gain = self.lm.norm_gain(layer, "pre_attn_norm")
        if gain is None:
            raise MelayerError(f"select='weight': the pre-attention norm of layer {layer} has no weight; "
                               "use select='activation'")
        k = min(self.k, gain.numel())
        return gain.abs().topk(k).indices.sort().values.to(self.lm.device)

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    @property
    def is_noop(self) -> bool:
        return self.k == 0 or self.gamma == 0.0 or not self.layers

    def apply(self) -> WeMask:
        """Install the hooks (persistent until :meth:`remove`).

        Returns:
            The mask itself, so that ``wm = melayer.wemask(lm, 0.05).apply()`` keeps it.

        Raises:
            MelayerError: the mask is already applied, or a masked layer has no attention module.
        """
        if self._active:
            raise MelayerError("this WeMask is already applied")
        self._active = True
        if self.is_noop:
            return self
        for layer in self.layers:
            if self.token == "massive":
                self._hooks.pre(self.lm.layers[layer], self._massive_hook(layer), with_kwargs=True)
            if self.lm.module(layer, "attn") is None:
                raise MelayerError(f"layer {layer} of {self.lm.name} has no attention module")
            edit_site(self._hooks, self.lm, layer, "attn_in", self._attn_hook(layer), with_call=True)
        return self

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before :meth:`apply`."""
        self._hooks.remove()
        self._peaks = {}
        self._active = False

    def __enter__(self) -> WeMask:
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- hooks -----------------------------------------------------------------------------------------
    def _massive_hook(self, layer: int):
        def fn(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            # a function of this call's input only: a recomputation (gradient checkpointing) gets the same
            self._peaks[layer] = hidden_arg(args, kwargs).detach().abs().float()

        return fn

    def _targets(self, layer: int, h: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(rows, positions, past) to mask in this attention call, from the call's own arguments only."""
        tokens = call_tokens(h, kwargs)
        if self.token == "first":
            hit = tokens.starts.nonzero()
        elif self.token == "offset":
            pos = kwargs.get("position_ids")
            if not isinstance(pos, torch.Tensor):
                raise MelayerError("WeMask token='offset' needs the attention call's position_ids")
            pos = pos.expand(h.shape[0], -1) if pos.shape[0] == 1 else pos
            hit = ((pos[:, -h.shape[1]:] == self.offset) & tokens.real.to(pos.device)).nonzero()
        else:
            a = self._peaks.pop(layer, None)
            if a is None or a.shape[:2] != h.shape[:2]:
                return None
            # each token against its own median |a|: the decision depends on nothing but that token's state, so
            # a token is masked alike in the prompt, in a cached continuation and in decoding
            cut = (a.median(dim=-1).values * self.criterion.median_ratio).clamp(min=self.criterion.abs_min)
            hit = ((a.amax(dim=-1) > cut) & tokens.real.to(a.device)).nonzero()
        if hit.numel() == 0:
            return None
        return hit[:, 0], hit[:, 1], tokens.past

    def _attn_hook(self, layer: int):
        """The edit at the attention input: scale the chosen dims of the chosen tokens (never in place)."""
        keep = 1.0 - self.gamma

        def fn(h: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
            target = self._targets(layer, h, kwargs)
            if target is None:
                return None
            rows, positions, past = target
            rows, positions = rows.to(h.device), positions.to(h.device)  # the call's mask may sit elsewhere
            sel = h[rows, positions]  # (n, D)
            if self.dims is not None:
                idx = torch.tensor(self.dims, device=h.device).expand(sel.shape[0], -1)
            elif self.select == "activation":
                idx = sel.abs().topk(self.k, dim=-1).indices
            else:
                idx = self._weight_idx[layer].to(h.device).expand(sel.shape[0], -1)
            scaled = sel.scatter(1, idx, sel.gather(1, idx) * keep)
            new = h.clone()  # never in place: for post-norm families h IS the residual stream
            new[rows, positions] = scaled
            if layer == self.layers[0]:  # the first masked layer of a new forward pass
                self._record = {}
                self.forwards_masked += 1
            self._record[layer] = [
                {"row": int(r), "position": int(p) + past, "dims": sorted(d)}
                for r, p, d in zip(rows.tolist(), positions.tolist(), idx.tolist())
            ]
            return new

        return fn

    # -- reporting -------------------------------------------------------------------------------------
    def masked_dims(self) -> dict[int, list[int]]:
        """The masked dims of each layer.

        Returns:
            ``{layer: dims}``: fixed for ``select="weight"`` (and for fixed ``dims``); for ``select="activation"``
            the union over the masked tokens of the last masking forward pass.
        """
        if self.dims is not None:
            return {layer: list(self.dims) for layer in self.layers}
        if self.select == "weight":
            return {layer: idx.tolist() for layer, idx in self._weight_idx.items()}
        return {layer: sorted({d for rec in recs for d in rec["dims"]}) for layer, recs in self._record.items()}

    def describe(self) -> str:
        """The mask in words, as results and reports state it.

        Returns:
            One sentence: rate, k, the selection rule, the token, the layers (or why the mask is off).
        """
        if self.is_noop:
            why = "rate 0" if self.rate == 0 else ("gamma 0" if self.gamma == 0 else
                                                   ("k = int(rate x hidden) = 0" if self.k == 0 else "no layers"))
            return f"WeMask off ({why})"
        scale = "zeroed" if self.gamma == 1 else f"scaled by {1 - self.gamma:g}"
        who = {"first": "the first real token", "offset": f"the real token at index {self.offset}",
               "massive": "every token whose peak |a| passes the Criterion cutoff of its own median |a|"}[self.token]
        if self.dims is not None:
            return (f"WeMask rate {self.rate:g}: the fixed dims {self.dims} {'zeroed' if self.gamma == 1 else 'scaled'} "
                    f"in the attention input of {who} at layers {format_layers(self.layers)}")
        return (f"WeMask rate {self.rate:g}: top k={self.k} of {self.hidden_size} dims by {self.select} {scale} "
                f"in the attention input of {who} at layers {format_layers(self.layers)}"
                + (f" (after ME layer {self.me_layer}, {self.me_layer_source})" if self.me_layer is not None else ""))

    def to_dict(self) -> dict[str, Any]:
        """The mask's settings and what it masked, as JSON-ready data (``"schema": "melayer.wemask/1"``).

        Returns:
            The settings, the layers, the ME layer and where it came from, the masked dims and tokens, the rule
            in words.
        """
        return {
            "schema": "melayer.wemask/1",
            "model": self.lm.name,
            "rate": self.rate,
            "k": self.k,
            "hidden_size": self.hidden_size,
            "gamma": self.gamma,
            "select": self.select,
            "token": self.token,
            "offset": self.offset if self.token == "offset" else None,
            "fixed_dims": self.dims,
            "layers": list(self.layers),
            "me_layer": self.me_layer,
            "me_layer_source": self.me_layer_source,
            "active": self._active,
            "site": "attention input (after the pre-attention norm), via a pre-hook on each layer's attn module",
            "masked_dims": {str(layer): dims for layer, dims in self.masked_dims().items()},
            "masked_tokens": {str(layer): recs for layer, recs in self._record.items()},
            "criterion": self.criterion.to_dict() if self.token == "massive" else None,
            "rule": self.describe(),
        }


def wemask(
    lm: LM,
    rate: float,
    layers: str | Iterable[int] | None = None,
    select: SelectRule = "activation",
    gamma: float = 1.0,
    token: TokenRule = "first",
    me_layer: int | None = None,
    criterion: Criterion | None = None,
    scan_prompts: Sequence[str] | None = None,
    mask_mixers: bool = False,
) -> WeMask:
    """Build a WeMask for ``lm``, not yet applied (the ``--wemask RATE`` option of every command).

    This is the way to make a mask; it returns a :class:`WeMask` (whose constructor takes the same arguments).

    >>> with melayer.wemask(lm, 0.05) as wm:      # masks every forward inside the block
    ...     lm.model.generate(**batch)
    >>> wm = melayer.wemask(lm, 0.05).apply()     # persistent until wm.remove()

    Args:
        lm: the model.
        rate: the fraction of the hidden size masked per token (``k = int(rate * hidden_size)`` dims).
        layers: the layers to mask, as a list or a string (``"4-"``, ``"4,6,8-10"``); default: every layer after
            the ME layer whose token mixer is softmax attention.
        select: ``"activation"`` (the dims of largest |value| of the token's attention input) or ``"weight"``
            (largest |gain| of the pre-attention norm).
        gamma: the masked dims are scaled by ``1 - gamma`` (1 zeroes them).
        token: ``"first"`` (each sequence's first real token) or ``"massive"`` (every token whose activation
            passes the criterion).
        me_layer: the ME layer, when known; without it and without ``layers`` it is found with
            :func:`melayer.scan` on ``scan_prompts`` (default: the shipped prompts).
        criterion: the massive-activation criterion of that scan and of ``token="massive"``.
        scan_prompts: the prompts of that scan.
        mask_mixers: also mask the input of later layers whose token mixer is not softmax attention (SSM, gated
            delta-net, short convolution); by default they are left alone.

    Returns:
        The mask: a context manager (re-enterable), or ``apply()`` / ``remove()``; ``to_dict()`` describes it.

    Raises:
        MelayerError: a setting is out of range or no ME layer is found.
    """
    return WeMask(lm, rate, layers=layers, select=select, gamma=gamma, token=token, me_layer=me_layer,
                  criterion=criterion, scan_prompts=scan_prompts, mask_mixers=mask_mixers)
