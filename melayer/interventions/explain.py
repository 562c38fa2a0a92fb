"""``melayer explain``: a causal account of the ME layer.

1. Locate the ME layer, the massive token(s) and dims with :func:`melayer.scan`.
2. Decompose the ME layer's update of the massive token on each massive dim into its attention branch and
   its FFN branch (and, where a norm follows a branch, e.g. Gemma's sandwich norms, the gain it applied).
3. Attribute the FFN branch to intermediate neurons (activation x ``down`` column entry), name the super
   weights, and the FFN-input dims that drive those neurons (through gate/up, fused gate_up or Conv1D).
4. Report each norm's gain on the relevant dims against that norm's median gain.
5. Full-factorial ablation at the ME layer (``none``, ``norm``, ``ffn``, ``both``) with controls: the same
   ablations at other layers (before, after, middle) and random-neuron ablations of the same size. At an MoE
   ME layer the named expert(s) are also removed whole (``expert``, ``norm+expert``), with two controls in the
   same layer: random other routed experts removed whole, and the named neurons' counterparts in random other
   experts. Each
   run measures the massive token's downstream magnitude, re-runs the scan (does an ME layer still exist?)
   and the perplexity of a fixed shipped text. Everything is temporary and the model is verified
   bit-identical afterwards.

Only the massive token's rows are kept from any forward pass (reduced inside hooks), so memory does not
grow with prompt length beyond one layer's activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from melayer.analysis.attribution import (
    decompose,
    driving_dims,
    driving_inputs,
    neuron_contributions,
    norm_report,
    rank_neurons,
    record_layers,
    select_neurons,
)
from melayer.analysis.criterion import Criterion
from melayer.analysis.me_layer import massive_dims_at, massive_positions
from melayer.analysis.perplexity import perplexity
from melayer.analysis.scan import default_prompts, scan
from melayer.analysis.super_experts import super_experts
from melayer.capture import Hooks, TokenTracker, layer_output
from melayer.interventions.ablate import (
    Edit,
    ExpertAblation,
    NeuronAblation,
    NormEdit,
    ablated,
    fingerprint,
    median_gain_edit,
)
from melayer.models.loading import LM
from melayer.util.console import track
from melayer.util.errors import MelayerError
from melayer.util.results import Result

ABLATIONS = ("none", "norm", "ffn", "both")
EXPERT_ABLATIONS = ("expert", "norm+expert")  # an MoE layer: the named expert(s) whole, alone and with the norm edit
EXPERT_CONTROLS = ("random_expert", "random_expert_neuron")
DEFAULT_PROMPTS = 16


# ----------------------------------------------------------------------------------------------------
# ablation runs


@dataclass
class AblationRun:
    """One ablation and what it did."""

    ablate: str  # none / norm / ffn / both / expert / norm+expert / random / random_expert / random_expert_neuron
    layer: int
    role: str  # me / before / after / middle / random / random_expert / random_expert_neuron
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
        experts = [x for e in self.edits if isinstance(e, ExpertAblation) for x in e.experts]
        rel = (self.downstream_max / self.baseline_downstream_max) if self.baseline_downstream_max else None
        return {
            "ablate": self.ablate, "layer": self.layer, "role": self.role, "draw": self.draw,
            "neurons": neurons, **({"experts": experts} if experts else {}),
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
             edits: Sequence[Edit], crit: Criterion, batch_size: int | None, ppl_tokens: int | None
             ) -> dict[str, Any]:
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
            # the scan feeds the prompts longest first: the tracker must know which prompt each row is
            result = scan(lm, list(prompts), criterion=crit, batch_size=batch_size, progress=False,
                          on_batch=tracker.expect)
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
        "ppl_windows": {"window": ppl["window"], "stride": ppl["stride"]},
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
class ExplainResult(Result):
    """Result of :func:`explain`; ``to_dict()`` is what ``explain.json`` holds and ``from_dict`` (or
    ``ExplainResult.load(path)``) reads it back."""

    kind = "explain"

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
    experts: list[dict[str, Any]] | None = None  # MoE ME layer: each expert's share of the massive dims
    expert_controls: list[AblationRun] = field(default_factory=list)  # MoE ME layer: random experts / expert neurons
    super_experts: dict[str, Any] | None = None  # MoE model: Su et al.'s super experts beside the named expert(s)

    def random_summary(self) -> dict[str, Any]:
        """The random-neuron controls at the ME layer, summarised.

        Returns:
            The number of draws and neurons per draw, the seed, the downstream maximum and perplexity over the
            draws (mean, std, min, max), the mean downstream ratio to the unablated run and each draw's ME layer
            after the ablation; empty without random draws.
        """
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
        """What an ablation did to the ME layer, in words.

        Args:
            run: one ablation run of this result.

        Returns:
            ``"no ME layer"``, ``"moves to N"`` or ``"stays"``.
        """
        if run.me_layer_after is None:
            return "no ME layer"
        return "stays" if run.me_layer_after == self.me_layer else f"moves to {run.me_layer_after}"

    def verdict(self) -> dict[str, Any]:
        """Plain statements derived from the numbers (nothing here is asserted a priori).

        Returns:
            Per ablation and control (keyed like ``"ffn@me(3)"``): the outcome, the ME layer after it, and the
            downstream and perplexity ratios to the unablated run; with a ``"meaning"`` entry that explains them.
        """
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
        for role in EXPERT_CONTROLS:
            runs = [r for r in self.expert_controls if r.role == role]
            if runs:
                out[f"{role}@me({self.me_layer})"] = {
                    "outcomes": [self.outcome(r) for r in runs],
                    "downstream_ratio_mean": float(np.mean([r.downstream_max for r in runs])) / base if base else None,
                    "ppl_ratio_mean": float(np.mean([r.ppl for r in runs])) / self.ablations[0].ppl}
        return out

    def named_experts(self) -> list[int | str]:
        """The experts the attribution names at an MoE ME layer (those holding the selected neurons).

        Returns:
            Their indices (or ``"shared"``), strongest first; empty for a dense ME layer.
        """
        run = next((r for r in self.ablations if r.ablate == "expert"), None)
        return [x for e in run.edits if isinstance(e, ExpertAblation) for x in e.experts] if run else []

    def _record(self, run: AblationRun) -> dict[str, Any]:
        return {**run.to_dict(), "outcome": self.outcome(run)}

    def to_dict(self) -> dict[str, Any]:
        """The result as ``explain.json`` holds it.

        Returns:
            JSON-ready data: the decomposition, neurons, super weights, norm gains, every ablation and control
            with its outcome, the verdict and the settings.
        """
        return {
            "schema": self.schema(),
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
                **({"experts": {"named": self.named_experts(), "meaning": EXPERT_CONTROL_MEANING,
                                "runs": [self._record(r) for r in self.expert_controls]}}
                   if self.experts is not None else {}),
            },
            "verdict": self.verdict(),
            "model_check": self.model_check,
            "prompts": self.prompts,
            **({"experts": self.experts} if self.experts is not None else {}),
            **({"super_experts": self.super_experts} if self.super_experts is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplainResult:
        """The result an ``explain.json`` holds.

        Args:
            data: a loaded ``explain.json`` (what :meth:`to_dict` returned).

        Returns:
            The explanation.
        """
        def ints(d: dict[str, Any]) -> dict[int, Any]:
            return {int(k): v for k, v in d.items()}

        me, ppl_tokens = data["me_layer"], data["settings"]["perplexity"]["tokens"]
        base = data["ablations"][0]

        def run(r: dict[str, Any]) -> AblationRun:
            edits: list[Edit] = [NeuronAblation(r["layer"], tuple(r["neurons"]))] if r["neurons"] else []
            edits += [NormEdit(e["layer"], e["role"], tuple(e["dims"]), e["set_gain_to"], tuple(e["original_gains"]),
                               e["reason"]) for e in r["norm_edits"]]
            if r.get("experts"):
                edits.append(ExpertAblation(r["layer"], tuple(r["experts"])))
            return AblationRun(ablate=r["ablate"], layer=r["layer"], role=r["role"], edits=edits,
                               downstream_profile=r["downstream_profile"], downstream_max=r["downstream_max"],
                               me_layer_after=r["me_layer_after"],
                               me_layer_after_consistency=r["me_layer_after_consistency"],
                               massive_dims_after=r["massive_dims_after"], ppl=r["ppl"], draw=r["draw"],
                               ppl_tokens=ppl_tokens, baseline_downstream_max=base["downstream_max"],
                               baseline_ppl=base["ppl"], baseline_profile=base["downstream_profile"], me_layer=me)

        return cls(model=data["model"], arch=data["arch"], num_layers=data["num_layers"],
                   hidden_size=data["hidden_size"], me_layer=me, me_layer_consistency=data["me_layer_consistency"],
                   massive_dims=data["massive_dims"], massive_dim_support=ints(data["massive_dim_support"]),
                   massive_tokens=data["massive_tokens"], decomposition=data["decomposition"],
                   top_neurons=data["top_neurons"], selected_neurons=data["selected_neurons"],
                   covered_share=ints(data["selected_share_of_ffn_output"]), super_weights=data["super_weights"],
                   driving=ints(data["driving_inputs"]), driving_dims=data["driving_dims"],
                   norm_gains=data["norm_gains"], ablations=[run(r) for r in data["ablations"]],
                   controls=[run(r) for r in data["controls"]["layers"]],
                   random_runs=[run(r) for r in data["controls"]["random"].get("runs", [])],
                   settings=data["settings"], model_check=data["model_check"], prompts=data["prompts"],
                   experts=data.get("experts"), super_experts=data.get("super_experts"),
                   expert_controls=[run(r) for r in data["controls"].get("experts", {}).get("runs", [])])


EXPERT_CONTROL_MEANING = (
    "named: the experts holding the selected neurons at the ME layer; expert / norm+expert (in ablations): those "
    "experts' whole output removed (down projection zeroed, routing unchanged), alone and with the norm edit; "
    "random_expert: as many other routed experts of the same layer removed whole; random_expert_neuron: each "
    "selected neuron's counterpart (same neuron number) in another, random routed expert of the same layer zeroed")


def _expert_of(segments: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """For an MoE layer, which expert neuron ``n`` belongs to and its number inside that expert (empty for dense)."""
    for seg in segments:
        if seg["start"] <= n < seg["start"] + seg["size"]:
            return {"expert": seg["expert"], "expert_neuron": n - seg["start"]}
    return {}


def expert_table(segments: list[dict[str, Any]], contrib: torch.Tensor, dims: Sequence[int]) -> list[dict[str, Any]]:
    """Per expert (routed ones, then the shared one): its share of the FFN output on each massive dim at the massive
    token (routing weight x expert output, summed over its neurons) and its strongest neuron there."""
    total = contrib.sum(1)
    rows = []
    for seg in segments:
        part = contrib[:, seg["start"]:seg["start"] + seg["size"]]
        for i, d in enumerate(dims):
            c = float(part[i].sum())
            if c == 0.0:
                continue
            top = int((part[i] * torch.sign(total[i])).argmax())
            rows.append({"expert": seg["expert"], "dim": int(d), "contribution": c,
                         "share": c / float(total[i]) if float(total[i]) else None,
                         "top_neuron": top, "top_neuron_contribution": float(part[i, top])})
    return sorted(rows, key=lambda r: -abs(r["share"] or 0.0))


def _expert_controls(lm: LM, layer: int, selected: list[int], named: list[int | str], draws: int,
                     seed: int) -> list[tuple[str, int, str, list[Edit], int | None]]:
    """The MoE controls at the ME layer (see ``EXPERT_CONTROL_MEANING``): per draw, as many random routed experts
    other than the named ones removed whole, and the selected neurons moved to random other routed experts."""
    fused = lm.experts(layer)
    routed = [e for e in named if isinstance(e, int)]
    others = [e for e in range(fused.num_experts) if e not in named] if fused is not None else []
    if fused is None or not routed or not others:
        return []
    segments = lm.ffn_segments(layer)
    rng = np.random.default_rng([seed, 1])  # its own stream: the random-neuron draws stay as without experts
    plan: list[tuple[str, int, str, list[Edit], int | None]] = []
    for draw in range(draws):
        pick = sorted(int(e) for e in rng.choice(others, size=min(len(routed), len(others)), replace=False))
        plan.append(("random_expert", layer, "random_expert", [ExpertAblation(layer, tuple(pick))], draw))
        moved = sorted({int(rng.choice(others)) * fused.inter + w["expert_neuron"] for n in selected
                        if isinstance((w := _expert_of(segments, n)).get("expert"), int)})
        plan.append(("random_expert_neuron", layer, "random_expert_neuron", [NeuronAblation(layer, tuple(moved))], draw))
    return plan


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
    batch_size: int | None = None,
    progress: bool = True,
) -> ExplainResult:
    """Explain the ME layer causally: which norm gains and FFN neurons make the massive activation
    (``melayer explain``; see the module docstring for the experiment).

    Args:
        lm: the model.
        prompts: the prompts (default: the shipped prompt set).
        n_prompts: use the first this many prompts (None: all).
        criterion: the massive-activation criterion.
        share: keep the fewest neurons whose contributions reach this share of the massive dims' total.
        max_neurons: at most this many neurons per layer.
        random_draws: random-neuron control ablations per layer.
        seed: the seed of those draws.
        ppl_tokens: tokens of the shipped text for the perplexity cost of each ablation (None: skip it).
        batch_size: at most this many prompts per forward pass.
        progress: show progress bars.

    Returns:
        The branch decomposition, neuron attribution, norm gains and ablations, as an :class:`ExplainResult`.

    Raises:
        MelayerError: an empty prompt, a bad setting, or no ME layer.
    """
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
    decomposition = decompose(lm, rec[L], dims, L)
    contrib = neuron_contributions(lm, L, rec[L]["down_in"], dims)
    total = contrib.sum(1)
    selected, covered = select_neurons(contrib, share, max_neurons)
    top_neurons = []
    w_down = lm.down_weight(L).float().cpu()
    act_mean = rec[L]["down_in"].mean(0)
    segments = lm.ffn_segments(L) if lm.experts(L) is not None else []
    for i, d in enumerate(dims):
        order = (contrib[i] * torch.sign(total[i])).argsort(descending=True)[: max(10, max_neurons)]
        for n in order.tolist():
            top_neurons.append({"neuron": n, "dim": d, "contribution": float(contrib[i, n]),
                                "share": float(contrib[i, n] / total[i]) if float(total[i]) else None,
                                "activation": float(act_mean[n]), "down_weight": float(w_down[d, n]),
                                "selected": n in selected, **_expert_of(segments, n)})
    median_abs_w = float(w_down.abs().median())
    neuron_role = "down" if lm.module(L, "down") is not None else "mixer_out"  # a layer without FFN: its mixer's
    down_path = f"{lm.arch.layers}.{L}.{lm.arch.path(neuron_role, L)}.weight"
    fused = lm.experts(L)
    super_weights = []
    for n in selected:
        for i, d in enumerate(dims):
            s = float(contrib[i, n] / total[i]) if float(total[i]) else 0.0
            if s <= 0:
                continue
            where = _expert_of(segments, n)
            if where.get("expert") not in (None, "shared"):
                tensor = f"{lm.arch.layers}.{L}.{lm.arch.path('experts', L)}.down_proj"
                stored = fused.stored_index(where["expert"], d, where["expert_neuron"])  # type: ignore[union-attr]
            else:
                tensor, stored = down_path, lm.arch.at(L).stored_index(d, where.get("expert_neuron", n))
            super_weights.append({
                "layer": L, "row": d, "column": n, "value": float(w_down[d, n]),
                "ratio_to_median_abs_weight": abs(float(w_down[d, n])) / median_abs_w if median_abs_w else None,
                "share_of_ffn_output": s, "tensor": tensor, "stored_index": stored, **where,
            })
    experts = expert_table(segments, contrib, dims) if segments else None
    # the FFN input dims that drive each neuron (none for a mixer's neurons: they are not a projection of its input)
    driving = {n: driving_inputs(lm, L, rec[L]["mlp_in"], n) for n in selected} if "mlp_in" in rec[L] else {}
    drive = driving_dims(driving)
    norm_gains = norm_report(lm, L, rec[L], dims, drive)

    # 5. ablations
    def edits_for(layer: int, kind: str, neurons: list[int], drv: list[int], experts: list[int | str]) -> list[Edit]:
        e: list[Edit] = []
        if kind in ("norm", "both", "norm+expert"):
            e.extend(_norm_edits(lm, layer, dims, drv))
        if kind in ("ffn", "both"):
            e.append(NeuronAblation(layer, tuple(neurons)))
        if kind in EXPERT_ABLATIONS:
            e.append(ExpertAblation(layer, tuple(experts)))
        return e

    def experts_of(layer: int, neurons: list[int]) -> list[int | str]:
        segs = lm.ffn_segments(layer) if lm.experts(layer) is not None else []
        return list(dict.fromkeys(w["expert"] for n in neurons if (w := _expert_of(segs, n))))

    named = experts_of(L, selected)
    kinds = ABLATIONS + (EXPERT_ABLATIONS if named else ())
    plan: list[tuple[str, int, str, list[Edit], int | None]] = []
    for kind in kinds:
        plan.append((kind, L, "me", edits_for(L, kind, selected, drive, named) if kind != "none" else [], None))
    for role, layer in controls:
        if "down_in" not in rec[layer]:  # a control layer without FFN (an SSM layer of a hybrid): nothing to ablate
            continue
        c = neuron_contributions(lm, layer, rec[layer]["down_in"], dims)
        neurons = rank_neurons(c)[: len(selected)].tolist()
        drv = driving_dims({n: driving_inputs(lm, layer, rec[layer]["mlp_in"], n) for n in neurons}) \
            if "mlp_in" in rec[layer] else []
        there = experts_of(layer, neurons)
        for kind in (kinds if there else ABLATIONS)[1:]:
            plan.append((kind, layer, role, edits_for(layer, kind, neurons, drv, there), None))
    rng = np.random.default_rng(seed)
    inter = w_down.shape[1]
    pool = np.array([n for n in range(inter) if n not in selected])
    for draw in range(random_draws):
        neurons = sorted(rng.choice(pool, size=min(len(selected), len(pool)), replace=False).tolist())
        plan.append(("random", L, "random", [NeuronAblation(L, tuple(neurons))], draw))
    plan.extend(_expert_controls(lm, L, selected, named, random_draws, seed))

    runs: list[AblationRun] = []
    try:
        for kind, layer, role, edits, run_draw in track(plan, f"ablating {lm.name}", enabled=progress):
            m = _measure(lm, prompts, positions, dims, L, edits, crit, batch_size, ppl_tokens)
            runs.append(AblationRun(ablate=kind, layer=layer, role=role, edits=edits, draw=run_draw,
                                    downstream_profile=m["profile"], downstream_max=m["downstream_max"],
                                    me_layer_after=m["me_layer_after"], me_layer_after_consistency=m["consistency"],
                                    massive_dims_after=m["massive_dims_after"], ppl=m["ppl"],
                                    ppl_tokens=m["ppl_tokens"]))
            ppl_windows = m["ppl_windows"]
    finally:
        after = fingerprint(lm)
    if after != before:
        raise MelayerError(f"internal: the model changed during explain ({before} -> {after})")
    for r in runs:
        r.baseline_downstream_max = runs[0].downstream_max
        r.baseline_ppl = runs[0].ppl
        r.baseline_profile = runs[0].downstream_profile
        r.me_layer = L

    supers = super_experts(lm, prompts, batch_size)
    if supers is not None:
        found = {(r["layer"], r["expert"]) for r in supers["super_experts"]}
        supers["melayer"] = {"layer": L, "experts": named, "super": [(L, e) in found for e in named],
                             "meaning": "the expert(s) holding the neurons explain names at the ME layer, and whether "
                                        "each is a super expert by the criterion above"}
    ppl_info = {"text": "melayer/data/ppl_text.txt (WikiText-2 test excerpt, CC BY-SA 3.0)",
                "max_tokens": ppl_tokens, **ppl_windows, "tokens": runs[0].ppl_tokens,
                "semantics": "melayer.analysis.perplexity.rolling_windows"}
    return ExplainResult(
        model=lm.name, arch=lm.arch.name, num_layers=lm.num_layers, hidden_size=lm.hidden_size,
        me_layer=L, me_layer_consistency=base.me_layer_consistency, massive_dims=dims, massive_dim_support=support,
        massive_tokens=base.massive_tokens(), decomposition=decomposition, top_neurons=top_neurons,
        selected_neurons=selected, covered_share=dict(zip(dims, covered)), super_weights=super_weights,
        driving=driving, driving_dims=drive, norm_gains=norm_gains,
        ablations=[r for r in runs if r.role == "me"],
        controls=[r for r in runs if r.role not in ("me", "random", *EXPERT_CONTROLS)],
        random_runs=[r for r in runs if r.role == "random"],
        expert_controls=[r for r in runs if r.role in EXPERT_CONTROLS],
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
        prompts=prompts, experts=experts, super_experts=supers,
    )
