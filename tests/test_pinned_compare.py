"""``compare``'s sink rate under each WeMask rate, pinned against transformers' own eager attention probabilities
(``output_attentions``) of each prompt run alone with that rate's mask on: Gu et al.'s alpha_1 and the share of
(layer, head) pairs above epsilon, computed here by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melayer.capture import encode
from melayer.eval.compare import compare
from melayer.eval.tasks import get_task
from melayer.interventions.wemask import wemask
from melayer.testing import tiny_lm


def _hand_sink_rate(lm, prompts: list[str], epsilon: float = 0.3, max_tokens: int = 64, min_tokens: int = 16) -> float:
    """Mean over prompts (>= min_tokens tokens, cut at max_tokens) of the share of (layer, head) pairs whose mean
    attention to the first token, over the queries that see it (every query of a causal prompt), exceeds epsilon."""
    rates = []
    for prompt in prompts:
        batch = encode(lm, [prompt], max_tokens=max_tokens)
        if len(lm.tokenizer(prompt)["input_ids"]) < min_tokens:
            continue
        with torch.no_grad():
            attn = lm.model(**batch, output_attentions=True).attentions  # per layer (1, H, T, T)
        alpha = np.stack([a[0, :, :, 0].double().mean(-1).numpy() for a in attn])  # (layers, H)
        rates.append(float((alpha > epsilon).mean()))
    return float(np.mean(rates))


@torch.no_grad()
def plant_sink(lm, layers=(2, 3), const_dim: int = 20) -> None:
    """Make every head of ``layers`` of a tiny planted Llama attend to the massive <bos>: every token carries a
    constant ``const_dim`` (so after the norm every query reads it), the queries read that dim and the keys read
    the massive dim, both in the lowest-frequency rotary pair (which barely turns over 64 positions)."""
    model = lm.model.model
    model.embed_tokens.weight[:, const_dim] = 1.0
    head_dim = lm.config.head_dim
    j = head_dim // 2 - 1  # rotate-half pairs (j, j + head_dim/2); the last pair turns slowest
    for layer in layers:
        attn = model.layers[layer].self_attn
        q, k = attn.q_proj.weight, attn.k_proj.weight
        q.zero_()
        k.zero_()
        for h in range(q.shape[0] // head_dim):
            q[h * head_dim + j, const_dim] = 1.0
        for h in range(k.shape[0] // head_dim):
            k[h * head_dim + j, lm.plant.dim] = 1.0


def test_compare_sink_rate_under_each_mask_equals_hand_computed_attention():
    lm = tiny_lm("llama")
    plant_sink(lm)
    d = compare(lm, "arc_easy", "0.02,0.5", limit=4, batch_size=4, me_layer=1, progress=False, n_boot=50).to_dict()
    task = get_task("arc_easy")
    prompts = [task.sink_text(s) for s in task.load(4, lm=lm)]
    want = {0.0: _hand_sink_rate(lm, prompts)}
    for rate in (0.02, 0.5):
        with wemask(lm, rate, me_layer=1):
            want[rate] = _hand_sink_rate(lm, prompts)
    assert want[0.0] == 0.5 and want[0.02] < 0.5, "planted: every head of layers 2-3 sinks, the mask undoes it"
    assert [row["rate"] for row in d["per_rate"]] == [0.0, 0.02, 0.5]
    for row in d["per_rate"]:
        assert row["sink_rate"] == pytest.approx(want[row["rate"]], abs=1e-12), row["rate"]
    assert d["sinks"]["rates"] == {f"{k:g}": pytest.approx(v, abs=1e-12) for k, v in want.items()}
