"""Read the ME layer off the weights: a data-free ranking of (layer, dim, neuron) candidates.

No forward pass and no model object: tensors are read one at a time through
:mod:`melayer.models.lazy` (safetensors or GGUF) and each is reduced to a few vectors before the next is read.

The score of FFN neuron ``n`` of layer ``l`` writing hidden dim ``d`` is the product of three ratios, each
taken against its own median in that layer (so 1 is "ordinary"):

* ``down``  = |W_down[d, n]| / median |W_down|  -- how hard the neuron writes dim d (the super-weight ratio);
* ``post``  = |g_post[d]| / median |g_post|      -- the post-FFN norm's gain on d (1 where the family has
  none): after that norm the FFN's share of d is multiplied by this gain (Gemma 2/3, OLMo2);
* ``drive`` = geometric mean over the input matrices (gate, up; GPT-2: up only) of
  ||g_pre * W_in[n]|| / median_n ||g_pre * W_in[n]||  -- how strongly a normalised input can drive the
  neuron, pre-FFN norm gains included (1 where the family has no pre-FFN norm). A geometric mean because
  the activation is the product of the two reads: per unit of input it grows like their geometric mean,
  comparable to the one linear factor on the output side.

Prediction rule (the scan's persistence idea, applied to the weights): each layer's top (dim, neuron) by
score; the **ME layer** is the first layer whose top dim is also the top dim of at least ``persist_frac``
(0.75) of the later layers (the massive dim is maintained downstream); if no layer qualifies, the layer with
the largest score. The massive dim and the top neurons are that layer's; the super weight is
W_down[dim, top neuron]. Earlier layers whose top dim differs and whose score reaches 10 % of the ME layer's
are listed as precursor candidates.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from melayer.models.lazy import LazyWeights, open_weights
from melayer.util.console import track
from melayer.util.errors import MelayerError
from melayer.util.results import Result

SCHEMA = "melayer.weights/1"
EXACT_MEDIAN_MAX = 1 << 21  # larger tensors: the median of an evenly strided sample of at least this many entries
PRECURSOR_SHARE = 0.1

SCORE = ("score(l, d, n) = down x post x drive; down = |W_down[d,n]| / median|W_down|; post = |g_post[d]| / "
         "median|g_post| (1 without a post-FFN norm); drive = geometric mean over gate/up of ||g_pre * W_in[n]|| / "
         "median_n ||g_pre * W_in[n]|| (g_pre = pre-FFN norm gain, 1 without one); all per layer")
RULE = ("ME layer = first layer whose top dim is the top dim of >= {frac:.0%} of the later layers, else the "
        "layer with the largest score; dim and neurons from that layer; precursors = earlier layers with another "
        "top dim and >= {pre:.0%} of the ME layer's score")


@dataclass
class LayerScore:
    """The best (dim, neuron) of one layer, with the parts of its score."""

    layer: int
    dim: int
    neuron: int
    score: float
    down: float
    post: float
    drive: float
    neurons: list[int]  # top neurons on this layer's dim, best first
    neuron_scores: list[float]


@dataclass
class Confirmation:
    """A short scan of the layers around the candidate layers (the forward stops after the last one)."""

    layers: list[int]  # the hooked layers: each candidate layer on the massive dim, the one before and after
    prompts: int
    dim: int
    # per hooked layer: median over prompts of max|a| on the dim, of the layer's median |a|, the share of prompts
    # where the dim is massive there (emergence thresholds), and the most common top dim
    dim_max: dict[int, float]
    layer_median: dict[int, float]
    massive_share: dict[int, float]
    top_dim: dict[int, int]
    # per candidate layer: the share of prompts where the dim becomes massive there (massive at the layer, not
    # in the layer before, persisting into the next layer)
    emerges: dict[int, float]
    held: bool  # the predicted ME layer emerges in more than half of the prompts
    first_held: int | None  # the first candidate layer that does
    verdict: str
    seconds: float


@dataclass
class WeightsResult(Result):
    """Result of :func:`weights`; ``to_dict()`` is what ``weights.json`` holds and ``from_dict`` (or
    ``WeightsResult.load(path)``) reads it back."""

    kind = "weights"

    model: str
    source: str
    format: str
    arch: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    me_layer: int
    massive_dim: int
    neurons: list[int]
    super_weight: dict[str, Any]
    precursors: list[dict[str, Any]]
    layers: list[LayerScore]
    candidates: list[dict[str, Any]]
    persist_frac: float
    cost: dict[str, Any]
    confirm: Confirmation | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def top_neuron(self) -> int:
        return self.neurons[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema": SCHEMA, "score": SCORE, "rule": RULE.format(frac=self.persist_frac, pre=PRECURSOR_SHARE),
                **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsResult:
        """The result a ``weights.json`` holds."""
        own = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in own}
        kw["layers"] = [LayerScore(**r) for r in data["layers"]]
        c = data.get("confirm")
        if c is not None:
            by_layer = ("dim_max", "layer_median", "massive_share", "top_dim", "emerges")
            kw["confirm"] = Confirmation(**{k: ({int(l): v for l, v in c[k].items()} if k in by_layer else c[k])
                                            for k in c})
        return cls(**kw)


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """Resident memory now (Linux), else the peak so far."""
    now = _proc_status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter carries over the parent's peak
    into a process started by fork + exec."""
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median(t: torch.Tensor) -> float:
    flat = t.reshape(-1)
    if flat.numel() > EXACT_MEDIAN_MAX:
        flat = flat[:: flat.numel() // EXACT_MEDIAN_MAX]
    return float(flat.median())


def _ratio(v: torch.Tensor) -> torch.Tensor:
    med = _median(v)
    return v / med if med > 0 else torch.ones_like(v)


def _layer(w: LazyWeights, layer: int, top_neurons: int) -> tuple[LayerScore, int]:
    """Score one layer. Every tensor is reduced (in place) before the next is read, so at most one weight
    matrix is alive at a time."""
    pre = w.norm_gain(layer, "pre_ffn_norm")
    g_pre = pre.abs() if pre is not None else None
    log_drive: torch.Tensor | None = None
    count = 0
    for role in ("gate_up",) if w.arch.gate_up is not None else ("gate", "up"):
        for mat in w.ffn_in(layer, role).values():
            if g_pre is not None:
                mat.mul_(g_pre)
            r = _ratio(mat.norm(dim=1)).clamp_min(1e-12).log()
            log_drive = r if log_drive is None else log_drive + r
            count += 1
            del mat
    post = w.norm_gain(layer, "post_ffn_norm")
    post_r = _ratio(post.abs()) if post is not None else None
    score = w.role_weight(layer, "down")
    if score is None:
        raise MelayerError(f"{w.source}: no down projection ({w.arch.down}) for layer {layer}")
    inter = score.shape[1]
    if log_drive is not None and log_drive.shape[0] != inter:
        raise MelayerError(f"{w.source}: layer {layer}'s FFN input has {log_drive.shape[0]} neurons and its down "
                           f"projection {inter}: a mismatched checkpoint")
    drive = (log_drive / count).exp() if log_drive is not None else torch.ones(inter)
    score.abs_()
    score /= _median(score)
    if post_r is not None:
        score *= post_r[:, None]
    score *= drive[None, :]
    d, n = divmod(int(score.argmax()), inter)
    top = score[d].topk(min(top_neurons, inter))
    p = float(post_r[d]) if post_r is not None else 1.0
    best = float(score[d, n])
    row = LayerScore(layer=layer, dim=d, neuron=n, score=best, down=best / p / float(drive[n]), post=p,
                     drive=float(drive[n]), neurons=[int(i) for i in top.indices],
                     neuron_scores=[float(v) for v in top.values])
    return row, inter


def candidates(
    model: str | LazyWeights | None = None,
    *,
    arch: Any = None,
    top_k: int = 10,
    top_neurons: int = 3,
    persist_frac: float = 0.75,
    progress: bool = True,
) -> WeightsResult:
    """Rank (layer, dim, neuron) candidates for the ME layer, massive dim and super weight from the weights alone.

    ``model``: an embedded name (``gemma-3-270m``, ``smollm2-135m``), a ``.gguf`` file, a local Hugging Face
    directory (safetensors), or an opened :class:`~melayer.models.lazy.LazyWeights`.
    """
    if not 0 < persist_frac <= 1:
        raise MelayerError(f"persist_frac must be in (0, 1], got {persist_frac}")
    if top_k < 1 or top_neurons < 1:
        raise MelayerError("top_k and top_neurons must be >= 1")
    t0 = time.perf_counter()
    rss0 = _rss_mb()
    w = model if isinstance(model, LazyWeights) else open_weights(model, arch)
    if w.num_layers < 1:
        raise MelayerError(f"{w.source}: the config gives no number of layers")
    rows: list[LayerScore] = []
    inter = 0
    for layer in track(range(w.num_layers), f"ranking {w.name}", enabled=progress):
        row, inter = _layer(w, layer, top_neurons)
        rows.append(row)
    me, dim, notes = _predict(rows, persist_frac)
    me_row = rows[me]
    down = w.role_weight(me, "down")
    col = me_row.neurons[0]
    sw = {"layer": me, "row": dim, "col": col, "tensor": w.layer_key(me, "down"),
          "stored_index": w.arch.stored_index(dim, col), "value": float(down[dim, col]),  # type: ignore[index]
          "ratio_to_median": float(down[dim, col].abs()) / _median(down.abs())}  # type: ignore[index]
    del down
    precursors = [{"layer": r.layer, "dim": r.dim, "neuron": r.neuron, "score": r.score} for r in rows[:me]
                  if r.dim != dim and r.score >= PRECURSOR_SHARE * me_row.score]
    ranked = sorted(rows, key=lambda r: -r.score)[:top_k]
    cands = [{"rank": i + 1, "layer": r.layer, "dim": r.dim, "neuron": r.neuron, "score": r.score} for i, r in enumerate(ranked)]
    peak = _peak_rss_mb()
    cost = {"seconds": round(time.perf_counter() - t0, 3), "tensors_read": w.tensors_read,
            "bytes_read_mb": round(w.bytes_read / 2**20, 1), "max_live_tensors": w.max_live,
            "peak_rss_mb": round(peak, 1), "peak_rss_above_start_mb": round(peak - rss0, 1)}
    return WeightsResult(model=w.name, source=w.source, format=w.format, arch=w.arch.name, model_type=w.model_type,
                         num_layers=w.num_layers, hidden_size=w.hidden_size, intermediate_size=inter, me_layer=me,
                         massive_dim=dim, neurons=me_row.neurons, super_weight=sw, precursors=precursors, layers=rows,
                         candidates=cands, persist_frac=persist_frac, cost=cost, notes=notes)


def _predict(rows: list[LayerScore], persist_frac: float) -> tuple[int, int, list[str]]:
    dims = [r.dim for r in rows]
    for r in rows[:-1]:
        later = dims[r.layer + 1:]
        if sum(d == r.dim for d in later) >= persist_frac * len(later):
            return r.layer, r.dim, []
    best = max(rows, key=lambda r: r.score)
    note = (f"no layer's top dim is the top dim of >= {persist_frac:.0%} of the later layers; "
            "took the layer with the largest score")
    return best.layer, best.dim, [note]


def confirm_candidates(lm: Any, result: WeightsResult, prompts: list[str] | None = None, *, n_prompts: int = 8,
            criterion: Any = None) -> Confirmation:
    """Check the prediction with a short scan that hooks only the candidate layers on the massive dim (the
    predicted ME layer and the other ranked candidates writing that dim), each with the layer before and after;
    the forward stops after the last hooked layer. A candidate holds when, in most prompts, the dim is massive
    at its output (emergence thresholds), was not in the layer before, and persists into the next layer
    (persistence thresholds)."""
    from melayer.analysis.criterion import Criterion
    from melayer.analysis.scan import default_prompts
    from melayer.capture.encoding import batches, encode
    from melayer.capture.hooks import Hooks
    from melayer.capture.sites import forward_until, read_site

    crit = criterion or Criterion()
    if n_prompts < 1:
        raise MelayerError("--n-prompts must be >= 1")
    if lm.num_layers != result.num_layers or lm.hidden_size != result.hidden_size:
        raise MelayerError(f"the loaded model ({lm.num_layers} layers, hidden {lm.hidden_size}) is not the ranked "
                           f"checkpoint ({result.num_layers} layers, hidden {result.hidden_size})")
    texts = list(prompts or default_prompts())[:n_prompts]
    me, dim = result.me_layer, result.massive_dim
    cands = sorted({me} | {c["layer"] for c in result.candidates if c["dim"] == dim})
    layers = sorted({x for c in cands for x in (c - 1, c, c + 1) if 0 <= x < lm.num_layers})
    t0 = time.perf_counter()
    # per hooked layer, per prompt: (max |a| on dim over real tokens, median |a| over real tokens and dims, top dim)
    seen: dict[int, list[tuple[float, float, int]]] = {layer: [] for layer in layers}
    real_mask: list[torch.Tensor] = []

    def reader(layer: int) -> Any:
        def fn(h: torch.Tensor) -> None:
            h = h.detach().float().abs()
            for row in range(h.shape[0]):
                real = h[row][real_mask[0][row]]
                seen[layer].append((float(real[:, dim].max()), float(real.median()), int(real.max(dim=0).values.argmax())))

        return fn

    with torch.no_grad(), Hooks() as hooks:
        for layer in layers:
            read_site(hooks, lm, layer, "resid_out", reader(layer))
        for _, chunk in batches(texts, 8):
            batch = encode(lm, chunk)
            real_mask[:] = [batch["attention_mask"].bool()]
            forward_until(lm, batch, last_layer=layers[-1])
    n = len(texts)

    def massive(layer: int, i: int) -> bool:
        v, m, _ = seen[layer][i]
        return v > crit.cutoff(m)

    emerges = {}
    for c in cands:
        rows = [massive(c, i) and not (c - 1 in seen and massive(c - 1, i))
                and (c + 1 not in seen or crit.persists(*seen[c + 1][i][:2])) for i in range(n)]
        emerges[c] = sum(rows) / n
    held = emerges[me] > 0.5
    first = next((c for c in cands if emerges[c] > 0.5), None)
    if held:
        verdict = f"held: dim {dim} becomes massive at layer {me} in {emerges[me]:.0%} of {n} prompts"
    elif first is not None:
        verdict = (f"not held at layer {me} ({emerges[me]:.0%} of {n} prompts); among the candidates, dim {dim} "
                   f"becomes massive first at layer {first} ({emerges[first]:.0%})")
    else:
        verdict = (f"not held: dim {dim} becomes massive at none of the candidate layers {cands}; "
                   "run `melayer scan` for the ME layer")

    def med(xs: list[float]) -> float:
        return float(torch.tensor(xs).median())

    def top_dim(layer: int) -> int:  # the dim most often on top; ties to the lowest dim
        dims = [d for *_, d in seen[layer]]
        return min(set(dims), key=lambda d: (-dims.count(d), d))

    top = {layer: top_dim(layer) for layer in layers}
    return Confirmation(layers=layers, prompts=n, dim=dim,
                        dim_max={layer: med([v for v, _, _ in seen[layer]]) for layer in layers},
                        layer_median={layer: med([m for _, m, _ in seen[layer]]) for layer in layers},
                        massive_share={layer: sum(massive(layer, i) for i in range(n)) / n for layer in layers},
                        top_dim=top, emerges=emerges, held=held, first_held=first, verdict=verdict,
                        seconds=round(time.perf_counter() - t0, 3))


def weights(
    model: str | LazyWeights | None = None,
    *,
    arch: Any = None,
    top_k: int = 10,
    top_neurons: int = 3,
    persist_frac: float = 0.75,
    confirm: bool = False,
    lm: Any = None,
    prompts: list[str] | None = None,
    n_prompts: int = 8,
    dtype: str = "float32",
    progress: bool = True,
) -> WeightsResult:
    """Rank (layer, dim, neuron) candidates for the ME layer from the weights alone (``melayer weights``).

    No forward pass and no model object: tensors are read one at a time from the files.

    Args:
        model: ``gemma-3-270m`` (default) or ``smollm2-135m``, a ``.gguf`` file, a local Hugging Face directory
            (safetensors), or an opened :class:`~melayer.models.lazy.LazyWeights`.
        arch: an architecture-map override (a mapped family name, a dict of role -> module path or a JSON file).
        top_k: candidates listed (the best of each layer).
        top_neurons: neurons kept per layer.
        persist_frac: the ME layer's top dim must be the top dim of this share of the later layers.
        confirm: check the candidates with a short scan of their layers (``--confirm``); the check is kept in
            ``result.confirm``. The model is loaded after the ranking, unless ``lm`` is given.
        lm: the loaded checkpoint to confirm on (implies ``confirm``).
        prompts: the prompts of that check (default: the shipped prompts).
        n_prompts: use the first this many prompts for the check.
        dtype: the dtype the model is loaded in for the check.
        progress: show a progress bar.

    Returns:
        The ranking, the predicted ME layer, massive dim and super weight, as a :class:`WeightsResult`.
    """
    result = candidates(model, arch=arch, top_k=top_k, top_neurons=top_neurons, persist_frac=persist_frac,
                        progress=progress)
    if confirm or lm is not None:
        if lm is None:
            from melayer.models.loading import load

            lm = load(model if isinstance(model, str) or model is None else model.source, dtype=dtype, arch=arch,
                      progress=progress)
        result.confirm = confirm_candidates(lm, result, prompts, n_prompts=n_prompts)
    return result
