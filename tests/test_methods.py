"""Interventions as a registry: every method binds, changes the model only inside its block, respects left padding
and the KV cache, and joins compare's paired table (tiny real checkpoints)."""

from __future__ import annotations

import pytest
import torch

from melayer.capture import encode, position_ids
from melayer.capture.attention import edit_attention
from melayer.interventions.methods import METHODS, Calibration, act_edit, method_spec, parse_method, zerotuning_edit
from melayer.models.hf_internals import attn_implementation, hook_count
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError

SPECS = ["wemask:rate=0.1", "wemask_before:rate=0.1", "wemask_random_dims:rate=0.1", "wemask_other_token:rate=0.1",
         "wemask_me_only:rate=0.1", "act", "act:heads=all", "zerotuning", "zerotuning:gamma=0.5", "set_mean", "set_zero"]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def cal(lm):
    return Calibration(lm)  # melayer's shipped prompts


@torch.no_grad()
def _logits(lm, texts):
    b = encode(lm, texts)
    return lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    position_ids=position_ids(b["attention_mask"])).logits, b["attention_mask"]


def test_every_registered_method_is_covered():
    assert {s.split(":")[0] for s in SPECS} == set(METHODS)


@pytest.mark.parametrize("text", SPECS)
def test_method_changes_the_model_only_inside_and_respects_left_padding(lm, cal, text):
    texts = ["the quick brown fox jumps over the lazy dog", "a red car"]
    ref, _ = _logits(lm, texts)
    hooks, impl = hook_count(lm.model), attn_implementation(lm.model)
    iv = parse_method(text).bind(lm, cal)
    with iv:
        inside, mask = _logits(lm, texts)
        alone, _ = _logits(lm, texts[1:])  # the padded row, unpadded
    assert torch.equal(_logits(lm, texts)[0], ref)  # bit-identical after exit
    assert hook_count(lm.model) == hooks and attn_implementation(lm.model) == impl
    n = int(mask[1].sum())
    torch.testing.assert_close(inside[1, -n:], alone[0], rtol=1e-4, atol=1e-4)
    if text not in ("set_mean", "wemask_random_dims:rate=0.1", "act"):  # set_mean and random dims change (almost)
        # nothing; ACT's calibrated heads may be none (a random tiny model has no non-first sinks)
        assert not torch.allclose(inside, ref)
    assert iv.to_dict()["rule"] == iv.describe()


def test_set_mean_is_a_negative_control_and_set_zero_is_not(lm, cal):
    ref, _ = _logits(lm, ["the cat sat on the mat"])
    with parse_method("set_mean").bind(lm, cal):
        mean, _ = _logits(lm, ["the cat sat on the mat"])
    with parse_method("set_zero").bind(lm, cal):
        zero, _ = _logits(lm, ["the cat sat on the mat"])
    assert (mean - ref).abs().max() < 0.05 * (zero - ref).abs().max()


def test_zerotuning_equals_a_log_gamma_bias_on_the_first_key():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 5, 5)
    allowed = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    allowed[1, :, :2] = False  # row 1 is left padded by two
    allowed[1, :2, :] = False
    allowed[1, 0, 0] = allowed[1, 1, 1] = True  # padding queries see themselves only (never scored)
    s = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(s, -1)
    out = zerotuning_edit(0.3)([0, 2])(probs, allowed)
    first = torch.tensor([0, 2])
    biased = s.clone()
    for b in range(2):
        biased[b, :, :, first[b]] += torch.log(torch.tensor(0.3))
    want = torch.softmax(biased, -1)
    torch.testing.assert_close(out[:, [0, 2], 2:], want[:, [0, 2], 2:])
    torch.testing.assert_close(out[:, 1], probs[:, 1])  # head 1 untouched


def test_act_scales_the_non_first_sinks_and_keeps_rows_normalised():
    probs = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.4, 0.4, 0.2, 0], [0.4, 0.4, 0.1, 0.1]])[None, None]
    allowed = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    out = act_edit(0.1, 0.4)([0])(probs, allowed)[0, 0]
    # column means over the queries that see each key: 0.575, 0.433, 0.15, 0.1 -> keys 0, 1, 2 are sinks (> 0.1);
    # key 0 is the first and stays; keys 1 and 2 are scaled by 0.4
    assert torch.allclose(out.sum(-1), torch.ones(4))
    torch.testing.assert_close(out[3, [1, 2]], torch.tensor([0.4, 0.1]) * 0.4)
    # row 3 loses 0.6 x 0.5 = 0.3, given to keys 0 and 3 in proportion 0.4 : 0.1
    torch.testing.assert_close(out[3, [0, 3]], torch.tensor([0.4 + 0.24, 0.1 + 0.06]))
    torch.testing.assert_close(out[0], probs[0, 0, 0])  # a row that only sees the first sink is unchanged


@pytest.mark.parametrize("text", ["zerotuning:gamma=0.5", "set_zero", "wemask_other_token:rate=0.1"])
def test_cached_generation_equals_recomputation(lm, cal, text):
    from melayer.interventions.generate import greedy

    batch = encode(lm, ["the cat sat on", "a dog ran far away from home"])
    with parse_method(text).bind(lm, cal):
        cached = greedy(lm, batch, 6)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            for _ in range(6):  # no cache: the whole sequence again at every step
                logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                  use_cache=False).logits
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(cached[:, : ids.shape[1]], ids)


def test_sinks_are_measured_under_an_attention_edit(lm):
    from melayer.analysis.sinks import measure_sinks

    prompts = ["the cat sat on the mat and looked at the dog for a while"] * 2
    before = measure_sinks(lm, prompts, min_tokens=4).sink_rate
    heads = {layer: list(range(lm.config.num_attention_heads)) for layer in range(lm.num_layers)}
    with edit_attention(lm, {layer: zerotuning_edit(1e4)(h) for layer, h in heads.items()}):
        after = measure_sinks(lm, prompts, min_tokens=4).sink_rate  # the first token takes (almost) all attention
    assert after > 0.9 and after > before


def test_specs_are_validated_without_a_model():
    assert parse_method("wemask:rate=0.01,select=weight").label == "wemask:rate=0.01,select=weight"
    assert method_spec("act").params == {"tau": 0.1, "beta": 0.4, "min_frac": 0.5, "heads": "calibrated"}
    for bad, msg in [("nope", "unknown method"), ("act:tau=0", "out of range"), ("act:tau=x", "must be a float"),
                     ("wemask:rate=0.01,select=random", "out of range"), ("wemask:foo=1", "no parameter")]:
        with pytest.raises(MelayerError, match=msg):
            parse_method(bad)


def test_compare_table_with_methods(lm, tmp_path):
    from melayer.eval.compare import compare
    from melayer.reporting.compare import forest_plot

    res = compare(lm, "arc_easy", [0, 0.1], limit=10, batch_size=5, output=tmp_path,
                  methods=["act", "set_zero", "wemask_before:rate=0.1"], progress=False)
    d = res.to_dict()
    assert [r["method"] for r in d["per_method"]] == ["act", "set_zero", "wemask_before:rate=0.1"]
    tests = [m["mcnemar"] for r in d["per_rate"][1:] + d["per_method"] for m in r["metrics"].values()]
    assert len(tests) == 4 * 3 and all(t["p_bh"] >= t["p"] for t in tests)
    assert d["calibration"]["source"].startswith("the last 16 arc_easy items")
    assert not set(d["calibration"]["ids"]) & {r["id"] for r in res.runs[0.0].records}
    zero = next(r for r in d["per_method"] if r["method"] == "set_zero")
    assert zero["massive_downstream"] < 0.01 and d["massive_downstream"]["unmodified"] > 100
    assert (tmp_path / "method_act" / "eval.json").exists() and forest_plot(d, tmp_path / "f.png").exists()


def test_compare_with_methods_only_records_the_me_layer_they_used(lm, tmp_path):
    from melayer.eval.compare import compare

    d = compare(lm, "arc_easy", [0], limit=4, batch_size=4, methods=["set_zero"], progress=False).to_dict()
    used = d["per_method"][0]["intervention"]["me_layer"]
    assert d["me_layer"] == used == 1 and d["me_layer_source"] == "scan (the methods' calibration)"
    assert d["layers"] is None  # no WeMask rate: no masked layers to state
