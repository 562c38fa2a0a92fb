"""melayer.scan on tiny planted checkpoints: per-prompt ME layers and the consensus, precursors, short prompts,
left padding, the scan.json contract, the criterion, float16 overflow and the bounded per-prompt state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import melayer
from melayer.analysis.criterion import Criterion
from melayer.analysis.scan import MAX_MASSIVE, N_CANDIDATES, TOP_K, PromptScan, locate_me_layer
from melayer.capture import encode, position_ids
from melayer.models.archmap import resolve
from melayer.testing import MODEL_TYPES, plant_massive, tiny_lm
from melayer.util.errors import MelayerError, NumericOverflow
from melayer.util.io import write_json

LONG = [
    "The capital of France is Paris, a city on the Seine.",
    "Hello world, this is a test of the scanner.",
    "1 2 3 4 5 6 7 8 9 10",
    "Massive activations sit on the first token.",
]


@torch.no_grad()
def plant_on_token(lm, token: str, layer: int, neuron: int, dim: int, carrier: int, strength: float = 2000.0):
    """A second massive activation, triggered by one token instead of <bos> (Llama-style families).

    Only ``token``'s embedding carries ``carrier``; no block writes it; FFN ``neuron`` of ``layer`` reads it
    and its down column writes ``dim``.
    """
    tok_id = lm.tokenizer.convert_tokens_to_ids(token)
    embed = resolve(lm.model, lm.arch.embed)
    embed.weight[:, carrier] = 0.0
    embed.weight[tok_id, carrier] = 1.0
    for block in lm.layers:
        for sub in block.modules():
            if isinstance(sub, torch.nn.Linear) and sub.out_features == lm.hidden_size:
                sub.weight[carrier] = 0.0
    for role in ("gate", "up"):
        w = lm.module(layer, role).weight
        w[neuron] = 0.0
        w[neuron, carrier] = 2.0
    down = lm.module(layer, "down").weight
    down[dim] = 0.0
    down[:, neuron] = 0.0
    down[dim, neuron] = strength / math.sqrt(lm.hidden_size)


@pytest.fixture(scope="module")
def two_plants():
    """BOS-triggered massive activation at layer 2 (dim 7), and a 'Z'-triggered one at layer 0 (dim 20)."""
    lm = tiny_lm("llama", me_layer=2, num_layers=5)
    plant_on_token(lm, "Z", layer=0, neuron=9, dim=20, carrier=50)
    return lm


def test_per_prompt_me_layer_consensus_and_consistency(two_plants):
    prompts = LONG[:3] + ["Zebras graze in the Zambezi valley."]
    r = melayer.scan(two_plants, prompts, progress=False)
    assert [p.me_layer for p in r.prompts] == [2, 2, 2, 0]
    assert all(p.eligible for p in r.prompts)
    assert r.me_layer == 2
    assert r.me_layer_consistency == pytest.approx(0.75)
    assert r.massive_dims == [7, 20]
    assert r.dim_support() == {7: 1.0, 20: 0.25}
    # the Z prompt has its own massive tokens: Z at layer 0 persists, plus BOS from layer 2 on
    z = r.prompts[3]
    assert {(pos, d) for pos, d in z.persistent} >= {(0, 7), (1, 20)}
    d = r.to_dict()
    assert [p["me_layer"] for p in d["prompts"]] == [2, 2, 2, 0]
    assert d["me_layer_consistency"] == pytest.approx(0.75)


def test_short_prompts_do_not_vote_and_do_not_break_the_consensus(two_plants):
    crit = Criterion()
    shorts = ["Z", "ZZ", "Zq"]  # 2-3 tokens with <bos> (< min_tokens = 4); each would say "layer 0"
    r = melayer.scan(two_plants, LONG[:2] + shorts, progress=False)
    assert [p.n_tokens < crit.min_tokens for p in r.prompts] == [False, False, True, True, True]
    assert [p.eligible for p in r.prompts] == [True, True, False, False, False]
    assert [p.me_layer for p in r.prompts][2:] == [0, 0, 0]
    assert r.me_layer == 2 and r.me_layer_consistency == 1.0
    assert [p["votes"] for p in r.to_dict()["prompts"]] == [True, True, False, False, False]
    # raising min_tokens changes who votes
    r2 = melayer.scan(two_plants, LONG[:2] + shorts, criterion=Criterion(min_tokens=2), progress=False)
    assert r2.me_layer == 0 and r2.me_layer_consistency == pytest.approx(0.6)


def test_only_short_prompts_still_give_a_result():
    lm = tiny_lm("llama", me_layer=1)
    r = melayer.scan(lm, ["Hi", "a"], progress=False)
    assert not any(p.eligible for p in r.prompts)
    assert r.me_layer == 1 and r.massive_dims == [7]
    single = melayer.scan(lm, "Hi", progress=False)  # a bare string is one prompt
    assert len(single.prompts) == 1 and single.prompts[0].tokens == ["<bos>", "H", "i"]


def test_precursor_spike_is_reported_as_precursor_not_as_me_layer():
    lm = tiny_lm("llama", me_layer=2, precursor=(0, 11), num_layers=5)
    r = melayer.scan(lm, LONG, progress=False)
    assert r.me_layer == 2 and r.me_layer_consistency == 1.0
    assert r.massive_dims == [7]
    pre = {(x["layer"], x["dim"], x["position"]) for x in r.precursors}
    assert pre == {(0, 11, 0)}
    assert all(x["token"] == "<bos>" for x in r.precursors)
    assert 11 not in {x["dim"] for x in r.massive}
    assert r.to_dict()["precursors"] == r.precursors


def test_position_ids_are_left_padding_aware():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_left_padding_gives_the_same_per_prompt_results_as_batch_size_1(model_type):
    lm = tiny_lm(model_type, me_layer=1)
    prompts = ["Hi there", "The capital of France is Paris, a city on the Seine river.", "1 2 3", "Another one."]
    batch = encode(lm, prompts)
    assert (batch["attention_mask"] == 0).any(), "the batch must really be left padded"
    assert (batch["attention_mask"][:, -1] == 1).all()
    together = melayer.scan(lm, prompts, batch_size=len(prompts), progress=False)
    alone = melayer.scan(lm, prompts, batch_size=1, progress=False)
    assert together.me_layer == alone.me_layer == 1
    for a, b in zip(together.prompts, alone.prompts):
        assert a.tokens == b.tokens and a.me_layer == b.me_layer and a.eligible == b.eligible
        assert a.persistent == b.persistent
        np.testing.assert_allclose(a.medians, b.medians, rtol=1e-4, atol=1e-6)
        for la, lb in zip(a.massive, b.massive):
            assert [(p, d) for _, p, d in la] == [(p, d) for _, p, d in lb]
            np.testing.assert_allclose([v for v, _, _ in la], [v for v, _, _ in lb], rtol=1e-4)
        for la, lb in zip(a.top, b.top):
            np.testing.assert_allclose(sorted(abs(v) for v, _, _ in la), sorted(abs(v) for v, _, _ in lb),
                                       rtol=1e-3, atol=1e-5)
            assert la[0][1:] == lb[0][1:]  # same strongest (position, dim)
    d1, d2 = together.to_dict(), alone.to_dict()
    assert d1["massive_tokens"] == d2["massive_tokens"] and d1["massive_dims"] == d2["massive_dims"]


# ------------------------------------------------------------------------------------------------
# scan.json


def _json_normal(obj):
    """What JSON makes of a value: tuples become lists, NaN/inf null, keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_normal(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_normal(v) for v in obj]
    return obj


def test_scan_json_keys_and_to_dict_equals_the_written_file(tmp_path):
    lm = tiny_lm("gemma3_text", me_layer=2, num_layers=5)
    r = melayer.scan(lm, LONG + ["Hi"], progress=False)
    d = r.to_dict()
    required = {"model", "num_layers", "hidden_size", "threshold", "me_layer", "me_layer_consistency",
                "massive_dims", "massive", "precursors", "per_layer"}
    assert required <= set(d)
    assert d["schema"] == "melayer.scan/1" and d["model"] == "tiny-gemma3_text" and d["arch"] == "gemma2"
    assert (d["num_layers"], d["hidden_size"], d["me_layer"], d["massive_dims"]) == (5, 64, 2, [7])
    assert d["threshold"] == Criterion().to_dict() and "rule" in d["threshold"]
    assert len(d["per_layer"]) == 5 and [row["layer"] for row in d["per_layer"]] == list(range(5))
    assert d["per_layer"][2]["massive_share"] == 1.0 and d["per_layer"][1]["massive_share"] == 0.0
    assert d["massive_token_profile"]["token"] == "<bos>"
    assert np.array(d["massive_token_profile"]["abs"]).shape == (5, 64)
    write_json(tmp_path / "scan.json", d)
    on_disk = json.loads((tmp_path / "scan.json").read_text())
    assert on_disk == _json_normal(d)
    assert not [p for p in tmp_path.iterdir() if p.name != "scan.json"], "no temp file left behind"


# ------------------------------------------------------------------------------------------------
# the criterion


def test_criterion_thresholds_change_the_outcome():
    lm = tiny_lm("llama", me_layer=1)
    base = melayer.scan(lm, LONG, progress=False)
    peak = abs(base.peak()["value"])
    assert base.me_layer == 1
    # an absolute floor above the planted value: nothing is massive
    high = melayer.scan(lm, LONG, criterion=Criterion(abs_min=peak * 2), progress=False)
    assert high.me_layer is None and high.massive == [] and high.massive_dims == [] and high.peak() is None
    assert high.to_dict()["threshold"]["abs_min"] == peak * 2
    # a median ratio no value reaches: nothing is massive either
    assert melayer.scan(lm, LONG, criterion=Criterion(median_ratio=1e9), progress=False).me_layer is None
    # a persistence bar nothing clears: the massive values are reported, but as precursors, not an ME layer
    nopersist = melayer.scan(lm, LONG, criterion=Criterion(persist_ratio=1e9), progress=False)
    assert nopersist.me_layer is None and nopersist.massive == []
    assert {x["dim"] for x in nopersist.precursors} == {7}
    # a lower floor picks up more (non-persistent) entries without moving the ME layer
    low = melayer.scan(lm, LONG, criterion=Criterion(abs_min=0.5, median_ratio=10), progress=False)
    n_base = sum(len(m) for p in base.prompts for m in p.massive)
    assert low.me_layer == 1 and sum(len(m) for p in low.prompts for m in p.massive) > n_base


def test_criterion_persistence_fraction():
    """A massive value cancelled a layer later never persists, whatever fraction is asked for; the planted
    one persists to the end and counts even with persist_frac = 1."""
    lm = tiny_lm("llama", me_layer=2, precursor=(0, 11), num_layers=5)
    strict = melayer.scan(lm, LONG, criterion=Criterion(persist_frac=1.0), progress=False)
    assert strict.me_layer == 2 and {x["dim"] for x in strict.precursors} == {11}


def test_criterion_describes_itself():
    c = Criterion(abs_min=50, median_ratio=500, persist_ratio=20, persist_frac=0.5, min_tokens=3)
    text = c.describe()
    assert text == ("|a| > 50 and |a| > 500 x median|a| of the layer output; ME layer = first layer with a massive "
                    "(token, dim) that stays > 50 and > 20 x median in the next layer and in >= 50% of later layers; "
                    "prompts < 3 tokens do not vote")
    d = c.to_dict()
    assert d["abs_min"] == 50 and d["min_tokens"] == 3 and d["rule"] == text
    assert c.cutoff(0.01) == 50 and c.cutoff(1.0) == 500
    assert c.persists(-60, 1.0) and not c.persists(60, 10.0)


# ------------------------------------------------------------------------------------------------
# the ME-layer rule on made-up per-layer tables (what locate_me_layer sees from the scan's reduction)


def _tables(n_layers: int, born: int, values: dict[int, float], pos: int = 0, dim: int = 7, median: float = 1.0):
    """One (pos, dim) massive at layer ``born``; ``values[j]`` is its value at later layer j (absent: 0)."""
    massive = [[] for _ in range(n_layers)]
    massive[born] = [(5000.0, pos, dim)]
    watched = [{} for _ in range(n_layers)]
    for j in range(born + 1, n_layers):
        watched[j] = {(pos, dim): values.get(j, 0.0)}
    return massive, watched, [median] * n_layers


def test_me_layer_needs_the_value_in_the_very_next_layer():
    """Gone one layer later and back afterwards (4 of 5 later layers = 80 % >= 75 %): not persistent, because
    the rule asks for the next layer *and* the fraction."""
    crit = Criterion()
    gap = _tables(6, 0, {1: 0.0, 2: 5000.0, 3: 5000.0, 4: 5000.0, 5: 5000.0})
    assert locate_me_layer(*gap, crit) == (None, set())
    # the same table without the gap persists
    full = _tables(6, 0, {j: 5000.0 for j in range(1, 6)})
    assert locate_me_layer(*full, crit) == (0, {(0, 7)})
    # a value below abs_min or below persist_ratio x median in the next layer is a gap too
    assert locate_me_layer(*_tables(6, 0, {1: 99.0, **{j: 5000.0 for j in range(2, 6)}}), crit) == (None, set())
    assert locate_me_layer(*_tables(6, 0, {1: 150.0, **{j: 5000.0 for j in range(2, 6)}}, median=2.0),
                           crit) == (None, set())  # 150 > 100 but not > 100 x 2
    # the sign does not matter
    neg = _tables(6, 0, {j: -5000.0 for j in range(1, 6)})
    assert locate_me_layer(*neg, crit) == (0, {(0, 7)})


def test_me_layer_persistence_fraction_is_inclusive():
    """4 later layers, the last one missing: exactly 3/4 = persist_frac 0.75 persists; 2/4 does not."""
    crit = Criterion()
    exactly = _tables(5, 0, {1: 5000.0, 2: 5000.0, 3: 5000.0})
    assert locate_me_layer(*exactly, crit) == (0, {(0, 7)})
    below = _tables(5, 0, {1: 5000.0, 2: 5000.0})
    assert locate_me_layer(*below, crit) == (None, set())
    assert locate_me_layer(*exactly, Criterion(persist_frac=0.8)) == (None, set())
    assert locate_me_layer(*below, Criterion(persist_frac=0.5)) == (0, {(0, 7)})


def test_me_layer_is_the_first_persistent_layer_and_collects_later_persistent_entries():
    crit = Criterion()
    n = 6
    massive = [[] for _ in range(n)]
    watched = [{} for _ in range(n)]
    massive[0] = [(800.0, 0, 3)]  # a precursor: gone at layer 1
    massive[2] = [(4000.0, 0, 7), (-3000.0, 2, 9)]  # both persist
    massive[3] = [(4100.0, 0, 7), (500.0, 1, 1)]  # (0, 7) seen again; (1, 1) is transient
    for j in range(1, n):
        watched[j][(0, 3)] = 0.0
    for j in range(3, n):
        watched[j].update({(0, 7): 4000.0, (2, 9): -3000.0})
    for j in range(4, n):
        watched[j][(1, 1)] = 1.0
    assert locate_me_layer(massive, watched, [1.0] * n, crit) == (2, {(0, 7), (2, 9)})
    # nothing is decided by the last layer alone (no later layer to persist into)
    last = [[] for _ in range(n)]
    last[n - 1] = [(9000.0, 0, 7)]
    assert locate_me_layer(last, [{} for _ in range(n)], [1.0] * n, crit) == (None, set())


def test_consensus_tie_prefers_a_real_layer_over_none():
    """Two prompts with a 'Z' (massive from layer 0) and two without (no ME layer): the vote is tied 2:2 and
    the consensus is layer 0, whichever comes first; consistency is the share that agrees with it."""
    lm = tiny_lm("llama", plant=False, num_layers=4)
    plant_on_token(lm, "Z", layer=0, neuron=9, dim=20, carrier=50)
    plain = ["The capital of France is Paris.", "Hello world, this is a test."]
    with_z = ["Zebras graze in the Zambezi.", "Zero is a number, Z a letter."]
    for prompts in (plain + with_z, with_z + plain):
        r = melayer.scan(lm, prompts, progress=False)
        assert sorted([p.me_layer for p in r.prompts], key=str) == [0, 0, None, None]
        assert r.me_layer == 0 and r.me_layer_consistency == 0.5
        assert r.massive_dims == [20]
    # a majority for "none" still wins
    r = melayer.scan(lm, plain + with_z[:1], progress=False)
    assert r.me_layer is None and r.me_layer_consistency == pytest.approx(2 / 3)


@pytest.mark.parametrize("bad", [dict(persist_frac=0), dict(persist_frac=1.5), dict(median_ratio=0),
                                 dict(abs_min=-1), dict(persist_ratio=-1), dict(min_tokens=0),
                                 dict(abs_min=float("nan"))])
def test_invalid_criterion_is_a_one_line_user_error(bad):
    with pytest.raises(MelayerError, match="invalid massive-activation criterion: " + next(iter(bad))):
        Criterion(**bad)


def test_empty_prompts_are_rejected():
    lm = tiny_lm("llama")
    for bad in ([], [""], ["ok text", "   "]):
        with pytest.raises(MelayerError, match="empty prompt"):
            melayer.scan(lm, bad, progress=False)
    with pytest.raises(MelayerError, match="batch size"):
        melayer.scan(lm, LONG, batch_size=0, progress=False)


# ------------------------------------------------------------------------------------------------
# float16


def test_float16_scan_works_when_values_fit():
    lm = tiny_lm("llama", me_layer=1)
    lm.model.half()
    r = melayer.scan(lm, LONG, progress=False)
    assert r.dtype == "float16" and r.me_layer == 1 and r.massive_dims == [7]


def test_float16_overflow_is_detected():
    lm = tiny_lm("llama", plant=False)
    plant_massive(lm, me_layer=1, neuron=5, dim=7, strength=1e6)
    fp32 = melayer.scan(lm, LONG[:2], progress=False)
    assert abs(fp32.peak()["value"]) > 65504  # beyond float16's largest finite value
    lm.model.half()
    with pytest.raises(NumericOverflow) as err:
        melayer.scan(lm, LONG[:2], progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert "layer 1" in msg and "float16" in msg and "--dtype float32" in msg
    assert isinstance(err.value, MelayerError)


# ------------------------------------------------------------------------------------------------
# memory: the per-prompt state is a fixed-size reduction


def _numbers(obj, sizes):
    """Count the scalars held by ``obj`` (recursively); record every array/tensor size."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        n = int(obj.numel() if isinstance(obj, torch.Tensor) else obj.size)
        sizes.append(n)
        return n
    if isinstance(obj, (int, float, bool)) or obj is None:
        return 1
    if isinstance(obj, str):
        return 0
    if isinstance(obj, dict):
        return sum(_numbers(k, sizes) + _numbers(v, sizes) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_numbers(v, sizes) for v in obj)
    raise TypeError(f"unexpected {type(obj).__name__} in PromptScan")


def _state(p: PromptScan) -> tuple[int, list[int]]:
    sizes: list[int] = []
    total = sum(_numbers(getattr(p, f), sizes) for f in ("medians", "top", "massive", "rows", "watched",
                                                          "persistent", "me_layer", "eligible"))
    return total, sizes


def test_per_prompt_state_does_not_grow_with_tokens():
    lm = tiny_lm("llama", me_layer=1, num_layers=6)
    short, long = "Hello there, world.", " ".join(["Long prompts cost no extra memory."] * 6)
    r = melayer.scan(lm, [short, long], progress=False)
    (n_short, _), (n_long, sizes_long) = _state(r.prompts[0]), _state(r.prompts[1])
    tokens, hidden, layers = r.prompts[1].n_tokens, lm.hidden_size, lm.num_layers
    assert tokens > 200
    assert r.prompts[1].rows == []  # candidate rows are dropped once the profile is built
    assert max(sizes_long, default=0) < tokens * hidden  # no tokens x hidden tensor for any layer
    assert n_long == n_short  # a fixed-size reduction, independent of the prompt length
    per_layer_bound = 1 + 3 * TOP_K + 3 * MAX_MASSIVE + 3 * MAX_MASSIVE  # median, top, massive, watched
    assert n_long <= layers * per_layer_bound + 2 * MAX_MASSIVE + 2
    assert n_long < tokens * hidden  # far below even one layer's activations
    # the profile kept for the plot: one |a| row per layer for the massive token only
    prof = r.profile
    assert np.array(prof["abs"]).shape == (layers, hidden)
    assert N_CANDIDATES < tokens


def test_scan_json_does_not_depend_on_the_hash_seed(tiny_dir, run_cli, tmp_path):
    """scan.json is identical under two PYTHONHASHSEEDs. A loose criterion makes many (position, token) pairs
    massive, so massive_tokens has ties whose order used to follow a set of token strings."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["The cat sat on the mat.", "What is the capital of France?", "A b c d e f g.",
                                  "Numbers: 1 2 3 4 5 6.", "The quick brown fox jumps.", "Why is the sky blue?"]))
    outs = []
    for seed in ("0", "12345"):
        out = tmp_path / f"scan-{seed}"
        r = run_cli("scan", "--model", tiny_dir, "--prompts", prompts, "--output", out, "--no-plots",
                    "--abs-min", "0", "--median-ratio", "2", "--persist-ratio", "1", "--persist-frac", "0.5",
                    env={"PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        outs.append((out / "scan.json").read_text())
    d = json.loads(outs[0])
    counts = [t["prompts"] for t in d["massive_tokens"]]
    assert len(counts) > len(set(counts)), "the criterion should leave tied entries to order"
    assert counts == sorted(counts, reverse=True)
    assert outs[0] == outs[1]
