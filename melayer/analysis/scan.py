"""Scan: stream every decoder layer's output, find massive activations, locate the ME layer.

Nothing of size layers x tokens x hidden is kept: each layer hook reduces its output on the fly to a
few numbers (median, top values, massive entries, |a| rows of a handful of candidate tokens).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from melayer.analysis.criterion import Criterion
from melayer.capture import (
    Hooks,
    batches,
    encode,
    first_real,
    forward_body,
    layer_output,
)
from melayer.models.loading import LM
from melayer.util.console import track
from melayer.util.display import HtmlRepr
from melayer.util.errors import MelayerError, NumericOverflow

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


class _Reducer:
    """Forward hooks that reduce each layer's output, whole batch at once, to a few numbers per row.

    Rows are left padded; positions are reported relative to each row's first real token.
    """

    def __init__(self, num_layers: int, crit: Criterion) -> None:
        self.crit = crit
        self.num_layers = num_layers

    def start(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.offsets = first_real(self.mask)  # left padding per row
        self.offsets_list = self.offsets.tolist()
        self.per_row: list[list[dict[str, Any]]] = [[] for _ in range(mask.shape[0])]
        self.watch: list[dict[tuple[int, int], None]] = [{} for _ in range(mask.shape[0])]

    def hook(self, layer: int):
        def fn(module, args, output):
            self._reduce(layer, layer_output(output).detach())

        return fn

    def _reduce(self, layer: int, h: torch.Tensor) -> None:
        B, T, H = h.shape
        if not torch.isfinite(h).all():
            raise NumericOverflow(
                f"layer {layer} produced inf/nan in {str(h.dtype).replace('torch.', '')}: massive activations "
                "exceed this dtype's range; rerun with --dtype float32 (or bfloat16)"
            )
        a = h.float().abs()
        if not bool(self.mask.all()):
            a = a.masked_fill(~self.mask[..., None], -1.0)  # pads never win a top-k or pass a cutoff
        flat = a.view(B, T * H)
        medians = torch.stack([flat[b, off * H :].median() for b, off in enumerate(self.offsets_list)])
        k = min(TOP_K, (T - max(self.offsets_list)) * H)
        top_v, top_i = flat.topk(k, dim=1)
        signed = h.reshape(B, T * H)
        top_s = signed.gather(1, top_i)
        cut = (medians * self.crit.median_ratio).clamp(min=self.crit.abs_min)
        n_massive = (top_v[:, 0] > cut).any() and int((flat > cut[:, None]).sum(1).max())
        if n_massive:
            m_v, m_i = flat.topk(min(n_massive, MAX_MASSIVE), dim=1)
            m_s, m_keep = signed.gather(1, m_i).tolist(), (m_v > cut[:, None]).tolist()
            m_i = m_i.tolist()
        per_pos = a.amax(-1)
        cands = per_pos.topk(min(N_CANDIDATES, T - max(self.offsets_list)), dim=1).indices
        cands = torch.cat([cands, self.offsets[:, None]], dim=1)
        rows = a.gather(1, cands[..., None].expand(-1, -1, H)).cpu().numpy()
        cands_l = cands.tolist()
        med_l, top_i_l, top_s_l = medians.tolist(), top_i.tolist(), top_s.tolist()
        for b in range(B):
            off = self.offsets_list[b]
            top = [(v, i // H - off, i % H) for v, i in zip(top_s_l[b], top_i_l[b])]
            massive = []
            if n_massive:
                massive = [(v, i // H - off, i % H) for v, i, keep in zip(m_s[b], m_i[b], m_keep[b]) if keep]
            watch = self.watch[b]
            watched = {}
            if watch:
                pos = torch.tensor([p + off for p, _ in watch])
                dim = torch.tensor([d for _, d in watch])
                watched = dict(zip(watch, h[b, pos, dim].float().tolist()))
            for _, p, d in massive:
                if len(watch) < MAX_MASSIVE:
                    watch.setdefault((p, d))
            row_map = {c - off: rows[b, j] for j, c in enumerate(cands_l[b])}
            self.per_row[b].append({"median": med_l[b], "top": top, "massive": massive, "rows": row_map,
                                    "watched": watched})


@dataclass
class ScanResult(HtmlRepr):
    """Result of :func:`scan`; ``to_dict()`` is exactly what ``scan.json`` holds."""

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
        return sorted({r["dim"] for r in self.massive})

    def dim_support(self) -> dict[int, float]:
        """Share of voting prompts in which each massive dim is massive at or after the ME layer."""
        voters = [p for p in self.prompts if p.eligible] or self.prompts
        counts: Counter[int] = Counter()
        for p in voters:
            if p.me_layer is None:
                continue
            counts.update({d for _, d in p.persistent})
        return {d: counts[d] / len(voters) for d in sorted(counts)}

    def massive_tokens(self) -> list[dict[str, Any]]:
        """Distinct (position, token) pairs that are massive at the consensus ME layer, with prompt counts."""
        if self.me_layer is None:
            return []
        counts: Counter[tuple[int, str]] = Counter()
        for p in self.prompts:
            if p.me_layer is not None and self.me_layer < len(p.massive):
                counts.update({(pos, p.tokens[pos]) for _, pos, d in p.massive[self.me_layer] if (pos, d) in p.persistent})
        return [{"position": pos, "token": tok, "prompts": n} for (pos, tok), n in counts.most_common()]

    def per_layer(self) -> list[dict[str, Any]]:
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
        recs = self.massive
        if not recs:
            return None
        best = max(recs, key=lambda r: abs(r["value"]))
        median = next(p for p in self.prompts if p.index == best["prompt"]).medians[best["layer"]]
        return {**best, "layer_median": median, "ratio_to_median": abs(best["value"]) / median if median else None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "melayer.scan/1",
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
                 "votes": p.eligible}
                for p in self.prompts
            ],
            "massive": self.massive,
            "precursors": self.precursors,
            "transient": self.transient,
            "per_layer": self.per_layer(),
            "massive_token_profile": self.profile,
            **self.extra,
        }


def default_prompts() -> list[str]:
    from importlib.resources import files

    text = files("melayer.data").joinpath("prompts.txt").read_text()
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_prompts(path: str) -> list[str]:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise MelayerError(f"prompt file not found: {path}")
    try:
        prompts = [line for line in p.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MelayerError(f"cannot read prompt file {path}: {exc}") from None
    if not prompts:
        raise MelayerError(f"prompt file {path} holds no prompts")
    return prompts


@torch.no_grad()
def scan(
    lm: LM,
    prompts: Sequence[str] | str | None = None,
    *,
    criterion: Criterion | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> ScanResult:
    """Scan ``prompts`` (default: the shipped prompt set) and locate the ME layer."""
    crit = criterion or Criterion()
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else default_prompts()
    if not prompts or any(not p.strip() for p in prompts):
        raise MelayerError("empty prompt: every prompt must contain text")
    if batch_size < 1:
        raise MelayerError("batch size must be >= 1")
    reducer = _Reducer(lm.num_layers, crit)
    results: list[PromptScan] = []
    with Hooks() as hooks:
        for i, layer in enumerate(lm.layers):
            hooks.forward(layer, reducer.hook(i))
        chunks = batches(prompts, batch_size)
        for start, chunk in track(chunks, f"scanning {lm.name}", total=len(chunks), enabled=progress):
            batch = encode(lm, chunk)
            reducer.start(batch["attention_mask"])
            forward_body(lm, batch)
            for b, text in enumerate(chunk):
                ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
                results.append(_finish(start + b, text, ids, reducer.per_row[b], lm, crit))
    return _summarise(lm, results, crit)


def _finish(index: int, text: str, ids: list[int], layers: list[dict[str, Any]], lm: LM, crit: Criterion) -> PromptScan:
    tokens = [lm.tokenizer.decode([t]) for t in ids]
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


def _summarise(lm: LM, results: list[PromptScan], crit: Criterion) -> ScanResult:
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
        ref = max((p for p in voters if p.me_layer == me_layer),
                  key=lambda p: max(abs(v) for v, pos, d in p.massive[me_layer] if (pos, d) in p.persistent))
        profile = _profile(ref, me_layer)
    for p in results:  # candidate rows are only needed for the profile
        p.rows = []
    return ScanResult(
        model=lm.name, num_layers=lm.num_layers, hidden_size=lm.hidden_size, criterion=crit, prompts=results,
        me_layer=me_layer, me_layer_consistency=consistency, dtype=str(lm.dtype).replace("torch.", ""),
        arch=lm.arch.name, profile=profile,
    )
