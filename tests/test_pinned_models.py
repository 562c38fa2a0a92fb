"""Published numbers on tiny planted checkpoints, each pinned against an independent computation: plain PyTorch
hooks on the transformers modules (named here, not through melayer's architecture map), run one unpadded prompt
at a time, and hand-made edits of a copy of the model. Covers explain's decomposition, neuron ranking, massive
token and downstream window; the ablation's restore after overlapping edits; rigidity on a left-padded batch;
the scan's streaming median; WeMask's k, its masked dims and its cached decode steps on every tiny family."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch

from melayer.capture import encode
from melayer.capture.batching import plan_batches
from melayer.capture.encoding import tokenize
from melayer.capture.hooks import Hooks
from melayer.interventions.ablate import NeuronAblation, NormEdit, ablated, median_gain_edit
from melayer.testing import BOS, MODEL_TYPES, tiny_lm

# one prompt has a second <bos> in the middle: two candidate massive tokens, the larger |a| is the massive token
# batched longest first as [[1, 0], [2, 3]]: fed out of input order, and the first prompt is left-padded
PROMPTS = ["Hi<bos> there, a second start", "The cat sat on the mat today.", "Numbers: 1 2 3 4 5", "Another prompt!"]
# per family, the modules whose outputs are the attention and FFN branches added to the residual stream
BRANCHES = {"llama": ("self_attn", "mlp"), "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm")}


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def _hand_run(lm, prompt: str, record: int, neuron_zeros: dict[int, list[int]] | None = None) -> dict:
    """One unpadded prompt through the transformers model with plain hooks: per layer the output (T, D); at layer
    ``record`` its input, output, both branches and the down projection's input. ``neuron_zeros``: layer ->
    neurons whose activation is zeroed at the down projection's input (a hand-made FFN ablation)."""
    layers = lm.model.model.layers
    attn_name, ffn_name = BRANCHES[lm.model.config.model_type]
    seen: dict = {"out": {}}
    handles = []

    def keep_out(layer):
        return lambda m, a, o: seen["out"].__setitem__(layer, _first(o)[0].clone())

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(keep_out(i)))
    rec = layers[record]
    handles += [
        rec.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("resid_in", _hidden(a, kw)[0].clone()),
                                      with_kwargs=True),
        getattr(rec, attn_name).register_forward_hook(lambda m, a, o: seen.__setitem__("attn", _first(o)[0].clone())),
        getattr(rec, ffn_name).register_forward_hook(lambda m, a, o: seen.__setitem__("ffn", _first(o)[0].clone())),
    ]
    for layer, neurons in (neuron_zeros or {}).items():
        def zero(m, a, neurons=neurons):
            x = a[0].clone()
            x[..., neurons] = 0
            return (x,)
        handles.append(layers[layer].mlp.down_proj.register_forward_pre_hook(zero))
    handles.append(rec.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("act", a[0][0].clone())))
    try:
        lm.model(input_ids=torch.tensor([tokenize(lm, prompt)]))
    finally:
        for h in handles:
            h.remove()
    return seen


def _profile(runs: list[dict], positions: list[int], dims: list[int], n_layers: int) -> np.ndarray:
    """(layers, prompts): the largest |a| on ``dims`` of each prompt's massive token."""
    return np.array([[float(r["out"][l][p, dims].abs().max()) for r, p in zip(runs, positions)]
                     for l in range(n_layers)])


@functools.cache
def _explained(model_type: str):
    from melayer.interventions.explain import explain

    lm = tiny_lm(model_type, me_layer=1, neuron=5, dim=7, num_layers=6)
    if model_type == "llama":  # other neurons write the massive dim too, both signs: ranking by |c| would differ
        w = lm.model.model.layers[1].mlp.down_proj.weight.data
        noise = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1)) * 0.5
        noise[lm.plant.neuron] = 0.0
        w[lm.plant.dim] += noise
    return lm, explain(lm, PROMPTS, random_draws=2, ppl_tokens=16, progress=False).to_dict()


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_explain_decomposition_and_neuron_ranking_equal_hand_computed_contributions(model_type):
    lm, d = _explained(model_type)
    L, dims = d["me_layer"], d["massive_dims"]
    assert (L, dims) == (1, [7])
    runs = [_hand_run(lm, p, L) for p in PROMPTS]
    # the massive token: per prompt the position with the largest |a| on the massive dims at the ME layer's output
    want_pos = [int(r["out"][L][:, dims].abs().amax(-1).argmax()) for r in runs]
    assert d["settings"]["massive_token_positions"] == want_pos
    assert want_pos[0] in (0, 3)  # one of the two <bos> of "Hi<bos> there", whichever is larger in this family
    for i, dim in enumerate(dims):
        row = d["decomposition"][i]
        mean = {site: np.mean([float(r[site][p, dim]) for r, p in zip(runs, want_pos)])
                for site in ("resid_in", "attn", "ffn")}
        for key, site in (("residual_in", "resid_in"), ("attn_branch", "attn"), ("ffn_branch", "ffn")):
            assert row[key] == pytest.approx(mean[site], rel=1e-4, abs=1e-4), key
        out = np.mean([float(r["out"][L][p, dim]) for r, p in zip(runs, want_pos)])
        assert row["residual_out"] == pytest.approx(out, rel=1e-4)
        assert row["update"] == pytest.approx(out - mean["resid_in"], rel=1e-4)
        # neuron contributions: mean over prompts of activation x W_down[dim, neuron], ranked by signed share
        w = lm.model.model.layers[L].mlp.down_proj.weight[dim].detach().double()
        contrib = torch.stack([r["act"][p].double() * w for r, p in zip(runs, want_pos)]).mean(0)
        total = float(contrib.sum())
        order = (contrib * math.copysign(1, total)).argsort(descending=True)[:10].tolist()
        top = [t for t in d["top_neurons"] if t["dim"] == dim]
        assert [t["neuron"] for t in top] == order
        assert [t["contribution"] for t in top] == pytest.approx(contrib[order].tolist(), rel=1e-4, abs=1e-6)
        assert [t["share"] for t in top] == pytest.approx((contrib[order] / total).tolist(), rel=1e-4, abs=1e-8)
        assert order[0] == lm.plant.neuron and d["selected_neurons"] == [lm.plant.neuron]


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_explain_downstream_window_equals_hand_ablations(model_type):
    """downstream_max = mean over prompts of the largest |a| over the ME layer and every LATER layer; the FFN
    ablations (at the ME layer, the control layers, the random draws) redone by hand with a plain pre-hook."""
    lm, d = _explained(model_type)
    L, dims, pos = d["me_layer"], d["massive_dims"], d["settings"]["massive_token_positions"]
    n = lm.num_layers
    base = _profile([_hand_run(lm, p, L) for p in PROMPTS], pos, dims, n)
    ffn_runs = [r for r in d["ablations"] + d["controls"]["layers"] + d["controls"]["random"]["runs"]
                if r["ablate"] in ("none", "ffn", "random")]
    assert len(ffn_runs) == 2 + 3 + 2
    for r in ffn_runs:
        zeros = {r["layer"]: r["neurons"]} if r["neurons"] else None
        prof = _profile([_hand_run(lm, p, L, zeros) for p in PROMPTS], pos, dims, n)
        assert r["downstream_profile"] == pytest.approx(prof.mean(axis=1).tolist(), rel=1e-4, abs=1e-4)
        assert r["downstream_max"] == pytest.approx(float(prof[L:].max(axis=0).mean()), rel=1e-4, abs=1e-4)
        ratios = [a / b for a, b in zip(prof.mean(axis=1)[L:], base.mean(axis=1)[L:])]
        assert r["downstream_mean_ratio"] == pytest.approx(float(np.mean(ratios)), rel=1e-4)
    # the control layers ablate their own strongest neurons: ranked here by hand, signed share of the FFN output
    for r in d["controls"]["layers"]:
        if r["ablate"] != "ffn":
            continue
        acts = [_hand_run(lm, prompt, r["layer"])["act"][p].double() for prompt, p in zip(PROMPTS, pos)]
        w = lm.model.model.layers[r["layer"]].mlp.down_proj.weight[dims].detach().double()  # (dims, neurons)
        contrib = torch.stack(acts).mean(0)[None, :] * w
        share = contrib * contrib.sum(1, keepdim=True).sign() / contrib.sum(1, keepdim=True).abs()
        assert r["neurons"] == share.max(0).values.argsort(descending=True)[: len(d["selected_neurons"])].tolist()
    me_ffn = next(r for r in d["ablations"] if r["ablate"] == "ffn")
    assert me_ffn["downstream_max"] < 0.01 * d["ablations"][0]["downstream_max"]


# ------------------------------------------------------------------------------------------------
# the ablation's restore


def test_overlapping_ablations_act_like_hand_edits_and_restore_bit_for_bit():
    """Seven edits, overlapping on dims and neurons, on two layers: inside the block the model computes what a
    hand-edited deep copy computes (edits applied in order, the last one on a dim wins); afterwards every tensor
    is bit-identical to a copy taken before, and so are the logits."""
    lm = tiny_lm("gemma3_text", me_layer=1, num_layers=4)
    state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    batch = encode(lm, PROMPTS)
    with torch.no_grad():
        before = lm.model(**batch).logits
    edits = [NormEdit(1, "post_ffn_norm", (3, 7), gain=0.5), NormEdit(1, "post_ffn_norm", (7, 9), gain=2.0),
             median_gain_edit(lm, 1, "post_ffn_norm", [7, 9, 11]), NormEdit(1, "pre_ffn_norm", (7, 8), gain=0.25),
             NormEdit(1, "pre_ffn_norm", (8,), gain=4.0), NeuronAblation(1, (5, 6)), NeuronAblation(1, (6, 9)),
             NormEdit(2, "post_ffn_norm", (7,), gain=3.0)]
    hand = copy.deepcopy(lm.model)
    layers = hand.model.layers
    with torch.no_grad():  # gemma's RMSNorm multiplies by (1 + weight): an effective gain g is weight g - 1
        for e in edits:
            if isinstance(e, NormEdit):
                norm = getattr(layers[e.layer], {"post_ffn_norm": "post_feedforward_layernorm",
                                                 "pre_ffn_norm": "pre_feedforward_layernorm"}[e.role])
                norm.weight[list(e.dims)] = e.gain - 1.0
            else:
                layers[e.layer].mlp.down_proj.weight[:, list(e.neurons)] = 0.0
        want = hand(**batch).logits
    with ablated(lm, edits):
        gain = lm.norm_gain(1, "post_ffn_norm")
        assert float(gain[3]) == 0.5 and float(gain[7]) == pytest.approx(edits[2].gain)
        with torch.no_grad():
            inside = lm.model(**batch).logits
    torch.testing.assert_close(inside, want, rtol=1e-5, atol=1e-5)
    assert (inside - before).abs().max() > 1e-3
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} not restored bit for bit"
    with torch.no_grad():
        assert torch.equal(lm.model(**batch).logits, before)


# ------------------------------------------------------------------------------------------------
# left padding: a padded batch gives what the prompts give one by one


def _assert_close_tree(a, b, path="", rel=1e-4, abs_=1e-5):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_close_tree(a[k], b[k], f"{path}.{k}", rel, abs_)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_tree(x, y, f"{path}[{i}]", rel, abs_)
    elif isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert a == pytest.approx(b, rel=rel, abs=abs_), path
    else:
        assert a == b, path


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rigidity_on_a_left_padded_batch_equals_one_prompt_at_a_time(model_type):
    from melayer.analysis.rigidity import rigidity

    lm = tiny_lm(model_type, me_layer=1)
    assert plan_batches([len(tokenize(lm, p)) for p in PROMPTS], device=lm.device, max_batch=4) == [[1, 0], [2, 3]]
    together = rigidity(lm, PROMPTS, batch_size=len(PROMPTS), progress=False).to_dict()
    alone = rigidity(lm, PROMPTS, batch_size=1, progress=False).to_dict()
    together["settings"].pop("batch_size", None), alone["settings"].pop("batch_size", None)
    _assert_close_tree(together, alone)
    # and against hand hooks: the massive token's consecutive-layer cosine at the ME layer
    L, pos = together["me_layer"], together["massive_token_positions"]
    cos, last = [], []
    for p, prompt in zip(pos, PROMPTS):
        seen: dict[str, torch.Tensor] = {}
        layer = lm.model.get_decoder().layers[L] if model_type != "gpt2" else lm.model.transformer.h[L]
        hs = [layer.register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.__setitem__("in", _hidden(a, kw)[0]),
                                              with_kwargs=True),
              layer.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("out", _first(o)[0]))]
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([tokenize(lm, prompt)]))
        for h in hs:
            h.remove()
        cos.append(float(torch.nn.functional.cosine_similarity(seen["in"][p], seen["out"][p], dim=0)))
        last.append(seen["out"][-1].double())
    assert together["consecutive"][L]["massive_cos"] == pytest.approx(float(np.mean(cos)), rel=1e-4)
    # cross-input similarity of the last token: the mean cosine over the distinct pairs of prompts
    pairs = [float(torch.nn.functional.cosine_similarity(last[i], last[j], dim=0))
             for i in range(len(last)) for j in range(i + 1, len(last))]
    assert together["cross_input"][L]["last_token_pairs"] == pytest.approx(float(np.mean(pairs)), rel=1e-4)


def test_scan_medians_equal_torch_median_of_each_unpadded_prompt():
    """The streaming reduction's median of |a| over a prompt's real tokens x dims is torch.median's (the lower
    middle value: T x 64 entries is an even count) of the same prompt run alone, though the scan runs it
    left-padded in a batch."""
    import melayer

    lm = tiny_lm("llama", me_layer=1)
    result = melayer.scan(lm, PROMPTS, batch_size=len(PROMPTS), progress=False)
    for prompt, p in zip(PROMPTS, result.prompts):
        outs = _hand_run(lm, prompt, 0)["out"]
        want = [float(torch.median(outs[l].abs().reshape(-1))) for l in range(lm.num_layers)]
        np.testing.assert_allclose(p.medians, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# WeMask: k, the masked dims, and no edit at cached decode steps, on every tiny family


@torch.no_grad()
def _attention_edits(lm, wm, run) -> tuple[dict[int, list[tuple[torch.Tensor, torch.Tensor]]], object]:
    """Per masked layer, (input before WeMask's edit, input after it) of every attention call during ``run()``: a
    plain pre-hook registered before WeMask's and one after it. Returns those and what ``run()`` returned."""
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in wm.layers}
    seen: dict[int, torch.Tensor] = {}
    with Hooks() as hooks:
        for layer in calls:
            hooks.pre(lm.module(layer, "attn"),
                      lambda m, a, kw, layer=layer: seen.__setitem__(layer, _hidden(a, kw).detach().clone()),
                      with_kwargs=True)
        wm.apply()
        for layer in calls:
            hooks.pre(lm.module(layer, "attn"),
                      lambda m, a, kw, layer=layer: calls[layer].append((seen.pop(layer), _hidden(a, kw).detach())),
                      with_kwargs=True)
        try:
            out = run()
        finally:
            wm.remove()
    return calls, out


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("token", ["first", "massive"])
def test_wemask_masks_k_top_dims_of_the_first_token_and_never_a_cached_decode_step(model_type, token):
    """rate 0.03 on hidden 64: k = floor(1.92) = 1 dim. Hand hooks before and after WeMask's on every masked
    attention module: at the prefill each row's first real token (the planted massive <bos>) has exactly its k
    largest-|a| dims zeroed and nothing else changes; at a cached decode step nothing changes (token='massive':
    unless the decoded token is itself a massive <bos>, which is masked like any massive token)."""
    from melayer.interventions.wemask import WeMask

    lm = tiny_lm(model_type, me_layer=1)
    batch = encode(lm, ["hello there, friend", "hi"])  # the second row is left-padded
    first = [row.index(1) for row in batch["attention_mask"].tolist()]
    assert first[1] > 0
    wm = WeMask(lm, 0.03, layers=[2, 3], token=token)
    assert wm.k == 1
    calls, seqs = _attention_edits(lm, wm, lambda: lm.model.generate(
        **batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id))
    T = batch["input_ids"].shape[1]
    for layer, log in calls.items():
        (pre, post), *decode = log
        assert pre.shape[1] == batch["input_ids"].shape[1]
        want = pre.clone()
        for row, col in enumerate(first):
            top = pre[row, col].abs().topk(1).indices
            want[row, col, top] = 0.0
        assert torch.equal(post, want), f"{model_type} layer {layer}: prefill edit"
        assert len(decode) == 3
        for step, (a, b) in enumerate(decode):
            assert a.shape[1] == 1
            want = a.clone()
            for row in range(a.shape[0]):
                if token == "massive" and int(seqs[row, T + step]) == BOS:
                    want[row, 0, a[row, 0].abs().topk(1).indices] = 0.0
            assert torch.equal(b, want), f"{model_type} layer {layer}: cached decode step {step}"


@torch.no_grad()
def test_wemask_massive_rule_judges_each_token_by_its_own_median_in_a_mostly_padded_batch():
    """token='massive' compares each token's largest |a| with that token's own median |a|. Here most of the batch
    is padding whose embedding is 1e4 everywhere (a median over the whole call would be ~1e4 and hide the massive
    <bos>): still each row's <bos>, and nothing else, gets its k = 6 largest-|a| dims zeroed."""
    from melayer.interventions.wemask import WeMask

    lm = tiny_lm("llama", me_layer=1)
    embed = lm.model.model.embed_tokens.weight
    embed[lm.tokenizer.pad_token_id] = 1e4
    embed[lm.tokenizer.pad_token_id, lm.plant.carrier] = 0.0  # no planted neuron fires on a pad
    batch = encode(lm, ["hello there, friend", "hi", "yo", "ok"])
    assert float((batch["attention_mask"] == 0).float().mean()) > 0.5
    calls, _ = _attention_edits(lm, WeMask(lm, 0.1, layers=[2, 3], token="massive"), lambda: lm.model(**batch))
    first = [row.index(1) for row in batch["attention_mask"].tolist()]
    for layer, [(pre, post)] in calls.items():
        want = pre.clone()
        for row, col in enumerate(first):
            want[row, col, pre[row, col].abs().topk(6).indices] = 0.0
        assert torch.equal(post, want), f"layer {layer}"
