"""``melayer explain`` and the ablation primitives, on tiny planted checkpoints (and one slow real-model run)."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from conftest import sig

from melayer.analysis.attribution import ffn_in_weights
from melayer.analysis.perplexity import perplexity
from melayer.capture import encode
from melayer.interventions.ablate import (
    ExpertAblation,
    NeuronAblation,
    NormEdit,
    ablated,
    fingerprint,
    median_gain_edit,
)
from melayer.interventions.explain import ExplainResult, control_layers, explain
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError

PROMPTS = ["The cat sat on the mat.", "Hello world, a test.", "Numbers: 1 2 3 4 5", "Another prompt here!"]
PLANT = dict(me_layer=1, neuron=5, dim=7, num_layers=6)  # controls: before 0, after 2, middle 3


@functools.cache
def _run(model_type: str):
    """One explain run per model type, shared by the tests below (each run is ~12 forward sweeps)."""
    lm = tiny_lm(model_type, **PLANT)
    before = fingerprint(lm)
    result = explain(lm, PROMPTS, random_draws=2, ppl_tokens=24, progress=False)
    return lm, before, result, result.to_dict()


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi3", "gpt2", "olmo2"])
def test_explain_finds_the_planted_neuron_and_ffn_ablation_removes_it(model_type):
    lm, before, result, d = _run(model_type)
    p = lm.plant
    assert d["schema"] == "melayer.explain/1"
    assert d["me_layer"] == p.me_layer
    assert d["massive_dims"] == [p.dim]
    # the planted neuron is on top and is the super weight
    top = d["top_neurons"][0]
    assert (top["neuron"], top["dim"]) == (p.neuron, p.dim)
    assert top["share"] > 0.99
    assert d["selected_neurons"] == [p.neuron]
    sw = d["super_weights"][0]
    assert (sw["layer"], sw["row"], sw["column"]) == (p.me_layer, p.dim, p.neuron)
    # the planted neuron reads the BOS-only carrier dim (through gate/up, fused gate_up or Conv1D c_fc)
    assert d["driving_dims"] == [p.carrier]
    # the FFN branch writes the massive value
    dec = d["decomposition"][0]
    assert abs(dec["ffn_branch"]) > 100 * abs(dec["attn_branch"])
    assert dec["sum_check_error"] < 1e-3 * abs(dec["residual_out"])
    # full-factorial ablation at the ME layer
    runs = {r["ablate"]: r for r in d["ablations"]}
    assert set(runs) == {"none", "norm", "ffn", "both"}
    assert runs["none"]["me_layer_after"] == p.me_layer
    for kind in ("ffn", "both"):
        assert runs[kind]["me_layer_after"] is None
        assert runs[kind]["downstream_max"] < 0.01 * runs["none"]["downstream_max"]
    # controls at other layers and random neurons leave it in place
    assert {r["role"] for r in d["controls"]["layers"]} == {"before", "after", "middle"}
    for r in d["controls"]["layers"] + d["controls"]["random"]["runs"]:
        assert r["me_layer_after"] == p.me_layer
        assert r["downstream_max"] > 0.9 * runs["none"]["downstream_max"]
    assert d["verdict"][f"ffn@me({p.me_layer})"]["outcome"] == "no ME layer"
    assert d["verdict"][f"ffn@before({p.me_layer - 1})"]["outcome"] == "stays"
    assert set(d["verdict"][f"random_ffn@me({p.me_layer})"]["outcomes"]) == {"stays"}
    # perplexity without and with the FFN ablation, against an independent NLL computation
    stride = d["settings"]["perplexity"]["stride"]
    assert runs["none"]["ppl"] == pytest.approx(reference_ppl(lm, 24, stride), rel=1e-5)
    with ablated(lm, [NeuronAblation(p.me_layer, (p.neuron,))]):
        assert runs["ffn"]["ppl"] == pytest.approx(reference_ppl(lm, 24, stride), rel=1e-5)
    # nothing left behind
    assert d["model_check"]["bit_identical"] and fingerprint(lm) == before
    json.dumps(d)


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2"])
def test_norm_ablation_removes_it_with_a_post_ffn_norm(model_type):
    """With a norm after the FFN (Gemma sandwich, OLMo2) the planted activation needs that norm's gain:
    setting it to the norm's median gain on the massive dim removes the massive activation."""
    lm, _, _, d = _run(model_type)
    runs = {r["ablate"]: r for r in d["ablations"]}
    edits = {e["role"]: e for e in runs["norm"]["norm_edits"]}
    assert edits["post_ffn_norm"]["dims"] == [lm.plant.dim]
    assert edits["post_ffn_norm"]["original_gains"][0] == pytest.approx(500.0)
    assert runs["norm"]["me_layer_after"] is None
    assert runs["norm"]["downstream_max"] < 0.01 * runs["none"]["downstream_max"]
    gains = {g["role"]: g for g in d["norm_gains"]}
    post = [e for e in gains["post_ffn_norm"]["dims"] if e["kind"] == "massive"][0]
    assert post["ratio_to_median"] > 100 and post["rank_by_abs_gain"] == 1


def test_llama_style_norm_ablation_edits_the_pre_ffn_norm_on_driving_dims():
    lm, _, _, d = _run("llama")
    norm = next(r for r in d["ablations"] if r["ablate"] == "norm")
    assert [(e["role"], e["dims"]) for e in norm["norm_edits"]] == [("pre_ffn_norm", [lm.plant.carrier])]


def test_the_restore_check_is_the_model_fingerprint_computed_afresh():
    """explain's before/after check is melayer's one weights fingerprint, recomputed each time: an edit through
    ``.data`` (which no version counter sees, so the cached fingerprint misses it) is still caught."""
    from melayer.models.fingerprint import fingerprint as weights_fingerprint

    lm = tiny_lm("llama", me_layer=1)
    before = fingerprint(lm)
    assert before["weights"] == weights_fingerprint(lm.model)
    weight = lm.model.model.layers[1].post_attention_layernorm.weight
    weight.data[3] += 1
    assert fingerprint(lm)["weights"] != before["weights"]
    weight.data[3] -= 1
    assert fingerprint(lm) == before


def test_ablations_are_restored_exactly_even_on_error():
    lm = tiny_lm("gemma3_text", me_layer=1)
    before = fingerprint(lm)
    edit = median_gain_edit(lm, 1, "post_ffn_norm", [7])
    assert isinstance(edit, NormEdit) and edit.original[0] == pytest.approx(500.0)
    batch = encode(lm, ["abc"])
    with torch.no_grad():
        ref = lm.model(**batch).logits
    with pytest.raises(RuntimeError):
        with ablated(lm, [edit, NeuronAblation(1, (5,))]):
            assert fingerprint(lm) != before
            assert float(lm.norm_gain(1, "post_ffn_norm")[7]) == pytest.approx(edit.gain)
            raise RuntimeError("boom")
    assert fingerprint(lm) == before
    with torch.no_grad():
        assert torch.equal(lm.model(**batch).logits, ref)


def test_ablation_input_errors():
    lm = tiny_lm("llama", plant=False)
    with pytest.raises(MelayerError, match="out of range"):
        with ablated(lm, [NeuronAblation(0, (10_000,))]):
            pass
    with pytest.raises(MelayerError, match="out of range"):
        with ablated(lm, [NeuronAblation(99, (1,))]):
            pass
    assert median_gain_edit(lm, 0, "post_ffn_norm", [1]) is None  # Llama has no post-FFN norm


# MoE layouts: concatenated gate/up (Mixtral, Qwen3-MoE, OLMoE), interleaved + transposed + biases (gpt-oss), a
# gated shared expert (Qwen2-MoE)
MOE = ["mixtral", "gpt_oss", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.mark.parametrize("model_type", MOE)
def test_expert_ablation_removes_it_only_for_the_named_expert(model_type):
    """The full-factorial design at an MoE ME layer: removing the named expert (or its named neuron) removes the
    massive activation; removing other routed experts of the same layer, or the same neuron inside them, and the
    named-style ablations at other layers leave it in place."""
    lm, before, result, d = _run(model_type)
    p = lm.plant
    inter = lm.experts(p.me_layer).inter
    assert d["controls"]["experts"]["named"] == [p.expert]
    assert (d["selected_neurons"], d["super_weights"][0]["expert"]) == ([p.expert * inter + p.neuron], p.expert)
    runs = {r["ablate"]: r for r in d["ablations"]}
    assert list(runs) == ["none", "norm", "ffn", "both", "expert", "norm+expert"]
    assert runs["expert"]["experts"] == [p.expert]
    for kind in ("ffn", "both", "expert", "norm+expert"):
        assert runs[kind]["me_layer_after"] is None, kind
        assert runs[kind]["downstream_max"] < 0.01 * runs["none"]["downstream_max"], kind
    controls = d["controls"]["experts"]["runs"]
    assert sorted({r["role"] for r in controls}) == ["random_expert", "random_expert_neuron"]
    assert len(controls) == 4  # two draws of each
    for r in controls:
        if r["role"] == "random_expert":
            assert r["experts"] and p.expert not in r["experts"]
        else:  # the planted neuron's counterpart in another routed expert
            assert [(n % inter, n // inter != p.expert) for n in r["neurons"]] == [(p.neuron, True)]
    for r in controls + [r for r in d["controls"]["layers"] if r["ablate"] in ("expert", "norm+expert")]:
        assert r["me_layer_after"] == p.me_layer, r
        assert r["downstream_max"] > 0.9 * runs["none"]["downstream_max"], r
    assert set(d["verdict"][f"random_expert@me({p.me_layer})"]["outcomes"]) == {"stays"}
    assert d["verdict"][f"expert@me({p.me_layer})"]["outcome"] == "no ME layer"
    assert d["model_check"]["bit_identical"] and fingerprint(lm) == before
    back = ExplainResult.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == json.loads(json.dumps(d))
    # the report shows the expert runs and their controls
    from melayer.reporting.explain import ablation_reading, explain_ablations_figure
    assert explain_ablations_figure(d) is not None
    assert "expert: no ME layer" in ablation_reading(d) and "other routed experts" in ablation_reading(d)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "gpt_oss"])
def test_super_experts_beside_the_named_expert(model_type):
    """Su et al.'s criterion finds the planted expert (and only it) as the one super expert, on the massive dim;
    its max |down output| is the FFN branch of the decomposition divided by the routing weight (~1 here)."""
    lm, _, _, d = _run(model_type)
    p, sup = lm.plant, d["super_experts"]
    assert [(r["layer"], r["expert"], r["dim"]) for r in sup["super_experts"]] == [(p.me_layer, p.expert, p.dim)]
    assert sup["melayer"]["experts"] == [p.expert] and sup["melayer"]["super"] == [True]
    assert sup["experts_measured"] == lm.num_layers * len(lm.ffn_segments(p.me_layer))
    assert sup["super_experts"][0]["max_abs_output"] == pytest.approx(abs(d["decomposition"][0]["ffn_branch"]), rel=1e-3)
    assert sup["largest"][1]["max_abs_output"] < sup["threshold"]
    assert "super_experts" not in _run("llama")[3]  # dense models: no such table, their JSON unchanged
    from melayer.reporting.page import html

    page = html(ExplainResult.from_dict(d))
    assert "Super experts by Su et al." in page and "random_expert_neuron" in page


def test_super_experts_leave_out_the_last_quarter_of_layers():
    """The criterion counts only the first 75 % of layers: a massive expert planted at layer 4 of 6 is the
    largest but not a super expert."""
    from melayer.analysis.super_experts import super_experts

    lm = tiny_lm("mixtral", me_layer=4, neuron=5, dim=7, num_layers=6)
    sup = super_experts(lm, PROMPTS)
    assert sup["last_layer"] == 3 and sup["super_experts"] == []
    assert (sup["largest"][0]["layer"], sup["largest"][0]["expert"]) == (4, lm.plant.expert)
    assert super_experts(tiny_lm("llama", plant=False), PROMPTS) is None


def test_expert_ablation_zeroes_the_expert_and_restores_it():
    """gpt-oss (down bias, transposed storage): the named expert's output is gone while the edit is active, the
    model bit-identical afterwards; a bad expert is one clear line."""
    lm, _, _, _ = _run("gpt_oss")
    fused, layer = lm.experts(lm.plant.me_layer), lm.plant.me_layer
    before = fingerprint(lm)
    x = torch.randn(5, lm.hidden_size)
    index = torch.full((5, 1), lm.plant.expert)
    weights = torch.ones(5, 1)
    with torch.no_grad():
        assert float(fused.output(x, index, weights).abs().max()) > 0
    with torch.no_grad(), ablated(lm, [ExpertAblation(layer, (lm.plant.expert,))]):
        assert float(fused.output(x, index, weights).abs().max()) == 0.0
        assert float(fused.output(x, index + 1, weights).abs().max()) > 0
    assert fingerprint(lm) == before
    with pytest.raises(MelayerError, match="not in layer") as err:
        with ablated(lm, [ExpertAblation(layer, (fused.num_experts,))]):
            pass
    assert "\n" not in str(err.value)
    with pytest.raises(MelayerError, match="no mixture-of-experts"):
        with ablated(tiny_lm("llama", plant=False), [ExpertAblation(0, (0,))]):
            pass


def test_explain_without_massive_activation_is_a_clear_error():
    lm = tiny_lm("llama", plant=False)
    with pytest.raises(MelayerError, match="no ME layer"):
        explain(lm, PROMPTS, random_draws=0, ppl_tokens=16, progress=False)


@pytest.mark.parametrize("mt, names", [("llama", {"gate", "up"}), ("phi3", {"gate", "up"}), ("gpt2", {"up"})])
def test_ffn_in_weights_reproduce_what_the_down_projection_reads(mt, names):
    """Separate gate/up, fused gate_up (Phi-3) and GPT-2's Conv1D c_fc: act(gate x) * (up x) (or act(up x + b))
    computed from the returned matrices equals the input of the model's own down projection."""
    from transformers.activations import ACT2FN

    from melayer.capture.hooks import Hooks

    lm = tiny_lm(mt, plant=False)
    w = ffn_in_weights(lm, 0)
    assert set(w) == names
    x = torch.randn(5, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    seen = {}
    with Hooks() as hooks, torch.no_grad():
        hooks.pre(lm.module(0, "down"), lambda mod, args: seen.__setitem__("h", args[0][0].clone()))
        lm.module(0, "mlp")(x[None])
    act = ACT2FN[getattr(lm.config, "hidden_act", None) or lm.config.activation_function]
    up = x @ w["up"].T
    if getattr(lm.module(0, "up"), "bias", None) is not None:
        up = up + lm.module(0, "up").bias.detach()
    expected = act(x @ w["gate"].T) * up if "gate" in w else act(up)
    torch.testing.assert_close(seen["h"], expected, rtol=1e-5, atol=1e-6)


def test_control_layers():
    assert control_layers(3, 18) == [("before", 2), ("after", 4), ("middle", 9)]
    assert control_layers(0, 4) == [("after", 1), ("middle", 2)]
    assert control_layers(2, 4) == [("before", 1), ("after", 3)]  # middle coincides with the ME layer


def reference_ppl(lm, max_tokens: int, window: int) -> float:
    """exp(mean NLL) of the first ``max_tokens`` tokens of the shipped text, in windows of ``window`` tokens after
    <bos>, from the model's own logits with torch's cross-entropy (no ``labels=``, no shared code)."""
    from importlib.resources import files

    text = files("melayer.data").joinpath("ppl_text.txt").read_text()
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        row = torch.tensor([[lm.tokenizer.bos_token_id, *ids[start:start + window]]])
        with torch.no_grad():
            logits = lm.model(input_ids=row).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, row[0, 1:], reduction="sum"))
        count += row.shape[1] - 1
    assert count == len(ids)
    return math.exp(nll / count)


def test_perplexity_windows_and_prefix():
    lm = tiny_lm("llama", plant=False)
    r = perplexity(lm, max_tokens=40, stride=16)  # <bos> + 16 fresh tokens per window, all scored
    assert r["prefix"] == [0] and r["tokens"] == 40 and (r["window"], r["stride"]) == (17, 16)
    assert r["ppl"] == pytest.approx(reference_ppl(lm, 40, 16), rel=1e-5)


def test_cli_explain_on_a_saved_tiny_checkpoint(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from melayer.cli import app

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    res = CliRunner().invoke(app, ["explain", "--model", str(tiny_dir), "--prompts", str(tmp_path / "p.txt"),
                                   "--output", str(tmp_path / "out"), "--random-draws", "1", "--ppl-tokens", "32"])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "out" / "explain.json").read_text())
    # tiny_dir: tiny_lm("llama"), planted at layer 1 by neuron 5 on dim 7
    assert d["me_layer"] == 1 and d["top_neurons"][0]["neuron"] == 5 and d["top_neurons"][0]["dim"] == 7
    for name in ("explain_mechanism.png", "explain_norm_gains.png", "explain_ablations.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000


@pytest.mark.slow
def test_explain_gemma_270m_readme_figures(gemma):
    """`melayer explain --ppl-tokens 1024` (16 prompts, 3 random draws) on Gemma-3-270M: the README's figures."""
    d = explain(gemma, progress=False).to_dict()
    assert d["settings"]["prompts"] == 16 and d["settings"]["perplexity"]["tokens"] == 1024
    assert d["me_layer"] == 3 and d["massive_dims"] == [163]
    assert d["massive_tokens"] == [{"position": 0, "token": "<bos>", "prompts": 16}]
    # residual in 91 + attention -17 + FFN 10,350 = 10,430; the FFN's raw output on dim 163 is only 0.63
    dec = d["decomposition"][0]
    assert dec["dim"] == 163
    assert (round(dec["residual_in"]), round(dec["attn_branch"])) == (91, -17)
    assert (round(dec["ffn_branch"], -1), round(dec["residual_out"], -1)) == (10350, 10430)
    assert round(dec["mlp_raw"], 2) == 0.63
    # the post-FFN norm's gain of 585 on dim 163 (132x its median gain, the largest of the layer)
    post = next(g for g in d["norm_gains"] if g["role"] == "post_ffn_norm")
    on_163 = next(x for x in post["dims"] if x["dim"] == 163)
    assert (on_163["gain"], round(on_163["ratio_to_median"]), on_163["rank_by_abs_gain"]) == (585.0, 132, 1)
    # one neuron (1414) gives 97.3 % of the FFN output on dim 163; super weight down_proj[163, 1414]; input dim 97
    assert d["selected_neurons"] == [1414]
    assert round(100 * d["selected_share_of_ffn_output"]["163"], 1) == 97.3
    sw = d["super_weights"][0]
    assert (sw["tensor"], sw["stored_index"]) == ("model.layers.3.mlp.down_proj.weight", [163, 1414])
    assert d["driving_dims"] == [97]
    # the ablation table: downstream max (share), ME layer after, perplexity
    runs = {r["ablate"]: r for r in d["ablations"]}
    assert (sig(runs["none"]["downstream_max"], 3), runs["none"]["me_layer_after"]) == (1.04e5, 3)
    assert round(runs["none"]["ppl"], 1) == 27.2
    table = {k: (sig(runs[k]["downstream_max"], 2), round(100 * runs[k]["downstream_ratio"]), runs[k]["outcome"])
             for k in ("norm", "ffn", "both")}
    assert table == {"norm": (2.7e4, 26, "moves to 4"), "ffn": (4.6e4, 44, "moves to 4"),
                     "both": (2.6e4, 25, "no ME layer")}
    assert runs["both"]["me_layer_after"] is None
    assert (round(runs["norm"]["ppl"]), round(runs["ffn"]["ppl"], 1), round(runs["both"]["ppl"])) == (818, 36.9, 1000)
    # controls at layers 2, 4 and 9 keep 74-100 % and the ME layer stays at 3; 1 random neuron (3 draws) keeps 100 %
    controls = d["controls"]["layers"]
    assert sorted({r["layer"] for r in controls}) == [2, 4, 9]
    assert all(r["me_layer_after"] == 3 for r in controls)
    ratios = [100 * r["downstream_ratio"] for r in controls]
    assert (round(min(ratios)), round(max(ratios))) == (74, 100)
    rnd = d["controls"]["random"]
    assert rnd["me_layer_after"] == [3, 3, 3] and rnd["neurons_per_draw"] == 1
    assert round(100 * rnd["downstream_ratio_mean"]) == 100
    assert d["model_check"]["bit_identical"]


@pytest.mark.slow
def test_explain_smollm2_readme_figures(smollm2):
    """`melayer explain --model smollm2-135m --ppl-tokens 1024`: the FFN alone makes the massive activation."""
    d = explain(smollm2, progress=False).to_dict()
    assert d["me_layer"] == 11 and d["massive_dims"] == [507]
    # the FFN writes 22,700 of the final 22,750 on dim 507 (residual in 44, attention -1)
    dec = d["decomposition"][0]
    assert (round(dec["ffn_branch"], -2), round(dec["residual_out"], -1)) == (22700, 22750)
    assert (round(dec["residual_in"]), round(dec["attn_branch"])) == (44, -1)
    # neurons 1229 (73.6 %) and 1487 (26.0 %) cover 99.6 %; super weights 5.88 and 6.07, ~46x the median |w|;
    # driven by FFN-input dims 247 and 260
    assert [(n["neuron"], round(100 * n["share"], 1)) for n in d["top_neurons"][:2]] == [(1229, 73.6), (1487, 26.0)]
    assert d["selected_neurons"] == [1229, 1487]
    assert round(100 * d["selected_share_of_ffn_output"]["507"], 1) == 99.6
    sw = {w["column"]: w for w in d["super_weights"]}
    assert [sw[c]["stored_index"] for c in (1229, 1487)] == [[507, 1229], [507, 1487]]
    assert (round(sw[1229]["value"], 2), round(sw[1487]["value"], 2)) == (5.88, 6.07)
    assert sw[1229]["ratio_to_median_abs_weight"] == pytest.approx(46, rel=0.05)
    assert sw[1487]["ratio_to_median_abs_weight"] == pytest.approx(46, rel=0.05)
    assert d["driving_dims"] == [247, 260]
    # the ablation table (baseline ppl 34.7)
    runs = {r["ablate"]: r for r in d["ablations"]}
    assert round(runs["none"]["ppl"], 1) == 34.7
    table = {k: (round(100 * runs[k]["downstream_ratio"], 1), runs[k]["me_layer_after"], round(runs[k]["ppl"], 1))
             for k in ("ffn", "both")}
    assert table == {"ffn": (1.2, None, 110.9), "both": (1.2, None, 109.1)}
    norm = runs["norm"]
    assert (round(100 * norm["downstream_ratio"]), norm["me_layer_after"], round(norm["ppl"], 1)) == (100, 11, 38.7)
    assert [(e["role"], e["dims"]) for e in runs["norm"]["norm_edits"]] == [("pre_ffn_norm", [247, 260])]
    # controls at layers 10, 12, 15 keep 74-100 %; 2 random neurons at layer 11 keep 100 %
    controls = d["controls"]["layers"]
    assert sorted({r["layer"] for r in controls}) == [10, 12, 15]
    ratios = [100 * r["downstream_ratio"] for r in controls]
    assert (round(min(ratios)), round(max(ratios))) == (74, 100)
    rnd = d["controls"]["random"]
    assert rnd["me_layer_after"] == [11, 11, 11] and rnd["neurons_per_draw"] == 2
    assert round(100 * rnd["downstream_ratio_mean"]) == 100
