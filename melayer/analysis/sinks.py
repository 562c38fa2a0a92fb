"""Attention sinks, measured as in Gu et al., "When Attention Sink Emerges in Language Models: An Empirical
View" (ICLR 2025, arXiv:2410.10781).

For key token k of a prompt with T tokens, in layer l and head h, the importance score is the mean
attention it receives from the queries that can see it:

    alpha_k^{l,h} = 1/(T - k + 1) * sum_{i=k..T} A^{l,h}_{i,k}        (1-based, as in the paper)

i.e. every query at or after k, *the key itself included* (query i = k), as in the paper; queries that
a sliding window hides from k are left out of the mean. The sink rate is the share of (layer, head)
pairs with alpha_k > epsilon (paper: epsilon = 0.3, T = 64), averaged over prompts. ``sink_rate`` is for
the first token (Sink_1); the same numbers are reported for the massive token when it is elsewhere.

Short prompts inflate the score: a head that attends uniformly gives the first token
alpha_1 = H_T / T (harmonic number over length), which exceeds 0.3 for T <= 9. Gu et al. use T = 64
(uniform alpha_1 = 0.074). So prompts shorter than ``min_tokens`` (default 16, uniform alpha_1 = 0.21)
are skipped, and the uniform-attention value is reported next to every result. ``text_windows``
gives Gu et al.'s setting: fixed 64-token windows of the shipped WikiText-2 excerpt.

How the probabilities are obtained: for the measuring forward pass only, the model's attention
implementation is switched to ``eager`` (transformers' own reference softmax(QK^T) code, which returns
the probabilities from every attention module), and a forward hook on each attention module reduces
them to the few numbers above at once, so at most one layer's (batch, heads, T, T) probabilities exist
at a time. The implementation is restored afterwards. Nothing else changes: any hooks the caller has
installed (e.g. WeMask) stay active, so this measures the model as it runs. Recomputing softmax(QK^T)
by hand from q_proj/k_proj would need per-family code (q/k norms, RoPE variants, GQA, Gemma's
query_pre_attn_scalar, soft-capping, sliding windows, fused qkv in Phi-3 and GPT-2); eager attention
is the library's own implementation of exactly that, so we use it. Eager is a little slower than
SDPA on long prompts and differs from it only by floating-point rounding.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from melayer.analysis.perplexity import ppl_text, special_prefix
from melayer.analysis.scan import default_prompts
from melayer.capture import Hooks, forward_body
from melayer.capture.attention import probabilities
from melayer.capture.batching import planned
from melayer.capture.encoding import tokenize
from melayer.models.loading import LM
from melayer.util.console import track
from melayer.util.errors import MelayerError
from melayer.util.results import Result

DEFAULT_EPSILON = 0.3
DEFAULT_MAX_TOKENS = 64
DEFAULT_MIN_TOKENS = 16


def uniform_alpha_first(length: int) -> float:
    """alpha_1 of a head that attends uniformly over a causal prefix of ``length`` tokens: H_T / T."""
    return float(sum(1.0 / i for i in range(1, length + 1)) / length) if length > 0 else float("nan")


def text_windows(lm: LM, n: int = 32, length: int = DEFAULT_MAX_TOKENS) -> list[str]:
    """Up to ``n`` consecutive windows of the shipped WikiText-2 excerpt, each ``length`` tokens long once the
    tokenizer's special prefix is added (decoded back to text, so they can be fed like prompts)."""
    tok = lm.tokenizer
    ids = tok(ppl_text(), add_special_tokens=False)["input_ids"]
    body = max(1, length - len(special_prefix(tok)))
    out = []
    for start in range(0, len(ids) - body + 1, body):
        out.append(tok.decode(ids[start : start + body]))
        if len(out) >= n:
            break
    return out


def eager_attention(lm: LM) -> contextlib.AbstractContextManager[None]:
    """Run the model with transformers' eager attention inside the block (the edited eager attention while an
    attention edit such as ACT is active); the previous implementation is restored on exit."""
    return probabilities(lm)


PROBS_BUDGET = 32 * 2**20  # attention probabilities held at once (floats): one layer's (batch, heads, T, T)


def _heads(lm: LM) -> int:
    cfg = lm.config
    return int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 32)


def _visible(mask4: Any, b: int, real: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: query i can see key k, from the 4-D mask the attention module received."""
    if isinstance(mask4, torch.Tensor) and mask4.dim() == 4:
        m = mask4[b, 0][real][:, real]
        if m.dtype == torch.bool:
            return m
        return m > torch.finfo(m.dtype).min / 2
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class _SinkReducer:
    def __init__(self, num_layers: int, targets: Sequence[int] | None) -> None:
        self.num_layers = num_layers
        self.targets = targets  # per prompt: massive-token position (among real tokens) or None
        self.mask2: torch.Tensor | None = None
        self.indices: list[int] = []
        self.masks4: dict[int, Any] = {}
        self.first: list[list[np.ndarray | None]] = []  # prompt -> layer -> (H,)
        self.massive: list[list[np.ndarray | None]] = []
        self.top_is_first: list[list[np.ndarray | None]] = []
        self.row_mass: dict[int, list[float]] = {}  # layer -> per prompt: mean attention row sum over real keys

    def start(self, mask2: torch.Tensor, indices: Sequence[int]) -> None:
        """Before each batch: its 2-D mask and the input indices of its rows (any order)."""
        self.mask2 = mask2.bool()
        self.indices = list(indices)
        need = max(self.indices) + 1
        for store in (self.first, self.massive, self.top_is_first):
            store.extend([[None] * self.num_layers for _ in range(need - len(store))])

    def pre(self, layer: int):
        def fn(module, args, kwargs):
            self.masks4[layer] = kwargs.get("attention_mask")
        return fn

    def post(self, layer: int):
        def fn(module, args, kwargs, output):
            w = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if not isinstance(w, torch.Tensor):
                raise MelayerError(f"layer {layer}'s attention module returned no attention probabilities even in "
                                   "eager mode; this architecture is not supported by the sink measurement")
            w = w.detach().float()
            mask4 = self.masks4.pop(layer, None)
            for b in range(w.shape[0]):
                real = self.mask2[b].to(w.device)
                n = int(real.sum())
                a = w[b][:, real][:, :, real]  # (H, n, n)
                vis = _visible(mask4, b, real, n, w.device).to(a.dtype)
                seen = vis.sum(0).clamp_min(1.0)  # per key: how many queries see it
                alpha = (a * vis).sum(1) / seen  # (H, n): mean attention each key receives
                self.row_mass.setdefault(layer, []).append(float((a * vis).sum(-1).mean()))
                row = self.indices[b]
                self.first[row][layer] = alpha[:, 0].cpu().numpy()
                self.top_is_first[row][layer] = (alpha.argmax(dim=1) == 0).cpu().numpy()
                if self.targets is not None:
                    k = int(self.targets[row])  # beyond the truncated prompt: not measured (NaN)
                    self.massive[row][layer] = (alpha[:, k].cpu().numpy() if k < n
                                                else np.full(alpha.shape[0], np.nan, dtype=np.float32))
        return fn


@dataclass
class SinkResult(Result):
    """Attention-sink measurement; ``to_dict()`` is what ``sinks.json`` holds and ``from_dict`` (or
    ``SinkResult.load(path)``) reads it back."""

    kind = "sinks"

    model: str
    epsilon: float
    max_tokens: int | None
    n_prompts: int
    tokens_per_prompt: list[int]
    alpha_first: np.ndarray  # (prompts, layers, heads)
    top_is_first: np.ndarray  # (prompts, layers, heads) bool: the first token gets the largest alpha
    alpha_massive: np.ndarray | None = None
    massive_positions: list[int] | None = None
    me_layer: int | None = None
    min_tokens: int | None = None
    skipped: list[int] = field(default_factory=list)  # indices of prompts shorter than min_tokens
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uniform_alpha_first(self) -> float:
        """Mean over the measured prompts of the score a uniformly attending head would give the first token."""
        return float(np.mean([uniform_alpha_first(t) for t in self.tokens_per_prompt]))

    @property
    def num_layers(self) -> int:
        return int(self.alpha_first.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.alpha_first.shape[2])

    @property
    def sink_rate(self) -> float:
        """Sink_1^epsilon: share of (layer, head) pairs whose first-token score exceeds epsilon, mean over prompts."""
        return float(np.nanmean(self._indicator(self.alpha_first)))

    def _indicator(self, a: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(a), np.nan, a > self.epsilon)

    @property
    def sink_rate_massive(self) -> float | None:
        return None if self.alpha_massive is None else float(np.nanmean(self._indicator(self.alpha_massive)))

    def layer_rate(self, alpha: np.ndarray | None = None) -> list[float]:
        """The sink rate of each layer: the share of (prompt, head) pairs whose score exceeds epsilon.

        Args:
            alpha: scores shaped (prompts, layers, heads); default the first token's (``alpha_first``).

        Returns:
            One rate (0-1) per layer; NaN for a layer without attention.
        """
        a = self.alpha_first if alpha is None else alpha
        return np.nanmean(self._indicator(a), axis=(0, 2)).tolist()

    def first_sink_layer(self, min_share: float = 0.5) -> int | None:
        """First layer in which at least ``min_share`` of the (prompt, head) pairs sink on the first token.

        Args:
            min_share: the share of (prompt, head) pairs that must exceed epsilon.

        Returns:
            The layer index, or None when no layer reaches the share.
        """
        for layer, rate in enumerate(self.layer_rate()):
            if rate >= min_share:
                return layer
        return None

    def first_sink_layer_any(self) -> int | None:
        """First layer with any head whose mean (over prompts) first-token score exceeds epsilon.

        Returns:
            The layer index, or None.
        """
        mean = self.alpha_first.mean(axis=0)
        for layer in range(mean.shape[0]):
            if (mean[layer] > self.epsilon).any():
                return layer
        return None

    def to_dict(self) -> dict[str, Any]:
        """The result as ``sinks.json`` holds it.

        Returns:
            JSON-ready data, with ``"schema": "melayer.sinks/<version>"``.
        """
        with warnings.catch_warnings():  # layers without attention are all-NaN: their means are NaN ("n/a")
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._to_dict()

    def _to_dict(self) -> dict[str, Any]:
        first = self.first_sink_layer()
        out: dict[str, Any] = {
            "schema": self.schema(),
            "model": self.model,
            "settings": {
                "epsilon": self.epsilon, "max_tokens": self.max_tokens, "min_tokens": self.min_tokens,
                "prompts": self.n_prompts, "prompts_skipped_too_short": len(self.skipped),
                "metric": "alpha_k = mean over the queries i >= k that can see key k (the key itself included, "
                          "sliding-window-hidden queries excluded) of the attention probability A[i, k]; "
                          "Gu et al. (ICLR 2025) eq. for the importance score",
                "sink_rate": "share of (layer, head) pairs with alpha_1 > epsilon, averaged over prompts (Sink_1^eps)",
                "first_sink_layer_rule": "first layer where >= 50% of (prompt, head) pairs have alpha_1 > epsilon",
                "probabilities": "transformers' eager attention, switched on for the measuring pass only; "
                                 "active hooks on the model stay in effect",
            },
            "num_layers": self.num_layers, "num_heads": self.num_heads,
            "tokens_per_prompt": {"mean": float(np.mean(self.tokens_per_prompt)), "min": int(min(self.tokens_per_prompt)),
                                  "max": int(max(self.tokens_per_prompt))},
            "sink_rate": self.sink_rate,
            "uniform_attention_alpha_first": self.uniform_alpha_first,
            "uniform_attention_note": "alpha_1 that a head attending uniformly would get on these prompts (H_T / T); "
                                      "a sink is only meaningful well above it",
            "sink_rate_per_layer": self.layer_rate(),
            "alpha_first": self.alpha_first.mean(axis=0).tolist(),
            "sink_share_first": np.nanmean(self._indicator(self.alpha_first), axis=0).tolist(),
            "first_token_is_top_sink_share": float(np.nanmean(self.top_is_first)),
            "first_token_is_top_sink_per_layer": np.nanmean(self.top_is_first, axis=(0, 2)).tolist(),
            "me_layer": self.me_layer,
            "first_sink_layer": first,
            "first_sink_layer_any_head": self.first_sink_layer_any(),
            "first_sink_layer_minus_me_layer": (first - self.me_layer) if first is not None and self.me_layer is not None else None,
            **self.extra,
        }
        if self.alpha_massive is not None:
            out["massive_token_positions"] = self.massive_positions
            out["alpha_massive"] = np.nanmean(self.alpha_massive, axis=0).tolist()
            out["sink_rate_massive"] = self.sink_rate_massive
            out["sink_rate_massive_per_layer"] = self.layer_rate(self.alpha_massive)
        # the measurement itself (prompts x layers x heads), from which everything above is computed
        out["per_prompt"] = {"tokens": list(self.tokens_per_prompt), "skipped": list(self.skipped),
                             "alpha_first": self.alpha_first.tolist(), "top_is_first": self.top_is_first.tolist(),
                             "alpha_massive": None if self.alpha_massive is None else self.alpha_massive.tolist()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SinkResult:
        """The result a ``sinks.json`` holds.

        Args:
            data: a loaded ``sinks.json`` (what :meth:`to_dict` returned).

        Returns:
            The sink result.
        """
        raw, s = data["per_prompt"], data["settings"]
        massive = raw["alpha_massive"]
        extra = {k: v for k, v in data.items() if k in _EXTRA_KEYS}
        return cls(model=data["model"], epsilon=s["epsilon"], max_tokens=s["max_tokens"], n_prompts=s["prompts"],
                   tokens_per_prompt=raw["tokens"], alpha_first=np.array(raw["alpha_first"], dtype=np.float32),
                   top_is_first=np.array(raw["top_is_first"], dtype=bool),
                   alpha_massive=None if massive is None else np.array(massive, dtype=np.float32),
                   massive_positions=data.get("massive_token_positions"), me_layer=data["me_layer"],
                   min_tokens=s["min_tokens"], skipped=raw["skipped"], extra=extra)


_EXTRA_KEYS = ("source", "layers_without_softmax_attention", "layers_without_softmax_attention_note",
               "learned_sink_share_per_layer", "learned_sink_note")  # what a measurement adds where it applies
LEARNED_SINK_MIN = 1e-3
LEARNED_SINK_NOTE = ("attention rows over the prompt's tokens sum to less than 1: a learned sink logit per head "
                     "(gpt-oss) takes this share of each row (mean over queries, heads and prompts); every alpha is a "
                     "token's share as the model computes it, so what the learned sink takes counts for no token")


@torch.no_grad()
def measure_sinks(
    lm: LM,
    prompts: Sequence[str] | str | None = None,
    epsilon: float = DEFAULT_EPSILON,
    *,
    massive_positions: Sequence[int] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    min_tokens: int | None = DEFAULT_MIN_TOKENS,
    batch_size: int | None = None,
    me_layer: int | None = None,
    progress: bool = False,
) -> SinkResult:
    """Measure attention sinks of ``lm`` as it runs (active hooks included); see the module docstring.

    ``massive_positions`` (one per prompt, index among the prompt's tokens) adds the same scores for the
    massive token; ``max_tokens`` truncates each prompt (Gu et al. use T = 64; None keeps everything);
    prompts with fewer than ``min_tokens`` tokens are skipped (see the module docstring; None keeps all).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else default_prompts()
    if not prompts or any(not p.strip() for p in prompts):
        raise MelayerError("empty prompt: every prompt must contain text")
    if not 0.0 < float(epsilon) < 1.0:
        raise MelayerError(f"epsilon must be in (0, 1), got {epsilon:g}")
    if max_tokens is not None and max_tokens < 1:
        raise MelayerError("max_tokens must be >= 1")
    if massive_positions is not None and len(massive_positions) != len(prompts):
        raise MelayerError("massive_positions needs one position per prompt")
    skipped: list[int] = []
    if min_tokens:
        lengths0 = [len(lm.tokenizer(p)["input_ids"]) for p in prompts]
        keep = [i for i, n in enumerate(lengths0) if n >= min_tokens]
        skipped = [i for i in range(len(prompts)) if i not in set(keep)]
        if not keep:
            raise MelayerError(f"every prompt is shorter than {min_tokens} tokens: the sink score of short prompts is "
                               "dominated by their length (a uniform head gives the first token 1/T x (1 + 1/2 + ... + 1/T)); "
                               "give longer prompts or lower min_tokens")
        prompts = [prompts[i] for i in keep]
        if massive_positions is not None:
            massive_positions = [massive_positions[i] for i in keep]
    reducer = _SinkReducer(lm.num_layers, massive_positions)
    rows = [tokenize(lm, p)[:max_tokens] if max_tokens else tokenize(lm, p) for p in prompts]
    lengths = [len(r) for r in rows]
    heads = _heads(lm)
    # at most PROBS_BUDGET attention probabilities at once: one layer's (batch x heads x T x T)
    plan = planned(lm, rows, max_batch=batch_size, cost=lambda n, width: n * heads * width * width,
                   max_cost=PROBS_BUDGET)
    attention = [i for i in range(lm.num_layers) if lm.arch.at(i).mixer_kind == "attention"]
    if not attention:
        raise MelayerError(f"{lm.name} has no softmax-attention layer: attention sinks do not apply")
    with eager_attention(lm), Hooks() as hooks:
        for i in attention:
            attn = lm.required(i, "attn")
            hooks.pre(attn, reducer.pre(i), with_kwargs=True)
            hooks.forward(attn, reducer.post(i), with_kwargs=True)
        for idx, batch in track(plan, f"attention sinks of {lm.name}", total=len(rows), enabled=progress,
                                advance=lambda item: len(item[0])):
            reducer.start(batch["attention_mask"], idx)
            forward_body(lm, batch)
    def stacked(store: list[list[np.ndarray | None]]) -> np.ndarray:  # layers without attention: NaN ("n/a")
        return np.stack([np.stack([np.full(heads, np.nan, dtype=np.float32) if a is None else a for a in r])
                         for r in store])

    first = stacked(reducer.first)
    top = stacked(reducer.top_is_first)
    extra: dict[str, Any] = {} if len(attention) == lm.num_layers else {
        "layers_without_softmax_attention": [i for i in range(lm.num_layers) if i not in attention],
        "layers_without_softmax_attention_note": "n/a: their token mixer (SSM, convolution, linear attention) has no "
                                                 "attention probabilities; rates are over the attention layers only"}
    learned = [1.0 - float(np.mean(reducer.row_mass[i])) if reducer.row_mass.get(i) else None
               for i in range(lm.num_layers)]
    if max((x for x in learned if x is not None), default=0.0) > LEARNED_SINK_MIN:
        extra["learned_sink_share_per_layer"] = learned
        extra["learned_sink_note"] = LEARNED_SINK_NOTE
    if len(attention) == lm.num_layers:
        top = top.astype(bool)
    massive = stacked(reducer.massive) if massive_positions is not None else None
    return SinkResult(model=lm.name, epsilon=float(epsilon), max_tokens=max_tokens, n_prompts=len(prompts),
                      tokens_per_prompt=[int(x) for x in lengths], alpha_first=first, top_is_first=top,
                      alpha_massive=massive, massive_positions=list(massive_positions) if massive_positions is not None else None,
                      me_layer=me_layer, min_tokens=min_tokens, skipped=skipped, extra=extra)


def sinks(lm: LM, prompts: Sequence[str] | None = None, *, windows: int = 32, epsilon: float = DEFAULT_EPSILON,
          max_tokens: int | None = DEFAULT_MAX_TOKENS, min_tokens: int | None = DEFAULT_MIN_TOKENS,
          n_prompts: int | None = None, batch_size: int | None = None, progress: bool = True) -> SinkResult:
    """Attention sinks per layer and head (Gu et al.'s metric), for the first token and the massive token
    (``melayer sinks``).

    The ME layer and the massive token are located with one scan of the same prompts; then the sinks are
    measured for both (see :func:`measure_sinks` for the measurement alone).

    Args:
        lm: the model.
        prompts: the prompts (default: ``windows`` windows of the shipped WikiText-2 excerpt, Gu et al.'s T=64
            setting).
        windows: without ``prompts``, this many windows.
        epsilon: a head sinks on a token if its mean attention to it exceeds this.
        max_tokens: truncate prompts to this many tokens (None or 0: no limit).
        min_tokens: skip prompts shorter than this (short prompts inflate the score; None or 0: keep all).
        n_prompts: use the first this many prompts (None: all).
        batch_size: at most this many prompts per forward pass.
        progress: show progress bars.

    Returns:
        The per-layer, per-head attention to the first and the massive token, as a :class:`SinkResult`.

    Raises:
        MelayerError: an empty prompt, a bad setting, or every prompt shorter than ``min_tokens``.
    """
    from melayer.analysis.me_layer import massive_dims_at, massive_positions
    from melayer.analysis.scan import scan

    if max_tokens is not None and max_tokens < 0 or min_tokens is not None and min_tokens < 0:
        raise MelayerError("--max-tokens and --min-tokens must be >= 0")
    if windows < 1:
        raise MelayerError("--windows must be >= 1")
    source = "prompts"
    texts = list(prompts) if prompts is not None else None
    if texts is None:
        texts = text_windows(lm, windows, max_tokens or DEFAULT_MAX_TOKENS)
        source = (f"{len(texts)} windows of {max_tokens or DEFAULT_MAX_TOKENS} tokens of melayer/data/ppl_text.txt "
                  "(WikiText-2 test excerpt)")
    texts = texts[:n_prompts] if n_prompts else texts
    found = scan(lm, texts, batch_size=batch_size, progress=progress)
    positions = None
    if found.me_layer is not None:
        dims, _ = massive_dims_at(found, found.me_layer)
        positions = massive_positions(found, found.me_layer, dims)
    result = measure_sinks(lm, texts, epsilon, massive_positions=positions, max_tokens=max_tokens or None,
                           min_tokens=min_tokens or None, batch_size=batch_size, me_layer=found.me_layer,
                           progress=progress)
    result.extra["source"] = source
    return result
