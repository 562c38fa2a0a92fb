"""``melayer rigidity``: does the massive token's representation stay fixed once formed, and does it reduce
the diversity of what attention sees?

Three measurements, all reduced inside hooks (one layer's activations at a time):

* **Consecutive-layer similarity**: cos(h_{l-1}, h_l) of the massive token's residual state (h_{-1} = the
  embedding), next to the same figure averaged over ordinary tokens (every real token except the massive
  token(s) and the first token).
* **Cross-input invariance**: per layer, the mean pairwise cosine of the massive token's state across
  prompts. Caveat, stated in the output: with causal attention a position-0 token sees only itself, so if
  every prompt starts with the same BOS its state is *identical* in every prompt and the similarity is
  trivially 1.0. The non-trivial figures are therefore reported separately: pairs of prompts whose massive
  token differs (a different token or a position > 0), and a second pass without the tokenizer's special
  prefix (no BOS), where the first token is each prompt's own first word: its cross-prompt similarity over
  pairs with different first tokens, and whether it still carries the massive activation.
  The last token of each prompt is the ordinary-token baseline.
* **Diversity of attention inputs**: per layer, the mean pairwise cosine and the effective rank (Roy &
  Vetterli 2007: exp of the entropy of the normalised singular values) of the attention module's input
  (the pre-attention norm's output; the raw residual stream for post-norm families), over a prompt's real
  tokens, with and without the massive token, and, as a same-size control, without another token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from melayer.analysis.criterion import Criterion
from melayer.analysis.me_layer import massive_dims_at, massive_positions
from melayer.analysis.perplexity import special_prefix
from melayer.analysis.scan import ScanResult, default_prompts, scan
from melayer.capture import (
    Hooks,
    TokenTracker,
    first_real,
    forward_body,
    hidden_arg,
    layer_output,
)
from melayer.capture.batching import planned
from melayer.capture.encoding import tokenize
from melayer.models.loading import LM
from melayer.util.console import track
from melayer.util.errors import MelayerError
from melayer.util.results import Result

DEFAULT_PROMPTS = 32


def effective_rank(x: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank of a (tokens, dim) matrix: exp(entropy of sigma / sum(sigma))."""
    s = torch.linalg.svdvals(x.double())
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def mean_pairwise_cos(x: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows of ``x`` (NaN with fewer than two rows)."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    g = u @ u.T
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def _pair_mean(vecs: torch.Tensor, keep: np.ndarray | None = None) -> float | None:
    """Mean pairwise cosine of the rows of ``vecs`` over pairs (i < j) where ``keep[i, j]`` (all if None)."""
    n = vecs.shape[0]
    if n < 2:
        return None
    u = torch.nn.functional.normalize(vecs.double(), dim=-1)
    g = (u @ u.T).numpy()
    iu = np.triu_indices(n, 1)
    vals = g[iu]
    if keep is not None:
        vals = vals[keep[iu]]
    return float(vals.mean()) if vals.size else None


class _Recorder:
    def __init__(self, lm: LM, tracker: TokenTracker, dims: Sequence[int], exclude_first: bool) -> None:
        self.lm = lm
        self.tracker = tracker
        self.dims = torch.tensor(list(dims))
        self.exclude_first = exclude_first
        n = lm.num_layers
        self.inputs: dict[int, torch.Tensor] = {}
        self.cos_massive: list[list[float]] = [[] for _ in range(n)]
        self.cos_ordinary: list[list[float]] = [[] for _ in range(n)]
        self.state: list[list[torch.Tensor]] = [[] for _ in range(n)]  # massive token state per prompt
        self.last: list[list[torch.Tensor]] = [[] for _ in range(n)]  # last real token state per prompt
        self.massive_abs: list[list[float]] = [[] for _ in range(n)]  # max |a| on the massive dims, tracked token
        self.median_abs: list[list[float]] = [[] for _ in range(n)]  # median |a| of the layer output, per prompt
        self.div: list[dict[str, list[float]]] = [{"cos_with": [], "cos_without": [], "erank_with": [],
                                                   "erank_without": [], "cos_drop_other": [], "erank_drop_other": [],
                                                   "tokens": []} for _ in range(n)]

    def in_input_order(self, order: Sequence[int]) -> None:
        """Rows were recorded in the order the prompts were fed (``order``: their input indices); put every
        per-prompt record back in input order."""
        back = [int(i) for i in np.argsort(order, kind="stable")]

        def sort(xs: list) -> list:
            return [xs[i] for i in back] if len(xs) == len(back) else xs

        for l in range(len(self.cos_massive)):
            self.cos_massive[l], self.cos_ordinary[l] = sort(self.cos_massive[l]), sort(self.cos_ordinary[l])
            self.massive_abs[l], self.median_abs[l] = sort(self.massive_abs[l]), sort(self.median_abs[l])
            for name in ("state", "last"):
                store = getattr(self, name)
                if store[l]:
                    store[l] = [torch.cat(store[l])[torch.tensor(back)]]
            self.div[l] = {k: sort(v) for k, v in self.div[l].items()}

    def install(self, hooks: Hooks, diversity: bool = True) -> None:
        for i, layer in enumerate(self.lm.layers):
            hooks.pre(layer, self._pre(i), with_kwargs=True)
            hooks.forward(layer, self._post(i))
            if diversity:
                hooks.pre(self.lm.required(i, "attn"), self._attn(i), with_kwargs=True)

    def _pre(self, layer: int):
        def fn(module, args, kwargs):
            self.inputs[layer] = hidden_arg(args, kwargs)
        return fn

    def _others(self, b: int) -> torch.Tensor:
        cols, real_rows = self.tracker.current()
        real = real_rows[b].clone()
        first = int(first_real(real[None])[0])
        real[int(cols[b])] = False
        if self.exclude_first:
            real[first] = False
        return real

    def _post(self, layer: int):
        def fn(module, args, output):
            h = layer_output(output).detach().float()
            x = self.inputs.pop(layer).detach().float()
            cos = torch.nn.functional.cosine_similarity(x, h, dim=-1)  # (B, T)
            cols = self.tracker.cols
            rows = torch.arange(h.shape[0])
            self.cos_massive[layer].extend(cos[rows, cols].tolist())
            state = h[rows, cols].cpu()
            self.state[layer].append(state)
            self.last[layer].append(h[:, -1].cpu())
            self.massive_abs[layer].extend(state[:, self.dims].abs().max(dim=1).values.tolist())
            for b in range(h.shape[0]):
                others = self._others(b)
                self.cos_ordinary[layer].append(float(cos[b][others].mean()) if others.any() else float("nan"))
                self.median_abs[layer].append(float(h[b][self.tracker.real[b]].abs().median()))
        return fn

    def _attn(self, layer: int):
        def fn(module, args, kwargs):
            x = hidden_arg(args, kwargs).detach().float()
            d = self.div[layer]
            for b in range(x.shape[0]):
                real = self.tracker.real[b]
                col = int(self.tracker.cols[b])
                keep = real.clone()
                keep[col] = False
                # control with the same token count: drop the last real token (or the one before it) instead
                other = real.clone()
                cols = real.nonzero().flatten().tolist()
                drop = [c for c in reversed(cols) if c != col][:1]
                other[drop] = False
                xr, xk, xo = x[b][real].cpu(), x[b][keep].cpu(), x[b][other].cpu()
                d["cos_with"].append(mean_pairwise_cos(xr))
                d["cos_without"].append(mean_pairwise_cos(xk))
                d["cos_drop_other"].append(mean_pairwise_cos(xo))
                d["erank_with"].append(effective_rank(xr))
                d["erank_without"].append(effective_rank(xk))
                d["erank_drop_other"].append(effective_rank(xo))
                d["tokens"].append(int(real.sum()))
        return fn


@torch.no_grad()
def _run(lm: LM, prompts: Sequence[str], positions: Sequence[int], dims: Sequence[int], batch_size: int | None,
         add_special_tokens: bool, diversity: bool, progress: bool, desc: str) -> tuple[_Recorder, list[list[int]]]:
    tracker = TokenTracker(positions)
    rec = _Recorder(lm, tracker, dims, exclude_first=True)
    ids = [tokenize(lm, p, add_special_tokens) for p in prompts]
    order: list[int] = []
    with Hooks() as hooks:
        tracker.install(hooks, lm)
        rec.install(hooks, diversity=diversity)
        for idx, batch in track(planned(lm, ids, max_batch=batch_size), desc, total=len(ids), enabled=progress,
                                advance=lambda item: len(item[0])):
            tracker.expect(idx)
            order.extend(idx)
            forward_body(lm, batch)
    rec.in_input_order(order)
    return rec, ids


def _nanmean(values: Sequence[float]) -> float | None:
    arr = np.array(values, dtype=float)
    return float(np.nanmean(arr)) if arr.size and not np.isnan(arr).all() else None


@dataclass
class RigidityResult(Result):
    """Result of :func:`rigidity`; ``to_dict()`` is what ``rigidity.json`` holds and ``from_dict`` (or
    ``RigidityResult.load(path)``) reads it back."""

    kind = "rigidity"

    model: str
    num_layers: int
    me_layer: int
    massive_dims: list[int]
    massive_positions: list[int]
    massive_token_ids: list[int]
    trivially_identical: bool
    consecutive: list[dict[str, Any]]
    cross_input: list[dict[str, Any]]
    diversity: list[dict[str, Any]]
    no_bos: dict[str, Any] | None
    notes: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The headline means of the rigidity measurements, from the ME layer on.

        Returns:
            Means over the layers after (or from) the ME layer: consecutive-layer cosines of the massive and of
            ordinary tokens, cross-input cosines (all pairs, non-trivial pairs, without BOS, the last-token
            baseline), and the attention input's mean cosine and effective rank with and without the massive
            token; None where nothing was measured.
        """
        after = [r for r in self.consecutive if r["layer"] > self.me_layer]
        div_after = [r for r in self.diversity if r["layer"] > self.me_layer]
        nontrivial = [r["massive_nontrivial_pairs"] for r in self.cross_input
                      if r["layer"] >= self.me_layer and r["massive_nontrivial_pairs"] is not None]
        nobos = [r["first_token_distinct_pairs"] for r in (self.no_bos or {}).get("per_layer", [])
                 if r["layer"] >= self.me_layer and r["first_token_distinct_pairs"] is not None]
        last = [r["last_token_pairs"] for r in self.cross_input if r["layer"] >= self.me_layer and r["last_token_pairs"] is not None]
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        return {
            "after_me_layer_consecutive_cos_massive": mean([r["massive_cos"] for r in after if r["massive_cos"] is not None]),
            "after_me_layer_consecutive_cos_ordinary": mean([r["ordinary_cos"] for r in after if r["ordinary_cos"] is not None]),
            "cross_input_massive_all_pairs": mean([r["massive_all_pairs"] for r in self.cross_input
                                                   if r["layer"] >= self.me_layer and r["massive_all_pairs"] is not None]),
            "cross_input_massive_nontrivial_pairs": mean(nontrivial),
            "cross_input_no_bos_first_token": mean(nobos),
            "cross_input_last_token_baseline": mean(last),
            "after_me_layer_attn_input_cos_with": mean([r["mean_cos_with"] for r in div_after if r["mean_cos_with"] is not None]),
            "after_me_layer_attn_input_cos_without": mean([r["mean_cos_without"] for r in div_after if r["mean_cos_without"] is not None]),
            "after_me_layer_erank_with": mean([r["erank_with"] for r in div_after if r["erank_with"] is not None]),
            "after_me_layer_erank_without": mean([r["erank_without"] for r in div_after if r["erank_without"] is not None]),
            "after_me_layer_erank_drop_other": mean([r["erank_drop_other"] for r in div_after if r["erank_drop_other"] is not None]),
            "after_me_layer_attn_input_cos_drop_other": mean([r["mean_cos_drop_other"] for r in div_after
                                                              if r["mean_cos_drop_other"] is not None]),
        }

    def to_dict(self) -> dict[str, Any]:
        """The result as ``rigidity.json`` holds it.

        Returns:
            JSON-ready data, with ``"schema": "melayer.rigidity/<version>"``.
        """
        return {
            "schema": self.schema(),
            "model": self.model, "num_layers": self.num_layers, "settings": self.settings,
            "me_layer": self.me_layer, "massive_dims": self.massive_dims,
            "massive_token_positions": self.massive_positions, "massive_token_ids": self.massive_token_ids,
            "cross_input_trivially_identical": self.trivially_identical,
            "notes": self.notes,
            "summary": self.summary(),
            "consecutive": self.consecutive,
            "cross_input": self.cross_input,
            "no_bos": self.no_bos,
            "attention_input_diversity": self.diversity,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RigidityResult:
        """The result a ``rigidity.json`` holds.

        Args:
            data: a loaded ``rigidity.json`` (what :meth:`to_dict` returned).

        Returns:
            The rigidity result.
        """
        return cls(model=data["model"], num_layers=data["num_layers"], me_layer=data["me_layer"],
                   massive_dims=data["massive_dims"], massive_positions=data["massive_token_positions"],
                   massive_token_ids=data["massive_token_ids"],
                   trivially_identical=data["cross_input_trivially_identical"], consecutive=data["consecutive"],
                   cross_input=data["cross_input"], diversity=data["attention_input_diversity"],
                   no_bos=data["no_bos"], notes=data["notes"], settings=data["settings"])


@torch.no_grad()
def rigidity(
    lm: LM,
    prompts: Sequence[str] | None = None,
    *,
    n_prompts: int | None = DEFAULT_PROMPTS,
    criterion: Criterion | None = None,
    scan_result: ScanResult | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> RigidityResult:
    """Rigidity, cross-input invariance and attention-input diversity around the ME layer (``melayer rigidity``).

    See the module docstring for the measures.

    Args:
        lm: the model.
        prompts: at least two prompts (default: the shipped prompt set).
        n_prompts: use the first this many prompts (None: all).
        criterion: the massive-activation criterion of the scan that locates the ME layer.
        scan_result: a scan of the same prompts, to skip that scan.
        batch_size: at most this many prompts per forward pass.
        progress: show progress bars.

    Returns:
        The layer-to-layer and cross-prompt similarities and effective ranks, as a :class:`RigidityResult`.

    Raises:
        MelayerError: fewer than two prompts, or no ME layer on them.
    """
    crit = criterion or Criterion()
    prompts = list(prompts) if prompts is not None else default_prompts()
    if n_prompts:
        prompts = prompts[:n_prompts]
    if len(prompts) < 2:
        raise MelayerError("rigidity needs at least 2 prompts (cross-input similarity compares prompts)")
    if any(not p.strip() for p in prompts):
        raise MelayerError("empty prompt: every prompt must contain text")
    base = scan_result or scan(lm, prompts, criterion=crit, batch_size=batch_size, progress=progress)
    L = base.me_layer
    if L is None:
        raise MelayerError(f"no ME layer found in {lm.name} on these {len(prompts)} prompts: nothing to measure")
    dims, _ = massive_dims_at(base, L)
    positions = massive_positions(base, L, dims)
    rec, ids = _run(lm, prompts, positions, dims, batch_size, True, True, progress, f"rigidity of {lm.name}")
    token_ids = [row[p] for row, p in zip(ids, positions)]
    n = lm.num_layers
    notes: list[str] = []

    # consecutive-layer similarity
    consecutive = [{"layer": l, "massive_cos": _nanmean(rec.cos_massive[l]), "ordinary_cos": _nanmean(rec.cos_ordinary[l]),
                    "ordinary_cos_std": float(np.nanstd(rec.cos_ordinary[l])) if rec.cos_ordinary[l] else None}
                   for l in range(n)]

    # cross-input invariance
    keys = list(zip(positions, token_ids))
    trivial = all(p == 0 for p in positions) and len(set(token_ids)) == 1
    m = len(prompts)
    nontrivial = np.array([[not (keys[i][0] == 0 and keys[j][0] == 0 and keys[i][1] == keys[j][1]) for j in range(m)]
                           for i in range(m)])
    cross = []
    for l in range(n):
        states = torch.cat(rec.state[l])
        last = torch.cat(rec.last[l])
        cross.append({"layer": l, "massive_all_pairs": _pair_mean(states),
                      "massive_nontrivial_pairs": _pair_mean(states, nontrivial) if nontrivial.any() else None,
                      "last_token_pairs": _pair_mean(last)})
    if trivial:
        notes.append(
            f"the massive token is position 0 (token id {token_ids[0]}) in every prompt: with causal attention it sees "
            "only itself, so its state is the same function of the same input in every prompt and its cross-input "
            "similarity is trivially 1.0 (up to float rounding from padding). This says nothing about rigidity; "
            "see 'no_bos' for the first token when prompts start with different tokens.")
    elif nontrivial.any():
        notes.append("cross-input similarity over pairs whose massive token differs (other token or position > 0) is "
                     "reported as massive_nontrivial_pairs")

    # second pass without the special prefix
    no_bos = None
    prefix = special_prefix(lm.tokenizer)
    if prefix:
        rec2, ids2 = _run(lm, prompts, [0] * m, dims, batch_size, False, False, progress, "rigidity (no BOS)")
        first_ids = [row[0] for row in ids2]
        distinct = np.array([[first_ids[i] != first_ids[j] for j in range(m)] for i in range(m)])
        per_layer = []
        for l in range(n):
            states = torch.cat(rec2.state[l])
            massive = [a > crit.cutoff(med) for a, med in zip(rec2.massive_abs[l], rec2.median_abs[l])]
            per_layer.append({
                "layer": l,
                "first_token_distinct_pairs": _pair_mean(states, distinct) if distinct.any() else None,
                "first_token_massive_share": float(np.mean(massive)),
                "first_token_max_abs_on_massive_dims": float(np.mean(rec2.massive_abs[l])),
                "first_token_consecutive_cos": _nanmean(rec2.cos_massive[l]),
            })
        no_bos = {"special_prefix_removed": prefix, "distinct_first_tokens": len(set(first_ids)),
                  "per_layer": per_layer,
                  "meaning": "prompts encoded without the tokenizer's special prefix; the first token is the prompt's "
                             "own first token. 'first_token_massive_share': share of prompts whose first token is "
                             "massive on the massive dims by the scan criterion; similarity over prompt pairs with "
                             "different first tokens only"}
        ml = per_layer[L]["first_token_massive_share"]
        notes.append(f"without the special prefix, the first token is massive on dims {dims} at the ME layer in "
                     f"{ml:.0%} of prompts")
    else:
        notes.append("the tokenizer adds no special prefix: prompts already start with their own first token")

    diversity = []
    for l in range(n):
        d = rec.div[l]
        diversity.append({"layer": l, "mean_cos_with": _nanmean(d["cos_with"]), "mean_cos_without": _nanmean(d["cos_without"]),
                          "mean_cos_drop_other": _nanmean(d["cos_drop_other"]),
                          "erank_with": _nanmean(d["erank_with"]), "erank_without": _nanmean(d["erank_without"]),
                          "erank_drop_other": _nanmean(d["erank_drop_other"]), "tokens_mean": _nanmean(d["tokens"])})
    if lm.arch.pre_attn_norm is None:
        notes.append(f"{lm.arch.name} has no pre-attention norm: the attention input is the raw residual stream")
    return RigidityResult(
        model=lm.name, num_layers=n, me_layer=L, massive_dims=dims, massive_positions=positions,
        massive_token_ids=token_ids, trivially_identical=trivial, consecutive=consecutive, cross_input=cross,
        diversity=diversity, no_bos=no_bos, notes=notes,
        settings={"prompts": len(prompts), "criterion": crit.to_dict(),
                  "ordinary_tokens": "every real token except the massive token(s) and the first token",
                  "consecutive": "cos(h_{l-1}, h_l) of the residual stream; h_{-1} = the embedding output",
                  "effective_rank": "Roy & Vetterli 2007: exp(-sum p log p), p = singular values / their sum, "
                                    "of the attention input over one prompt's real tokens, mean over prompts",
                  "drop_other": "control for 'without': the same token count, dropping the prompt's last real token "
                                "instead of the massive token (removing any token lowers the effective rank)"},
    )
