"""``melayer explain``: a causal account of the ME layer.

1. Locate the ME layer, the massive token(s) and dims with :func:`melayer.scan`.
2. Decompose the ME layer's update of the massive token on each massive dim into its attention branch and
   its FFN branch (and, where a norm follows a branch, e.g. Gemma's sandwich norms, the gain it applied).
3. Attribute the FFN branch to intermediate neurons (activation x ``down`` column entry), name the super
   weights, and the FFN-input dims that drive those neurons (through gate/up, fused gate_up or Conv1D).
4. Report each norm's gain on the relevant dims against that norm's median gain.
5. Full-factorial ablation at the ME layer (``none``, ``norm``, ``ffn``, ``both``) with controls: the same
   ablations at other layers (before, after, middle) and random-neuron ablations of the same size. Each
   run measures the massive token's downstream magnitude, re-runs the scan (does an ME layer still exist?)
   and the perplexity of a fixed shipped text. Everything is temporary and the model is verified
   bit-identical afterwards.

Only the massive token's rows are kept from any forward pass (reduced inside hooks), so memory does not
grow with prompt length beyond one layer's activations.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from melayer.analysis.criterion import Criterion
from melayer.analysis.scan import ScanResult, batches, default_prompts, forward_body, scan
from melayer.capture.hooks import Hooks, StopForward, layer_output, run_until
from melayer.util.errors import MelayerError
from melayer.interventions.ablate import Edit, NeuronAblation, NormEdit, ablated, fingerprint, median_gain_edit
from melayer.models.archmap import NORM_ROLES
from melayer.models.loading import LM
from melayer.util.console import track

ABLATIONS = ("none", "norm", "ffn", "both")
DEFAULT_PROMPTS = 16
PPL_WINDOW = 256


# ----------------------------------------------------------------------------------------------------
# where the massive token is


def massive_dims_at(result: ScanResult, layer: int, min_support: float = 0.5) -> tuple[list[int], dict[int, float]]:
    """Dims that are massive *and persistent* at ``layer`` in at least ``min_support`` of the prompts
    (falls back to the best-supported dim), and every such dim's support."""
    counts: Counter[int] = Counter()
    for p in result.prompts:
        if layer < len(p.massive):
            counts.update({d for _, pos, d in p.massive[layer] if (pos, d) in p.persistent})
    n = max(1, len(result.prompts))
    support = {d: c / n for d, c in sorted(counts.items())}
    dims = sorted(d for d, s in support.items() if s >= min_support)
    if not dims and counts:
        dims = [counts.most_common(1)[0][0]]
    return dims, support


def massive_positions(result: ScanResult, layer: int, dims: Sequence[int] | None = None) -> list[int]:
    """Per prompt, the position (index among its real tokens) of its massive token at ``layer``: the
    persistent massive entry with the largest |a| (on ``dims`` if given), else the most common massive
    position over all prompts (if the prompt is long enough), else 0."""
    common = Counter()
    best: list[int | None] = []
    for p in result.prompts:
        entries = [(abs(v), pos) for v, pos, d in (p.massive[layer] if layer < len(p.massive) else [])
                   if (pos, d) in p.persistent and (dims is None or d in dims)]
        pos = max(entries)[1] if entries else None
        best.append(pos)
        if pos is not None:
            common[pos] += 1
    fallback = common.most_common(1)[0][0] if common else 0
    return [b if b is not None else (fallback if fallback < p.n_tokens else 0) for b, p in zip(best, result.prompts)]


class TokenTracker:
    """A pre-hook on the decoder stack that maps each batch row to its prompt and to the column of that
    prompt's tracked token. Prompts must be fed in order (any batching); left padding is handled from the
    2-D attention mask the stack receives."""

    def __init__(self, positions: Sequence[int]) -> None:
        self.positions = list(positions)
        self.next = 0
        self.prompt_idx: list[int] = []
        self.cols: torch.Tensor | None = None
        self.real: torch.Tensor | None = None  # (B, T) bool

    def install(self, hooks: Hooks, lm: LM) -> "TokenTracker":
        hooks.pre(lm.body, self._hook, with_kwargs=True)
        return self

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        b, t = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            mask = torch.ones(b, t, dtype=torch.long, device=ids.device)
        real = mask.bool()
        first = real.float().argmax(dim=1)  # first real column (left padding)
        self.prompt_idx = list(range(self.next, self.next + b))
        if self.prompt_idx[-1] >= len(self.positions):
            raise MelayerError("internal: more rows than tracked prompts")
        pos = torch.tensor([self.positions[i] for i in self.prompt_idx], device=ids.device)
        self.cols = (first.long() + pos).clamp(max=t - 1)
        self.real = real
        self.next += b

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The tracked token's row of a (B, T, ...) tensor -> (B, ...), float32 on CPU."""
        assert self.cols is not None
        return x[torch.arange(x.shape[0], device=x.device), self.cols.to(x.device)].detach().float().cpu()


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


# ----------------------------------------------------------------------------------------------------
# recording the inside of chosen layers at the massive token


SITES = ("resid_in", "attn_out", "post_attn_out", "mlp_in", "mlp_out", "post_ffn_out", "down_in", "resid_out")


@torch.no_grad()
def record_layers(lm: LM, prompts: Sequence[str], positions: Sequence[int], layers: Sequence[int],
                  batch_size: int = 8) -> dict[int, dict[str, Any]]:
    """For each layer in ``layers``: the massive token's vectors at every site (prompts x dim), and for each
    norm the token's 1/scale (1/rms for RMSNorm, 1/std for LayerNorm) against the median over the other
    real tokens."""
    data: dict[int, dict[str, list[torch.Tensor]]] = {l: {s: [] for s in SITES} for l in layers}
    scales: dict[int, dict[str, dict[str, list[float]]]] = {l: {} for l in layers}
    tracker = TokenTracker(positions)
    layer_norm = lm.arch.norm_kind == "layer"

    def site(layer: int, name: str, out: bool):
        def fn(module, args, kwargs, output=None):
            x = (output[0] if isinstance(output, (tuple, list)) else output) if out else _first_arg(args, kwargs)
            data[layer][name].append(tracker.rows(x))
        if out:
            return lambda m, a, k, o: fn(m, a, k, o)
        return lambda m, a, k: fn(m, a, k)

    def norm_scale(layer: int, role: str):
        def fn(module, args, kwargs):
            x = _first_arg(args, kwargs).float()
            s = x.std(dim=-1, unbiased=False) if layer_norm else x.pow(2).mean(-1).sqrt()
            inv = 1.0 / s.clamp_min(1e-12)
            rec = scales[layer].setdefault(role, {"massive": [], "others": []})
            for b in range(x.shape[0]):
                col = int(tracker.cols[b])
                real = tracker.real[b].clone()
                real[col] = False
                rec["massive"].append(float(inv[b, col]))
                if real.any():
                    rec["others"].append(float(inv[b][real].median()))
        return fn

    with Hooks() as hooks:
        tracker.install(hooks, lm)
        for l in layers:
            layer = lm.layers[l]
            hooks.pre(layer, site(l, "resid_in", False), with_kwargs=True)
            hooks.forward(layer, site(l, "resid_out", True), with_kwargs=True)
            hooks.forward(lm.module(l, "attn"), site(l, "attn_out", True), with_kwargs=True)
            hooks.pre(lm.module(l, "mlp"), site(l, "mlp_in", False), with_kwargs=True)
            hooks.forward(lm.module(l, "mlp"), site(l, "mlp_out", True), with_kwargs=True)
            hooks.pre(lm.module(l, "down"), site(l, "down_in", False), with_kwargs=True)
            for role, name in (("post_attn_norm", "post_attn_out"), ("post_ffn_norm", "post_ffn_out")):
                if lm.module(l, role) is not None:
                    hooks.forward(lm.module(l, role), site(l, name, True), with_kwargs=True)
            for role in NORM_ROLES:
                if lm.module(l, role) is not None:
                    hooks.pre(lm.module(l, role), norm_scale(l, role), with_kwargs=True)
        stop = max(layers)
        for _, chunk in batches(list(prompts), batch_size):
            batch = lm.encode(chunk)
            _run_until(lm, batch, stop)
    out: dict[int, dict[str, Any]] = {}
    for l in layers:
        out[l] = {s: torch.cat(v) for s, v in data[l].items() if v}
        out[l]["norm_scale"] = {
            role: {"massive_inv_scale": float(np.mean(r["massive"])),
                   "others_median_inv_scale": float(np.median(r["others"])) if r["others"] else None}
            for role, r in scales[l].items()
        }
    return out


def _run_until(lm: LM, batch: dict[str, torch.Tensor], last_layer: int) -> None:
    """Run the decoder stack and stop right after ``last_layer`` (nothing later is needed)."""
    def stop(module, args, output):
        raise StopForward

    with Hooks() as hooks:
        if last_layer < lm.num_layers - 1:
            hooks.forward(lm.layers[last_layer], stop)
        run_until(lambda: forward_body(lm, batch))


# ----------------------------------------------------------------------------------------------------
# attribution


def ffn_in_weights(lm: LM, layer: int) -> dict[str, torch.Tensor]:
    """The FFN input projections of ``layer`` as (intermediate, hidden) matrices (see ``ArchSpec.ffn_in_matrices``)."""
    return lm.ffn_in_weights(layer)


def neuron_contributions(lm: LM, layer: int, down_in: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Mean over prompts of activation x ``down`` weight: (len(dims), intermediate)."""
    w = lm.down_weight(layer).float().cpu()[list(dims)]  # (D, I)
    return down_in.mean(0)[None, :] * w


def rank_neurons(contrib: torch.Tensor) -> torch.Tensor:
    """Neurons ordered by their largest signed share of any massive dim's FFN output."""
    total = contrib.sum(1, keepdim=True)
    share = contrib * torch.sign(total) / total.abs().clamp_min(1e-30)
    return share.max(0).values.argsort(descending=True)


def select_neurons(contrib: torch.Tensor, share: float, max_neurons: int) -> tuple[list[int], list[float]]:
    """Per massive dim, the fewest neurons whose contributions (same sign as the total) reach ``share`` of
    the FFN output on that dim; the union over dims, at most ``max_neurons``, strongest first. Returns the
    neurons and the share of each dim's FFN output they cover."""
    total = contrib.sum(1)
    chosen: dict[int, float] = {}
    for i in range(contrib.shape[0]):
        signed = contrib[i] * torch.sign(total[i])
        order = signed.argsort(descending=True)
        acc = 0.0
        for n in order.tolist():
            if signed[n] <= 0:
                break
            s = float(signed[n] / total[i].abs().clamp_min(1e-30))
            chosen[n] = max(chosen.get(n, 0.0), s)
            acc += s
            if acc >= share:
                break
    neurons = [n for n, _ in sorted(chosen.items(), key=lambda kv: -kv[1])][:max_neurons]
    covered = [float(contrib[i, neurons].sum() / total[i]) if float(total[i]) != 0 else 0.0
               for i in range(contrib.shape[0])]
    return neurons, covered


def driving_inputs(lm: LM, layer: int, mlp_in: torch.Tensor, neuron: int, top: int = 5) -> list[dict[str, Any]]:
    """The FFN-input dims with the largest |x_i * W[neuron, i]| through each input projection."""
    x = mlp_in.mean(0)
    rows = []
    scores = torch.zeros_like(x)
    contribs: dict[str, torch.Tensor] = {}
    for name, w in ffn_in_weights(lm, layer).items():
        c = x * w[neuron].float().cpu()
        contribs[name] = c
        scores = torch.maximum(scores, c.abs() / c.abs().sum().clamp_min(1e-30))
    for i in scores.argsort(descending=True)[:top].tolist():
        rows.append({"dim": i, "x": float(x[i]), "share": float(scores[i]),
                     **{f"{name}_contribution": float(c[i]) for name, c in contribs.items()},
                     **{f"{name}_preact": float(c.sum()) for name, c in contribs.items()}})
    return rows


def driving_dims(rows_per_neuron: dict[int, list[dict[str, Any]]], min_share: float = 0.1, per_neuron: int = 3) -> list[int]:
    """Input dims that carry at least ``min_share`` of a top neuron's input (at most ``per_neuron`` each;
    at least the strongest one)."""
    dims: set[int] = set()
    for rows in rows_per_neuron.values():
        picked = [r["dim"] for r in rows[:per_neuron] if r["share"] >= min_share] or [rows[0]["dim"]]
        dims.update(picked)
    return sorted(dims)


# ----------------------------------------------------------------------------------------------------
# perplexity on the shipped text


def ppl_text() -> str:
    from importlib.resources import files

    return files("melayer.data").joinpath("ppl_text.txt").read_text()


def _special_prefix(tok) -> list[int]:
    """Token ids the tokenizer puts in front of every text (e.g. <bos>), [] if none."""
    with_sp = tok("a b", add_special_tokens=True)["input_ids"]
    without = tok("a b", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    return list(with_sp[:n]) if n > 0 and with_sp[n:] == without else []


@torch.no_grad()
def perplexity(lm: LM, text: str | None = None, *, max_tokens: int | None = None, window: int = PPL_WINDOW) -> dict[str, Any]:
    """Perplexity of ``text`` (default: the shipped WikiText-2 excerpt) in non-overlapping windows of
    ``window`` tokens, each preceded by the tokenizer's special prefix (e.g. <bos>), as the model sees text."""
    text = ppl_text() if text is None else text
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    prefix = _special_prefix(tok)
    max_pos = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    if max_pos:
        window = max(8, min(window, int(max_pos) - len(prefix)))
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2 and not prefix:
            continue
        inp = torch.tensor([prefix + chunk], device=lm.device)
        labels = inp.clone()
        labels[0, : len(prefix)] = -100
        out = lm.model(input_ids=inp, labels=labels, use_cache=False)
        n = int((labels[0, 1:] != -100).sum())
        nll += float(out.loss) * n
        count += n
    if count == 0:
        raise MelayerError("perplexity text is too short")
    return {"ppl": math.exp(nll / count), "tokens": count, "window": window, "prefix": prefix}


# ----------------------------------------------------------------------------------------------------
# ablation runs


@dataclass
class AblationRun:
    """One ablation and what it did."""

    ablate: str  # none / norm / ffn / both / random
    layer: int
    role: str  # me / before / after / middle / random
    edits: list[Edit]
    downstream_profile: list[float]  # per layer: mean over prompts of max |a| on the massive dims, massive token
    downstream_max: float
    me_layer_after: int | None
    me_layer_after_consistency: float | None
    massive_dims_after: list[int]
    ppl: float
    draw: int | None = None
    ppl_tokens: int = 0
    baseline_downstream_max: float | None = None
    baseline_ppl: float | None = None
    baseline_profile: list[float] | None = None
    me_layer: int | None = None

    def mean_ratio(self) -> float | None:
        """Mean over the ME layer and later layers of (ablated / unablated) massive-token magnitude."""
        if self.baseline_profile is None or self.me_layer is None:
            return None
        pairs = [(a, b) for a, b in zip(self.downstream_profile[self.me_layer:], self.baseline_profile[self.me_layer:]) if b]
        return float(np.mean([a / b for a, b in pairs])) if pairs else None

    def to_dict(self) -> dict[str, Any]:
        neurons = [n for e in self.edits if isinstance(e, NeuronAblation) for n in e.neurons]
        rel = (self.downstream_max / self.baseline_downstream_max) if self.baseline_downstream_max else None
        return {
            "ablate": self.ablate, "layer": self.layer, "role": self.role, "draw": self.draw,
            "neurons": neurons,
            "norm_edits": [e.to_dict() for e in self.edits if isinstance(e, NormEdit)],
            "downstream_max": self.downstream_max,
            "downstream_ratio": rel,
            "downstream_mean_ratio": self.mean_ratio(),
            "downstream_profile": self.downstream_profile,
            "me_layer_after": self.me_layer_after,
            "me_layer_after_consistency": self.me_layer_after_consistency,
            "massive_dims_after": self.massive_dims_after,
            "ppl": self.ppl,
            "ppl_ratio": (self.ppl / self.baseline_ppl) if self.baseline_ppl else None,
        }


def _measure(lm: LM, prompts: Sequence[str], positions: Sequence[int], dims: Sequence[int], me_layer: int,
             edits: Sequence[Edit], crit: Criterion, batch_size: int, ppl_tokens: int | None) -> dict[str, Any]:
    per_layer: list[list[float]] = [[] for _ in range(lm.num_layers)]
    tracker = TokenTracker(positions)
    dim_idx = torch.tensor(list(dims))

    def hook(layer: int):
        def fn(module, args, output):
            rows = tracker.rows(layer_output(output))
            per_layer[layer].extend(rows[:, dim_idx].abs().max(dim=1).values.tolist())
        return fn

    with ablated(lm, edits):
        with Hooks() as hooks:
            tracker.install(hooks, lm)
            for i, layer in enumerate(lm.layers):
                hooks.forward(layer, hook(i))
            result = scan(lm, list(prompts), criterion=crit, batch_size=batch_size, progress=False)
        ppl = perplexity(lm, max_tokens=ppl_tokens)
    arr = np.array(per_layer)  # (layers, prompts)
    later = arr[me_layer:].max(axis=0)
    return {
        "profile": arr.mean(axis=1).tolist(),
        "downstream_max": float(later.mean()),
        "me_layer_after": result.me_layer,
        "consistency": result.me_layer_consistency,
        "massive_dims_after": result.massive_dims,
        "ppl": ppl["ppl"],
        "ppl_tokens": ppl["tokens"],
    }


def control_layers(me_layer: int, num_layers: int) -> list[tuple[str, int]]:
    """(role, layer) for the layer before, the layer after and a middle layer, skipping those that do not
    exist or coincide with the ME layer or with each other."""
    out: list[tuple[str, int]] = []
    for role, layer in (("before", me_layer - 1), ("after", me_layer + 1), ("middle", num_layers // 2)):
        if 0 <= layer < num_layers and layer != me_layer and layer not in [l for _, l in out]:
            out.append((role, layer))
    return out


# ----------------------------------------------------------------------------------------------------
# result


@dataclass
class ExplainResult:
    model: str
    arch: str
    num_layers: int
    hidden_size: int
    me_layer: int
    me_layer_consistency: float | None
    massive_dims: list[int]
    massive_dim_support: dict[int, float]
    massive_tokens: list[dict[str, Any]]
    decomposition: list[dict[str, Any]]
    top_neurons: list[dict[str, Any]]
    selected_neurons: list[int]
    covered_share: dict[int, float]
    super_weights: list[dict[str, Any]]
    driving: dict[int, list[dict[str, Any]]]
    driving_dims: list[int]
    norm_gains: list[dict[str, Any]]
    ablations: list[AblationRun]
    controls: list[AblationRun]
    random_runs: list[AblationRun]
    settings: dict[str, Any]
    model_check: dict[str, Any]
    prompts: list[str] = field(default_factory=list)

    def random_summary(self) -> dict[str, Any]:
        if not self.random_runs:
            return {}
        down = np.array([r.downstream_max for r in self.random_runs])
        ppl = np.array([r.ppl for r in self.random_runs])
        base = self.ablations[0]
        return {
            "ablate": "ffn", "layer": self.me_layer, "neurons_per_draw": len(self.selected_neurons),
            "draws": len(self.random_runs), "seed": self.settings["seed"],
            "downstream_max": {"mean": float(down.mean()), "std": float(down.std()), "min": float(down.min()),
                               "max": float(down.max())},
            "downstream_ratio_mean": float(down.mean() / base.downstream_max) if base.downstream_max else None,
            "ppl": {"mean": float(ppl.mean()), "std": float(ppl.std()), "min": float(ppl.min()), "max": float(ppl.max())},
            "me_layer_after": [r.me_layer_after for r in self.random_runs],
        }

    def outcome(self, run: AblationRun) -> str:
        """What an ablation did to the ME layer, in words: "no ME layer", "moves to N" or "stays"."""
        if run.me_layer_after is None:
            return "no ME layer"
        return "stays" if run.me_layer_after == self.me_layer else f"moves to {run.me_layer_after}"

    def verdict(self) -> dict[str, Any]:
        """Plain statements derived from the numbers (nothing here is asserted a priori)."""
        base = self.ablations[0].downstream_max

        def entry(r: AblationRun) -> dict[str, Any]:
            return {"outcome": self.outcome(r), "me_layer_after": r.me_layer_after,
                    "downstream_ratio": r.downstream_max / base if base else None,
                    "downstream_mean_ratio": r.mean_ratio(),
                    "ppl_ratio": r.ppl / self.ablations[0].ppl if self.ablations[0].ppl else None}

        out: dict[str, Any] = {
            "meaning": "outcome: what the re-run scan says about the ME layer with the ablation active ('no ME layer' = "
                       "no persistent massive activation anywhere; 'moves to N' = it now emerges at layer N); "
                       "downstream_ratio: downstream_max / unablated downstream_max",
        }
        for r in self.ablations[1:]:
            out[f"{r.ablate}@me({r.layer})"] = entry(r)
        for r in self.controls:
            out[f"{r.ablate}@{r.role}({r.layer})"] = entry(r)
        if self.random_runs:
            outcomes = [self.outcome(r) for r in self.random_runs]
            out[f"random_ffn@me({self.me_layer})"] = {
                "outcomes": outcomes,
                "downstream_ratio_mean": float(np.mean([r.downstream_max for r in self.random_runs])) / base if base else None,
                "ppl_ratio_mean": float(np.mean([r.ppl for r in self.random_runs])) / self.ablations[0].ppl}
        return out

    def _record(self, run: AblationRun) -> dict[str, Any]:
        return {**run.to_dict(), "outcome": self.outcome(run)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "melayer.explain/1",
            "model": self.model, "arch": self.arch, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "settings": self.settings,
            "me_layer": self.me_layer, "me_layer_consistency": self.me_layer_consistency,
            "massive_dims": self.massive_dims,
            "massive_dim_support": {str(k): v for k, v in self.massive_dim_support.items()},
            "massive_tokens": self.massive_tokens,
            "decomposition": self.decomposition,
            "top_neurons": self.top_neurons,
            "selected_neurons": self.selected_neurons,
            "selected_share_of_ffn_output": {str(k): v for k, v in self.covered_share.items()},
            "super_weights": self.super_weights,
            "driving_inputs": {str(k): v for k, v in self.driving.items()},
            "driving_dims": self.driving_dims,
            "norm_gains": self.norm_gains,
            "ablations": [self._record(r) for r in self.ablations],
            "controls": {
                "layers": [self._record(r) for r in self.controls],
                "random": {**self.random_summary(), "runs": [self._record(r) for r in self.random_runs]},
            },
            "verdict": self.verdict(),
            "model_check": self.model_check,
            "prompts": self.prompts,
        }


# ----------------------------------------------------------------------------------------------------
# the analysis


def _decompose(lm: LM, rec: dict[str, Any], dims: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    has_pa = "post_attn_out" in rec
    has_pf = "post_ffn_out" in rec
    for d in dims:
        r_in = rec["resid_in"][:, d]
        attn = rec["post_attn_out"][:, d] if has_pa else rec["attn_out"][:, d]
        ffn = rec["post_ffn_out"][:, d] if has_pf else rec["mlp_out"][:, d]
        out = rec["resid_out"][:, d]
        row: dict[str, Any] = {
            "dim": d,
            "residual_in": float(r_in.mean()),
            "attn_branch": float(attn.mean()),
            "ffn_branch": float(ffn.mean()),
            "residual_out": float(out.mean()),
            "residual_out_min_abs": float(out.abs().min()),
            "sum_check_error": float((r_in + attn + ffn - out).abs().max()),
        }
        delta = float((out - r_in).mean())
        row["update"] = delta
        row["ffn_share_of_update"] = float(ffn.mean()) / delta if delta else None
        row["attn_share_of_update"] = float(attn.mean()) / delta if delta else None
        if has_pa:
            row["attn_raw"] = float(rec["attn_out"][:, d].mean())
            row["post_attn_norm_realised_gain"] = float((attn / rec["attn_out"][:, d]).mean())
        if has_pf:
            row["mlp_raw"] = float(rec["mlp_out"][:, d].mean())
            row["post_ffn_norm_realised_gain"] = float((ffn / rec["mlp_out"][:, d]).mean())
        rows.append(row)
    return rows


def _norm_report(lm: LM, layer: int, rec: dict[str, Any], dims: Sequence[int], drive: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    arch = lm.arch
    for role in NORM_ROLES:
        gain = lm.norm_gain(layer, role)
        if gain is None:
            continue
        g = gain.float().cpu()
        median = float(g.median())
        order = g.abs().argsort(descending=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        entries = []
        for kind, ds in (("massive", dims), ("driving", drive)):
            for d in ds:
                entries.append({"dim": int(d), "kind": kind, "gain": float(g[d]),
                                "ratio_to_median": float(g[d]) / median if median else None,
                                "rank_by_abs_gain": int(rank[d]) + 1})
        scale = rec.get("norm_scale", {}).get(role, {})
        ms, os_ = scale.get("massive_inv_scale"), scale.get("others_median_inv_scale")
        out.append({
            "role": role, "module": f"{arch.layers}.{layer}.{arch.path(role)}", "median_gain": median,
            "max_abs_gain": float(g.abs().max()), "max_abs_gain_dim": int(order[0]),
            "top_dims": [{"dim": int(i), "gain": float(g[i])} for i in order[:5].tolist()],
            "dims": entries,
            "token_inv_scale": {"massive": ms, "others_median": os_,
                                "ratio": (ms / os_) if ms is not None and os_ else None,
                                "meaning": "1/rms (RMSNorm) or 1/std (LayerNorm) of this norm's input; the norm's "
                                           "output on dim d is gain[d] x this x input[d]"},
        })
    return out


def _norm_edits(lm: LM, layer: int, dims: Sequence[int], drive: Sequence[int]) -> list[NormEdit]:
    edits = []
    e = median_gain_edit(lm, layer, "pre_ffn_norm", drive, reason="gain on the dims driving the top FFN neurons")
    if e is not None:
        edits.append(e)
    e = median_gain_edit(lm, layer, "post_ffn_norm", dims, reason="gain on the massive dims after the FFN")
    if e is not None:
        edits.append(e)
    return edits


@torch.no_grad()
def explain(
    lm: LM,
    prompts: Sequence[str] | None = None,
    *,
    n_prompts: int | None = DEFAULT_PROMPTS,
    criterion: Criterion | None = None,
    share: float = 0.9,
    max_neurons: int = 8,
    random_draws: int = 3,
    seed: int = 0,
    ppl_tokens: int | None = 1024,
    batch_size: int = 8,
    progress: bool = True,
) -> ExplainResult:
    """Explain the ME layer of ``lm`` causally (see the module docstring)."""
    crit = criterion or Criterion()
    prompts = list(prompts) if prompts is not None else default_prompts()
    if n_prompts:
        prompts = prompts[:n_prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise MelayerError("empty prompt: every prompt must contain text")
    if not 0 < share <= 1:
        raise MelayerError(f"share must be in (0, 1], got {share:g}")
    if max_neurons < 1:
        raise MelayerError("max_neurons must be >= 1")
    if random_draws < 0:
        raise MelayerError("random_draws must be >= 0")
    before = fingerprint(lm)

    base = scan(lm, prompts, criterion=crit, batch_size=batch_size, progress=progress)
    L = base.me_layer
    if L is None:
        raise MelayerError(f"no ME layer found in {lm.name} on these {len(prompts)} prompts "
                           "(no persistent massive activation): nothing to explain")
    dims, support = massive_dims_at(base, L)
    positions = massive_positions(base, L, dims)
    controls = control_layers(L, lm.num_layers)
    rec = record_layers(lm, prompts, positions, sorted({L, *[l for _, l in controls]}), batch_size)

    # 2-3. decomposition and attribution at the ME layer
    decomposition = _decompose(lm, rec[L], dims)
    contrib = neuron_contributions(lm, L, rec[L]["down_in"], dims)
    total = contrib.sum(1)
    selected, covered = select_neurons(contrib, share, max_neurons)
    top_neurons = []
    w_down = lm.down_weight(L).float().cpu()
    act_mean = rec[L]["down_in"].mean(0)
    for i, d in enumerate(dims):
        order = (contrib[i] * torch.sign(total[i])).argsort(descending=True)[: max(10, max_neurons)]
        for n in order.tolist():
            top_neurons.append({"neuron": n, "dim": d, "contribution": float(contrib[i, n]),
                                "share": float(contrib[i, n] / total[i]) if float(total[i]) else None,
                                "activation": float(act_mean[n]), "down_weight": float(w_down[d, n]),
                                "selected": n in selected})
    median_abs_w = float(w_down.abs().median())
    down_path = f"{lm.arch.layers}.{L}.{lm.arch.down}.weight"
    super_weights = []
    for n in selected:
        for i, d in enumerate(dims):
            s = float(contrib[i, n] / total[i]) if float(total[i]) else 0.0
            if s <= 0:
                continue
            super_weights.append({
                "layer": L, "row": d, "column": n, "value": float(w_down[d, n]),
                "ratio_to_median_abs_weight": abs(float(w_down[d, n])) / median_abs_w if median_abs_w else None,
                "share_of_ffn_output": s, "tensor": down_path,
                "stored_index": lm.arch.stored_index(d, n),
            })
    driving = {n: driving_inputs(lm, L, rec[L]["mlp_in"], n) for n in selected}
    drive = driving_dims(driving)
    norm_gains = _norm_report(lm, L, rec[L], dims, drive)

    # 5. ablations
    def edits_for(layer: int, kind: str, neurons: list[int], drv: list[int]) -> list[Edit]:
        e: list[Edit] = []
        if kind in ("norm", "both"):
            e.extend(_norm_edits(lm, layer, dims, drv))
        if kind in ("ffn", "both"):
            e.append(NeuronAblation(layer, tuple(neurons)))
        return e

    plan: list[tuple[str, int, str, list[Edit], int | None]] = []
    for kind in ABLATIONS:
        plan.append((kind, L, "me", edits_for(L, kind, selected, drive) if kind != "none" else [], None))
    for role, layer in controls:
        c = neuron_contributions(lm, layer, rec[layer]["down_in"], dims)
        neurons = rank_neurons(c)[: len(selected)].tolist()
        drv = driving_dims({n: driving_inputs(lm, layer, rec[layer]["mlp_in"], n) for n in neurons})
        for kind in ABLATIONS[1:]:
            plan.append((kind, layer, role, edits_for(layer, kind, neurons, drv), None))
    rng = np.random.default_rng(seed)
    inter = w_down.shape[1]
    pool = np.array([n for n in range(inter) if n not in selected])
    for draw in range(random_draws):
        neurons = sorted(rng.choice(pool, size=min(len(selected), len(pool)), replace=False).tolist())
        plan.append(("random", L, "random", [NeuronAblation(L, tuple(neurons))], draw))

    runs: list[AblationRun] = []
    try:
        for kind, layer, role, edits, draw in track(plan, f"ablating {lm.name}", enabled=progress):
            m = _measure(lm, prompts, positions, dims, L, edits, crit, batch_size, ppl_tokens)
            runs.append(AblationRun(ablate=kind, layer=layer, role=role, edits=edits, draw=draw,
                                    downstream_profile=m["profile"], downstream_max=m["downstream_max"],
                                    me_layer_after=m["me_layer_after"], me_layer_after_consistency=m["consistency"],
                                    massive_dims_after=m["massive_dims_after"], ppl=m["ppl"],
                                    ppl_tokens=m["ppl_tokens"]))
    finally:
        after = fingerprint(lm)
    if after != before:
        raise MelayerError(f"internal: the model changed during explain ({before} -> {after})")
    for r in runs:
        r.baseline_downstream_max = runs[0].downstream_max
        r.baseline_ppl = runs[0].ppl
        r.baseline_profile = runs[0].downstream_profile
        r.me_layer = L

    ppl_info = {"text": "melayer/data/ppl_text.txt (WikiText-2 test excerpt, CC BY-SA 3.0)",
                "max_tokens": ppl_tokens, "window": PPL_WINDOW, "tokens": runs[0].ppl_tokens}
    return ExplainResult(
        model=lm.name, arch=lm.arch.name, num_layers=lm.num_layers, hidden_size=lm.hidden_size,
        me_layer=L, me_layer_consistency=base.me_layer_consistency, massive_dims=dims, massive_dim_support=support,
        massive_tokens=base.massive_tokens(), decomposition=decomposition, top_neurons=top_neurons,
        selected_neurons=selected, covered_share=dict(zip(dims, covered)), super_weights=super_weights,
        driving=driving, driving_dims=drive, norm_gains=norm_gains,
        ablations=[r for r in runs if r.role == "me"], controls=[r for r in runs if r.role not in ("me", "random")],
        random_runs=[r for r in runs if r.role == "random"],
        settings={"prompts": len(prompts), "criterion": crit.to_dict(), "share": share, "max_neurons": max_neurons,
                  "random_draws": random_draws, "seed": seed, "batch_size": batch_size, "perplexity": ppl_info,
                  "massive_token_positions": positions, "control_layers": dict((r, l) for r, l in controls),
                  "downstream_max": "mean over prompts of the largest |a| on the massive dims of the massive token "
                                    "over the outputs of the ME layer and every later layer",
                  "downstream_mean_ratio": "mean over the ME layer and later layers of the per-layer ratio "
                                           "(ablated / unablated) of that magnitude (downstream_profile)",
                  "ffn_ablation": "the chosen neurons' activations are zeroed at the down-projection input for every "
                                  "token (at control layers: the same number of neurons, ranked by their contribution "
                                  "to the massive dims of the massive token at that layer)",
                  "norm_ablation": "the effective gain of the pre-FFN norm on the dims driving the top neurons and of "
                                   "the post-FFN norm (if any) on the massive dims is set to that norm's median gain"},
        model_check={"before": before, "after": after, "bit_identical": after == before},
        prompts=prompts,
    )
