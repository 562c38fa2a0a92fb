"""Scan: stream every decoder layer's output, find massive activations, locate the ME layer.

Nothing of size layers x tokens x hidden is kept: each layer hook reduces its output on the fly to a
few numbers (median, top values, massive entries, |a| rows of a handful of candidate tokens).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from melayer.analysis.criterion import Criterion
from melayer.capture import Hooks, forward_body
from melayer.capture.batching import planned
from melayer.capture.reduce import LayerReducer
from melayer.models.loading import LM
from melayer.util.console import track
from melayer.util.errors import MelayerError
from melayer.util.results import Result

TOP_K = 8  # top |a| entries kept per layer and prompt
MAX_MASSIVE = 256  # massive entries kept per layer and prompt (a sane model has a handful)
N_CANDIDATES = 4  # tokens per layer whose full |a| row is kept (plus the first real token)


@dataclass
class PromptScan:
    """The per-prompt reduction of one forward pass."""

    index: int
    text: str
    tokens: list[str]
    medians: list[float]
    top: list[list[tuple[float, int, int]]]  # per layer: (signed value, position, dim)
    massive: list[list[tuple[float, int, int]]]  # per layer: (signed value, position, dim)
    rows: list[dict[int, np.ndarray]]  # per layer: position -> |a| over dims
    watched: list[dict[tuple[int, int], float]]  # per layer: value of every (pos, dim) massive at an earlier layer
    me_layer: int | None = None
    persistent: set[tuple[int, int]] = field(default_factory=set)
    eligible: bool = True

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def locate_me_layer(
    massive: Sequence[Sequence[tuple[float, int, int]]],
    watched: Sequence[dict[tuple[int, int], float]],
    medians: Sequence[float],
    crit: Criterion,
) -> tuple[int | None, set[tuple[int, int]]]:
    """The first layer holding a massive (pos, dim) that persists (see :class:`Criterion`), and every
    (pos, dim) that is massive at that layer or later and persists from where it first appeared."""
    n = len(massive)
    me_layer: int | None = None
    persistent: set[tuple[int, int]] = set()
    checked: set[tuple[int, int]] = set()
    for layer in range(n - 1):
        for _, pos, dim in massive[layer]:
            if (pos, dim) in checked:
                continue
            checked.add((pos, dim))
            later = [crit.persists(watched[j].get((pos, dim), 0.0), medians[j]) for j in range(layer + 1, n)]
            if later[0] and sum(later) / len(later) >= crit.persist_frac:
                me_layer = layer if me_layer is None else me_layer
                persistent.add((pos, dim))
    return me_layer, persistent


@dataclass
class ScanResult(Result):
    """Result of :func:`scan`; ``to_dict()`` is exactly what ``scan.json`` holds and ``from_dict`` (or
    ``ScanResult.load(path)``) reads it back.

    Attributes:
        model: the model's name.
        num_layers: decoder layers in the model.
        hidden_size: width of the residual stream.
        criterion: the thresholds that made a value massive.
        prompts: one per-prompt reduction per prompt (tokens, medians, the largest values and the massive ones
            at each layer, that prompt's ME layer and persistent (position, dim) pairs).
        me_layer: the ME layer: the most common per-prompt ME layer among the prompts that vote (None: no
            massive activation persists in any of them).
        me_layer_consistency: the share (0-1) of voting prompts whose own ME layer is ``me_layer``.
        dtype: the precision the forward passes ran in.
        arch: the name of the architecture map used.
        profile: |a| of the strongest massive token over every layer x dim, for one reference prompt
            (``prompt``, ``position``, ``token``, ``abs``), or None without an ME layer.
        extra: any further keys of a loaded ``scan.json``, kept so that saving it again loses nothing.
    """

    kind = "scan"

    model: str
    num_layers: int
    hidden_size: int
    criterion: Criterion
    prompts: list[PromptScan]
    me_layer: int | None
    me_layer_consistency: float | None
    dtype: str = "float32"
    arch: str = ""
    profile: dict[str, Any] | None = None  # massive token's |a| over layers x dims (reference prompt)
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived views -------------------------------------------------------------------------------
    def _records(self, kind: str) -> list[dict[str, Any]]:
        out = []
        for p in self.prompts:
            start = p.me_layer if p.me_layer is not None else self.num_layers
            for layer, entries in enumerate(p.massive):
                for value, pos, dim in entries:
                    if layer < start:
                        k = "precursor"
                    else:
                        k = "massive" if (pos, dim) in p.persistent else "transient"
                    if k == kind:
                        out.append({"prompt": p.index, "layer": layer, "position": pos, "token": p.tokens[pos],
                                    "dim": dim, "value": value})
        return out

    @property
    def massive(self) -> list[dict[str, Any]]:
        """Massive activations at or after each prompt's ME layer whose (token, dim) persists."""
        return self._records("massive")

    @property
    def precursors(self) -> list[dict[str, Any]]:
        """Massive values before the ME layer (transient spikes), or all of them if none persists."""
        return self._records("precursor")

    @property
    def transient(self) -> list[dict[str, Any]]:
        """Massive values at or after the ME layer on a (token, dim) that does not persist."""
        return self._records("transient")

    @property
    def massive_dims(self) -> list[int]:
        """The dims of the massive activations (see :attr:`massive`), ascending."""
        return sorted({r["dim"] for r in self.massive})

    def dim_support(self) -> dict[int, float]:
        """Share of voting prompts in which each massive dim is massive at or after the ME layer.

        Returns:
            ``{dim: share}`` (0-1), by dim.
        """
        voters = [p for p in self.prompts if p.eligible] or self.prompts
        counts: Counter[int] = Counter()
        for p in voters:
            if p.me_layer is None:
                continue
            counts.update({d for _, d in p.persistent})
        return {d: counts[d] / len(voters) for d in sorted(counts)}

    def massive_tokens(self) -> list[dict[str, Any]]:
        """Distinct (position, token) pairs that are massive at the consensus ME layer, with prompt counts.

        Returns:
            ``{"position", "token", "prompts"}`` records, most prompts first (empty without an ME layer).
        """
        if self.me_layer is None:
            return []
        counts: Counter[tuple[int, str]] = Counter()
        for p in self.prompts:
            if p.me_layer is not None and self.me_layer < len(p.massive):
                counts.update({(pos, p.tokens[pos]) for _, pos, d in p.massive[self.me_layer] if (pos, d) in p.persistent})
        # most prompts first, ties by position then token text (not by the set's hash-seeded iteration order)
        order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1]))
        return [{"position": pos, "token": tok, "prompts": n} for (pos, tok), n in order]

    def per_layer(self) -> list[dict[str, Any]]:
        """The per-layer summary the report's magnitude figure draws.

        Returns:
            One record per layer: the median |a| over prompts, the mean of the top-1/2/3 |a|, the share of prompts
            with a massive entry, the largest entries (prompt, position, dim, value) and their maximum |a|.
        """
        rows = []
        for layer in range(self.num_layers):
            medians = [p.medians[layer] for p in self.prompts]
            tops = [[abs(v) for v, _, _ in p.top[layer][:3]] for p in self.prompts]
            seen: dict[tuple[int, int], tuple[float, float, int, int, int]] = {}
            for p in self.prompts:
                for v, pos, dim in p.top[layer]:
                    if (pos, dim) not in seen or abs(v) > seen[(pos, dim)][0]:
                        seen[(pos, dim)] = (abs(v), v, pos, dim, p.index)
            entries = sorted(seen.values(), reverse=True)[:TOP_K]
            rows.append({
                "layer": layer,
                "median": float(np.median(medians)),
                "top1_mean": float(np.mean([t[0] for t in tops])),
                "top2_mean": float(np.mean([t[1] if len(t) > 1 else 0.0 for t in tops])),
                "top3_mean": float(np.mean([t[2] if len(t) > 2 else 0.0 for t in tops])),
                "massive_share": float(np.mean([bool(p.massive[layer]) for p in self.prompts])),
                "top": [{"prompt": i, "position": pos, "dim": dim, "value": v} for _, v, pos, dim, i in entries],
                "max_abs": entries[0][0] if entries else 0.0,
            })
        return rows

    def peak(self) -> dict[str, Any] | None:
        """The largest massive entry of the scan.

        Returns:
            Its record (layer, prompt, position, dim, value) with its layer's median |a| and the ratio to it, or
            None when nothing is massive.
        """
        recs = self.massive
        if not recs:
            return None
        best = max(recs, key=lambda r: abs(r["value"]))
        median = next(p for p in self.prompts if p.index == best["prompt"]).medians[best["layer"]]
        return {**best, "layer_median": median, "ratio_to_median": abs(best["value"]) / median if median else None}

    def to_dict(self) -> dict[str, Any]:
        """The result as ``scan.json`` holds it (the per-prompt reductions, the records and the summaries).

        Returns:
            JSON-ready data, with ``"schema": "melayer.scan/<version>"``.
        """
        return {
            "schema": self.schema(),
            "model": self.model,
            "arch": self.arch,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "threshold": self.criterion.to_dict(),
            "me_layer": self.me_layer,
            "me_layer_consistency": self.me_layer_consistency,
            "massive_dims": self.massive_dims,
            "massive_dim_support": {str(k): v for k, v in self.dim_support().items()},
            "massive_tokens": self.massive_tokens(),
            "peak": self.peak(),
            "prompts": [
                {"index": p.index, "text": p.text, "n_tokens": p.n_tokens, "me_layer": p.me_layer,
                 "votes": p.eligible, "tokens": p.tokens, "medians": p.medians,
                 "top": [[list(e) for e in layer] for layer in p.top],
                 "massive_entries": [[list(e) for e in layer] for layer in p.massive],
                 "persistent": sorted([pos, dim] for pos, dim in p.persistent)}
                for p in self.prompts
            ],
            "massive": self.massive,
            "precursors": self.precursors,
            "transient": self.transient,
            "per_layer": self.per_layer(),
            "massive_token_profile": self.profile,
            **self.extra,
        }


    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScanResult:
        """The result a ``scan.json`` holds.

        Every per-prompt reduction is restored; not the |a| rows the scan kept while running, whose one use, the
        massive token's profile, is stored.

        Args:
            data: a loaded ``scan.json`` (what :meth:`to_dict` returned).

        Returns:
            The scan result.
        """
        def entries(layers: list[list[list[Any]]]) -> list[list[tuple[float, int, int]]]:
            return [[(float(v), int(pos), int(dim)) for v, pos, dim in layer] for layer in layers]

        prompts = [PromptScan(index=p["index"], text=p["text"], tokens=p["tokens"], medians=p["medians"],
                              top=entries(p["top"]), massive=entries(p["massive_entries"]),
                              rows=[{} for _ in p["medians"]], watched=[{} for _ in p["medians"]],
                              me_layer=p["me_layer"], persistent={(pos, dim) for pos, dim in p["persistent"]},
                              eligible=p["votes"]) for p in data["prompts"]]
        extra = {k: v for k, v in data.items() if k not in _SCAN_KEYS}
        return cls(model=data["model"], num_layers=data["num_layers"], hidden_size=data["hidden_size"],
                   criterion=Criterion.from_dict(data["threshold"]), prompts=prompts, me_layer=data["me_layer"],
                   me_layer_consistency=data["me_layer_consistency"], dtype=data["dtype"], arch=data["arch"],
                   profile=data["massive_token_profile"], extra=extra)


_SCAN_KEYS = {"schema", "model", "arch", "dtype", "num_layers", "hidden_size", "threshold", "me_layer",
              "me_layer_consistency", "massive_dims", "massive_dim_support", "massive_tokens", "peak", "prompts",
              "massive", "precursors", "transient", "per_layer", "massive_token_profile"}


def default_prompts() -> list[str]:
    from importlib.resources import files

    text = files("melayer.data").joinpath("prompts.txt").read_text()
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip() and not line.startswith("#")]


@torch.no_grad()
def scan(
    lm: LM,
    prompts: Sequence[str] | str | None = None,
    *,
    criterion: Criterion | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    on_batch: Callable[[list[int]], None] | None = None,
) -> ScanResult:
    r"""Find the massive activations of every layer and locate the ME layer (``melayer scan``).

    Prompts go through the model in length-sorted batches picked for the device
    (:func:`melayer.capture.batching.plan_batches`). Results are in input order and do not depend on the
    batching.

    Args:
        lm: the model (:func:`melayer.load` or :func:`melayer.from_model`).
        prompts: one prompt or several (default: the shipped prompt set).
        criterion: when an activation counts as massive, and how long it must persist (default
            :class:`~melayer.analysis.criterion.Criterion`\ ``()``).
        batch_size: at most this many prompts per forward pass.
        progress: show a progress bar.
        on_batch: called before each batch's forward pass with the input indices of its rows, so that hooks of
            the caller's own (e.g. a :class:`melayer.capture.TokenTracker`) can key what they see by prompt.

    Returns:
        The per-layer magnitudes, massive entries and the ME layer, as a :class:`ScanResult`.

    Raises:
        MelayerError: an empty prompt or a bad setting.
    """
    crit = criterion or Criterion()
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else default_prompts()
    if not prompts or any(not p.strip() for p in prompts):
        raise MelayerError("empty prompt: every prompt must contain text")
    if batch_size is not None and batch_size < 1:
        raise MelayerError("batch size must be >= 1")
    ids = lm.tokenizer(prompts)["input_ids"]
    reducer = LayerReducer(median_ratio=crit.median_ratio, abs_min=crit.abs_min, top_k=TOP_K,
                           max_massive=MAX_MASSIVE, n_candidates=N_CANDIDATES)
    results: list[PromptScan | None] = [None] * len(prompts)
    keeper = _ProfileKeeper()
    with Hooks() as hooks:
        for i, layer in enumerate(lm.layers):
            hooks.forward(layer, reducer.hook(i))
        for idx, batch in track(planned(lm, ids, max_batch=batch_size), f"scanning {lm.name}", total=len(prompts),
                                enabled=progress, advance=lambda item: len(item[0])):
            reducer.start(batch["attention_mask"])
            if on_batch is not None:
                on_batch(idx)
            forward_body(lm, batch)
            for b, i in enumerate(idx):
                results[i] = keeper.offer(_finish(i, prompts[i], ids[i], reducer.per_row[b], lm, crit))
    return _summarise(lm, results, crit, keeper)  # type: ignore[arg-type]


class _ProfileKeeper:
    """Keeps the candidate |a| rows only of the prompts that may end up as the profile's reference (per ME
    layer, the strongest persistent massive value among voters and among all prompts; the first in input order
    on a tie), so the scan's memory does not grow with the number of prompts."""

    def __init__(self) -> None:
        self.best: dict[tuple[bool, int], tuple[float, int, PromptScan]] = {}

    def offer(self, p: PromptScan) -> PromptScan:
        keep = False
        if p.me_layer is not None:
            L = p.me_layer
            strength = max(abs(v) for v, pos, d in p.massive[L] if (pos, d) in p.persistent)
            for eligible_only in (True, False):
                if eligible_only and not p.eligible:
                    continue
                old = self.best.get((eligible_only, L))
                if old is None or strength > old[0] or (strength == old[0] and p.index < old[1]):
                    if old is not None and not self._held(old[2], (eligible_only, L)):
                        old[2].rows = []
                    self.best[(eligible_only, L)] = (strength, p.index, p)
                    keep = True
        if not keep:
            p.rows = []
        return p

    def _held(self, p: PromptScan, other_than: tuple[bool, int]) -> bool:
        return any(q is p for k, (_, _, q) in self.best.items() if k != other_than)

    def reference(self, me_layer: int, eligible_only: bool) -> PromptScan:
        return self.best[(eligible_only, me_layer)][2]


def _finish(index: int, text: str, ids: list[int], layers: list[dict[str, Any]], lm: LM, crit: Criterion) -> PromptScan:
    tokens = lm.tokenizer.batch_decode([[t] for t in ids])
    p = PromptScan(
        index=index, text=text, tokens=tokens,
        medians=[r["median"] for r in layers], top=[r["top"] for r in layers],
        massive=[r["massive"] for r in layers], rows=[r["rows"] for r in layers],
        watched=[r["watched"] for r in layers], eligible=len(ids) >= crit.min_tokens,
    )
    p.me_layer, p.persistent = locate_me_layer(p.massive, p.watched, p.medians, crit)
    return p


def _profile(p: PromptScan, layer: int) -> dict[str, Any]:
    """|a| of the prompt's strongest massive token over all layers x dims (None where not kept)."""
    value, pos, _ = max((e for e in p.massive[layer] if (e[1], e[2]) in p.persistent), key=lambda e: abs(e[0]))
    hidden = len(next(iter(p.rows[0].values())))
    grid = [p.rows[l][pos].tolist() if pos in p.rows[l] else [float("nan")] * hidden for l in range(len(p.rows))]
    return {"prompt": p.index, "position": pos, "token": p.tokens[pos], "abs": grid}


def _summarise(lm: LM, results: list[PromptScan], crit: Criterion, keeper: _ProfileKeeper) -> ScanResult:
    any_eligible = any(p.eligible for p in results)
    voters = [p for p in results if p.eligible] or results
    votes = Counter(p.me_layer for p in voters)
    me_layer, n_agree = votes.most_common(1)[0]
    # prefer a real layer over "none" on a tie
    ties = [k for k, v in votes.items() if v == n_agree and k is not None]
    if me_layer is None and ties:
        me_layer = min(ties)
    consistency = votes[me_layer] / len(voters)
    profile = None
    if me_layer is not None:
        profile = _profile(keeper.reference(me_layer, any_eligible), me_layer)
    for p in results:  # candidate rows are only needed for the profile
        p.rows = []
    return ScanResult(
        model=lm.name, num_layers=lm.num_layers, hidden_size=lm.hidden_size, criterion=crit, prompts=results,
        me_layer=me_layer, me_layer_consistency=consistency, dtype=str(lm.dtype).replace("torch.", ""),
        arch=lm.arch.name, profile=profile,
    )
