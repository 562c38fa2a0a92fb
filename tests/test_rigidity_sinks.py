"""``melayer rigidity`` and ``melayer sinks`` on tiny checkpoints (and one slow real-model run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from melayer.analysis.rigidity import effective_rank, mean_pairwise_cos, rigidity
from melayer.analysis.sinks import measure_sinks
from melayer.capture import encode
from melayer.capture.hooks import Hooks
from melayer.testing import MODEL_TYPES, tiny_lm
from melayer.util.errors import MelayerError

PROMPTS = ["The cat sat on the mat.", "Hello world", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "Another prompt here!",
           "x" * 90]


def _reference_alpha(lm, prompt: str, max_tokens: int, k: int) -> np.ndarray:
    """alpha_k from transformers' own eager ``output_attentions`` on the unpadded prompt: (layers, heads)."""
    batch = encode(lm, [prompt], max_tokens=max_tokens)
    with torch.no_grad():
        out = lm.model(**batch, output_attentions=True)
    alphas = []
    for layer, a in enumerate(out.attentions):
        a = a[0].double()  # (H, T, T)
        t = a.shape[-1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        vis = i >= j
        window = getattr(lm.config, "sliding_window", None)
        types = getattr(lm.config, "layer_types", None)
        if window and types and types[layer] == "sliding_attention":
            vis &= (i - j) < window
        vis = vis.double()
        alphas.append(((a * vis).sum(1) / vis.sum(0))[:, k].numpy())
    return np.stack(alphas)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sink_scores_equal_eager_output_attentions(model_type):
    lm = tiny_lm(model_type, num_layers=3)
    impl = lm.model.config._attn_implementation
    try:  # measure from SDPA where the family supports it: the switch to eager must be temporary
        lm.model.set_attn_implementation("sdpa")
        impl = "sdpa"
    except (ValueError, ImportError):
        pass
    massive = [0, 1, 2, 3, 70]
    r = measure_sinks(lm, PROMPTS, massive_positions=massive, max_tokens=80, min_tokens=None, batch_size=2)
    assert lm.model.config._attn_implementation == impl
    lm.model.set_attn_implementation("eager")
    for i, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(r.alpha_first[i], _reference_alpha(lm, prompt, 80, 0), atol=1e-6)
        np.testing.assert_allclose(r.alpha_massive[i], _reference_alpha(lm, prompt, 80, massive[i]), atol=1e-6)
    assert r.alpha_first.shape == (len(PROMPTS), 3, lm.config.num_attention_heads if model_type != "gpt2" else 4)
    assert r.sink_rate == pytest.approx(float((r.alpha_first > 0.3).mean()))
    d = r.to_dict()
    reference = np.stack([_reference_alpha(lm, prompt, 80, 0) for prompt in PROMPTS])
    assert d["schema"] == "melayer.sinks/1"
    assert d["sink_rate"] == pytest.approx(float((reference > 0.3).mean()))
    assert d["sink_rate_per_layer"] == pytest.approx((reference > 0.3).mean(axis=(0, 2)).tolist())
    json.dumps(d)


def test_sliding_window_hides_queries_from_the_first_token():
    # tiny gemma3_text: sliding window 64 on its sliding layers; a 90-token prompt has queries that cannot see token 0
    lm = tiny_lm("gemma3_text", num_layers=2)
    r = measure_sinks(lm, [PROMPTS[-1]], max_tokens=None)
    assert lm.config.layer_types[0] == "sliding_attention"
    np.testing.assert_allclose(r.alpha_first[0], _reference_alpha(lm, PROMPTS[-1], 1000, 0), atol=1e-6)


def test_sinks_measure_the_model_as_it_runs():
    """Hooks active on the model (here: scaling the first token's attention input, as WeMask does) change the
    measured scores exactly as they change the model's own attention probabilities."""
    lm = tiny_lm("llama", num_layers=3)
    plain = measure_sinks(lm, PROMPTS[:3], min_tokens=None)

    def scale_first(module, args, kwargs):
        x = kwargs["hidden_states"].clone()
        mask = torch.ones_like(x)
        first = batch_first[0]
        mask[torch.arange(x.shape[0]), first] = 0.0
        kwargs["hidden_states"] = x * mask
        return args, kwargs

    batch_first: list[torch.Tensor] = []

    def remember(module, args, kwargs):
        m = kwargs["attention_mask"]
        batch_first[:] = [m.float().argmax(dim=1)]

    with Hooks() as hooks:
        hooks.pre(lm.body, remember, with_kwargs=True)
        for i in range(lm.num_layers):
            hooks.pre(lm.module(i, "attn"), scale_first, with_kwargs=True)
        hooked = measure_sinks(lm, PROMPTS[:3], min_tokens=None)
        lm.model.set_attn_implementation("eager")
        batch = encode(lm, PROMPTS[:1], max_tokens=64)
        with torch.no_grad():
            ref = lm.model(**batch, output_attentions=True).attentions
    assert not np.allclose(plain.alpha_first, hooked.alpha_first)
    ref_alpha = np.stack([a[0].mean(1)[:, 0].numpy() for a in ref])  # every query sees token 0
    np.testing.assert_allclose(hooked.alpha_first[0], ref_alpha, atol=1e-6)


def test_short_prompts_are_skipped_and_the_uniform_baseline_is_reported():
    from melayer.analysis.sinks import text_windows, uniform_alpha_first

    assert uniform_alpha_first(1) == 1.0 and uniform_alpha_first(9) > 0.3 > uniform_alpha_first(10)
    lm = tiny_lm("llama", num_layers=2)
    r = measure_sinks(lm, PROMPTS, massive_positions=[0, 1, 2, 3, 4])  # "Hello world" is 12 tokens < 16
    assert r.skipped == [1] and r.n_prompts == 4 and r.massive_positions == [0, 2, 3, 4]
    d = r.to_dict()
    assert d["settings"]["prompts_skipped_too_short"] == 1
    assert d["uniform_attention_alpha_first"] == pytest.approx(np.mean([uniform_alpha_first(t) for t in r.tokens_per_prompt]))
    with pytest.raises(MelayerError, match="shorter than 16 tokens"):
        measure_sinks(lm, ["Hi", "Yo"])
    windows = text_windows(lm, n=3, length=64)
    assert len(windows) == 3
    assert all(len(lm.tokenizer(w)["input_ids"]) == 64 for w in windows)  # <bos> + 63 byte tokens


def test_sinks_input_errors():
    lm = tiny_lm("llama", plant=False, num_layers=2)
    with pytest.raises(MelayerError, match="epsilon"):
        measure_sinks(lm, PROMPTS, epsilon=1.5)
    with pytest.raises(MelayerError, match="one position per prompt"):
        measure_sinks(lm, PROMPTS, massive_positions=[0])
    with pytest.raises(MelayerError, match="empty prompt"):
        measure_sinks(lm, ["ok", "  "])


def test_effective_rank_and_pairwise_cos():
    eye = torch.eye(5)
    assert effective_rank(eye) == pytest.approx(5.0)
    assert effective_rank(torch.ones(4, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cos(torch.ones(3, 4)) == pytest.approx(1.0)
    assert mean_pairwise_cos(eye) == pytest.approx(0.0)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_rigidity_on_a_planted_model(model_type):
    lm = tiny_lm(model_type, me_layer=1, num_layers=4)
    d = rigidity(lm, PROMPTS[:4], progress=False).to_dict()
    assert d["schema"] == "melayer.rigidity/1"
    assert d["me_layer"] == 1 and d["massive_dims"] == [lm.plant.dim]
    assert d["massive_token_positions"] == [0, 0, 0, 0]
    # the planted token is carried unchanged by the residual stream after the ME layer
    for r in d["consecutive"][2:]:
        assert r["massive_cos"] > 0.999
        assert r["ordinary_cos"] < r["massive_cos"]
    # BOS at position 0 in every prompt: cross-input similarity is trivially 1, and the output says so
    assert d["cross_input_trivially_identical"] is True
    assert all(r["massive_all_pairs"] == pytest.approx(1.0, abs=1e-5) for r in d["cross_input"])
    assert any("trivially 1.0" in n for n in d["notes"])
    # without BOS the first token is each prompt's own first character; the planted activation is BOS-only
    nb = d["no_bos"]
    assert nb["special_prefix_removed"] == [0]
    assert all(r["first_token_massive_share"] == 0.0 for r in nb["per_layer"])
    assert nb["per_layer"][2]["first_token_distinct_pairs"] < 0.99
    for r in d["attention_input_diversity"]:
        assert 1.0 <= r["erank_without"] <= r["tokens_mean"]
        assert 1.0 <= r["erank_drop_other"] <= r["erank_with"] + 1e-9  # same-size control: drop another token
    assert d["summary"]["after_me_layer_erank_drop_other"] is not None
    json.dumps(d)


def test_rigidity_needs_two_prompts():
    lm = tiny_lm("llama", num_layers=3)
    with pytest.raises(MelayerError, match="at least 2 prompts"):
        rigidity(lm, ["only one"], progress=False)


def test_cli_rigidity_and_sinks_on_a_saved_tiny_checkpoint(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from melayer.cli import app

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    common = ["--model", str(tiny_dir), "--prompts", str(tmp_path / "p.txt")]
    runner = CliRunner()
    res = runner.invoke(app, ["rigidity", *common, "--output", str(tmp_path / "rig")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "rig" / "rigidity.json").read_text())["me_layer"] == 1
    assert (tmp_path / "rig" / "rigidity.png").stat().st_size > 1000
    res = runner.invoke(app, ["sinks", *common, "--output", str(tmp_path / "sinks"), "--epsilon", "0.2"])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "sinks" / "sinks.json").read_text())
    assert d["me_layer"] == 1 and d["settings"]["epsilon"] == 0.2
    assert np.array(d["alpha_first"]).shape == (4, 4)  # layers x heads of the 4-layer tiny_dir model
    assert (tmp_path / "sinks" / "sinks_heatmap.png").stat().st_size > 1000


@pytest.mark.slow
def test_rigidity_gemma_270m_readme_figures(gemma):
    """`melayer rigidity` (default: the first 32 shipped prompts) on Gemma-3-270M, as the README states it."""
    r = rigidity(gemma, progress=False).to_dict()
    assert r["settings"]["prompts"] == 32
    assert r["me_layer"] == 3 and r["massive_dims"] == [163] and r["cross_input_trivially_identical"]
    s = r["summary"]
    assert round(s["after_me_layer_consecutive_cos_massive"], 3) == 0.994
    assert round(s["after_me_layer_consecutive_cos_ordinary"], 3) == 0.941
    assert round(s["cross_input_massive_all_pairs"], 3) == 1.0
    assert round(s["cross_input_no_bos_first_token"], 2) == 0.83
    assert all(row["first_token_massive_share"] == 0.0 for row in r["no_bos"]["per_layer"])  # 0 % without <bos>
    erank = (s["after_me_layer_erank_with"], s["after_me_layer_erank_without"], s["after_me_layer_erank_drop_other"])
    assert tuple(round(x, 1) for x in erank) == (13.1, 12.5, 12.4)


@pytest.mark.slow
def test_sinks_gemma_270m_readme_figures(gemma):
    """`melayer sinks` (32 WikiText windows of 64 tokens, epsilon 0.3): sink rate 81.1 % of 18 x 4 (layer, head)
    pairs, 70 % of heads at layer 0 and 99 % at layer 1 (before the ME layer); uniform attention would give 0.074."""
    from melayer.analysis.sinks import text_windows

    texts = text_windows(gemma, 32, 64)
    s = measure_sinks(gemma, texts, 0.3, max_tokens=64, min_tokens=16, me_layer=3)
    assert s.alpha_first.shape == (32, 18, 4)
    assert round(100 * s.sink_rate, 1) == 81.1
    d = s.to_dict()
    assert [round(100 * x) for x in d["sink_rate_per_layer"][:2]] == [70, 99]
    assert round(d["uniform_attention_alpha_first"], 3) == 0.074
    assert d["first_sink_layer"] == 0 and d["first_sink_layer_minus_me_layer"] == -3
    assert gemma.model.config._attn_implementation == "sdpa"  # the eager switch for measuring was temporary


@pytest.mark.slow
def test_rigidity_smollm2_readme_figures(smollm2):
    """`melayer rigidity --model smollm2-135m`: the massive first token is rigid even across different tokens."""
    r = rigidity(smollm2, progress=False).to_dict()
    assert r["me_layer"] == 11 and r["massive_dims"] == [507] and not r["cross_input_trivially_identical"]
    s = r["summary"]
    assert round(s["after_me_layer_consecutive_cos_massive"], 3) == 0.981
    assert round(s["after_me_layer_consecutive_cos_ordinary"], 3) == 0.943
    assert round(s["cross_input_massive_nontrivial_pairs"], 3) == 0.998  # between different first tokens
    assert round(s["cross_input_last_token_baseline"], 2) == 0.81
    erank = (s["after_me_layer_erank_with"], s["after_me_layer_erank_without"], s["after_me_layer_erank_drop_other"])
    assert tuple(round(x, 1) for x in erank) == (12.5, 11.7, 11.8)


@pytest.mark.slow
def test_sinks_smollm2_readme_figures(smollm2):
    """`melayer sinks --model smollm2-135m`: 71.1 %; sinks from layer 3 (60-70 % of heads), none at layers 10-11,
    86-100 % at layers 12-15 right after the ME layer (the sink follows the massive activation here)."""
    from melayer.analysis.sinks import text_windows

    s = measure_sinks(smollm2, text_windows(smollm2, 32, 64), 0.3, max_tokens=64, min_tokens=16, me_layer=11)
    assert round(100 * s.sink_rate, 1) == 71.1
    per_layer = s.to_dict()["sink_rate_per_layer"]
    assert per_layer[2] < 0.2 and all(0.6 <= x < 0.7 for x in per_layer[3:10])
    assert per_layer[10] == per_layer[11] == 0.0
    assert all(0.86 <= x <= 1.0 for x in per_layer[12:16])
    assert min(per_layer[12:]) > 0.74


@pytest.mark.parametrize("sink_logit", [-30.0, 0.0, 30.0])
def test_sinks_account_for_learned_sink_logits(sink_logit):
    """gpt-oss appends a learned logit per head to every attention row and drops it after the softmax, so rows
    sum to less than 1. The measurement reports the share it takes (against transformers' own returned
    probabilities, read independently) and never credits it to a token: a sink logit that takes nearly every row
    leaves no head sinking on the first token."""
    from melayer.analysis.sinks import SinkResult

    lm = tiny_lm("gpt_oss", plant=False)
    with torch.no_grad():
        for i in range(lm.num_layers):
            lm.module(i, "attn").sinks.fill_(sink_logit)
    r = measure_sinks(lm, PROMPTS[:3], min_tokens=None)
    d = r.to_dict()
    batch = encode(lm, PROMPTS[:3][:1])
    with torch.no_grad():
        att = lm.model(**batch, output_attentions=True).attentions  # eager: probabilities without the sink column
    own = [1.0 - float(a[0].sum(-1).mean()) for a in att]
    if sink_logit < -10:  # the learned sink takes nothing: rows sum to 1, nothing reported
        assert "learned_sink_share_per_layer" not in d and max(own) < 1e-3
        return
    shares = d["learned_sink_share_per_layer"]
    assert all(0.0 < s < 1.0 for s in shares) and "learned sink" in d["learned_sink_note"]
    one = measure_sinks(lm, PROMPTS[:1], min_tokens=None).to_dict()["learned_sink_share_per_layer"]
    assert one == pytest.approx(own, abs=1e-5)
    if sink_logit > 10:
        assert min(shares) > 0.99 and r.sink_rate == 0.0
    assert SinkResult.from_dict(json.loads(json.dumps(d))).to_dict() == json.loads(json.dumps(d))
