"""melayer's captured activations agree with TransformerLens's on the same token ids.

TransformerLens's ``TransformerBridge`` wraps its own Hugging Face model (booted from the same checkpoint
directory, eager attention) and names the activations of every block (``hook_resid_pre``,
``ln1.hook_out``, ``mlp.hook_out``, ``hook_resid_post`` ...). melayer gets them from its own capture layer
(named sites from the ArchSpec, PyTorch hooks) and from the public ``melayer.scan`` result. Both run on tiny
real checkpoints of every mapped family (a planted massive activation, saved to a directory and loaded back
with ``melayer.load``) and, in one slow test, on the embedded SmolLM2-135M and Gemma-3-270M.

melayer runs left-padded batches (its default attention, sdpa where transformers picks it); TransformerLens
runs one prompt at a time, unpadded. So the comparison also checks that melayer's numbers do not depend on
padding or batch neighbours.

Tolerance (float32): |melayer - TL| <= RTOL x |TL| + RTOL x max|TL of that tensor|, i.e. 1e-5 relative to
each tensor's scale (measured worst case on the tiny checkpoints: 2e-6, OLMo2's post-FFN norm output; the bulk
is at 1e-7). The embedded models: RTOL_REAL (see their test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (the Makefile's setup installs it)")

from conftest import save_lm

import melayer
from melayer.capture import SITES, Hooks, forward_body, left_pad, pad_id, read_site, site_module
from melayer.capture.batching import plan_batches
from melayer.capture.trace import TL_HOOKS, tl_hook
from melayer.testing import MODEL_TYPES, tiny_lm

RTOL = 1e-5  # relative to the value and to the tensor's largest |a| (see the module docstring)
RTOL_REAL = 3e-5  # the embedded models: 30 layers of batched vs single-prompt kernels (see the slow test)


# Byte-level tiny tokenizer: one token per character plus <bos>. The first three (27, 25 and 25 tokens) share one
# left-padded batch in melayer's CPU plan (the test checks that it does); the last one goes alone.
PROMPTS = [
    "The cat sat on a warm mat.",
    "A dog ran across a field",
    "Birds fly south in fall.",
    "Hi there",
]


def close(mine: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    scale = float(ref.abs().max())
    torch.testing.assert_close(mine.float(), ref.float(), rtol=rtol, atol=rtol * max(scale, 1e-6),
                               msg=lambda m: f"{what}: melayer != TransformerLens\n{m}")


def assert_top(top: list[tuple[float, int, int]], h: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """melayer's top entries (signed value, position, dim) of one layer sit where TransformerLens's ``h`` (tokens,
    hidden) has that value, and their |a|, in order, are TL's top-k |a| (so positions and dims agree up to exact
    ties, without depending on how a near-tie is broken)."""
    assert len({(q, d) for _, q, d in top}) == len(top)
    close(torch.tensor([v for v, _, _ in top]), h[[q for _, q, _ in top], [d for _, _, d in top]], f"{what} top entries",
          rtol)
    close(torch.tensor([abs(v) for v, _, _ in top]), h.abs().reshape(-1).topk(len(top)).values, f"{what} top-k |a|", rtol)


def boot_bridge(path: Path):
    """A TransformerLens bridge on its own model object, booted from ``path`` (as bench/benchlib.py does):
    the bridge switches its model to eager attention, which must not reach melayer's model."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoConfig, AutoTokenizer

    arch = AutoConfig.from_pretrained(path).architectures[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        pytest.skip(f"TransformerLens has no bridge adapter for {arch}")
    return TransformerBridge.boot_transformers(str(path), tokenizer=AutoTokenizer.from_pretrained(path), device="cpu")


def tl_cache(bridge, ids: list[int], names_filter=None) -> dict[str, torch.Tensor]:
    """TransformerLens's activations of one unpadded prompt (batch dim dropped)."""
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.tensor([ids]), names_filter=names_filter)
    return {k: v[0] for k, v in cache.items()}


@pytest.fixture(scope="module", params=MODEL_TYPES)
def pair(request, tmp_path_factory):
    """(melayer LM loaded from a saved tiny planted checkpoint, a TransformerLens bridge on the same directory)."""
    family = request.param
    path = save_lm(tiny_lm(family), tmp_path_factory.mktemp("peer") / f"tiny-{family}")
    lm = melayer.load(str(path), progress=False)
    attn = lm.model.config._attn_implementation
    bridge = boot_bridge(path)
    assert bridge.original_model is not lm.model
    assert lm.model.config._attn_implementation == attn, "booting TransformerLens changed melayer's model"
    return lm, bridge


def test_every_capture_site_agrees_with_transformer_lens_under_left_padding(pair):
    lm, bridge = pair
    rows = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    batch = left_pad(rows, pad_id(lm))
    width = batch["input_ids"].shape[1]
    assert len({len(r) for r in rows}) > 1  # rows really are padded
    got: dict[tuple[int, str], torch.Tensor] = {}
    with Hooks() as hooks, torch.no_grad():
        for layer in range(lm.num_layers):
            for site in SITES:
                read_site(hooks, lm, layer, site, lambda x, key=(layer, site): got.__setitem__(key, x.detach().clone()))
        forward_body(lm, batch)
    sites = {s for _, s in got}
    assert {"resid_in", "resid_out", "attn_in", "attn_out", "mlp_in", "mlp_out", "down_in"} <= sites
    assert set(TL_HOOKS) == set(SITES)  # melayer.capture.trace names every site in TransformerLens's terms
    for b, ids in enumerate(rows):
        cache = tl_cache(bridge, ids)
        for (layer, site), x in got.items():
            name = f"blocks.{layer}.{tl_hook(lm, site)}"
            assert name in cache, f"{lm.arch.name}: melayer names {site} but TransformerLens has no {name}"
            close(x[b, width - len(ids):], cache[name], f"{lm.arch.name} prompt {b} layer {layer} {site} vs {name}")


def test_trace_by_transformer_lens_names_agrees_with_transformer_lens(pair):
    """``melayer.trace`` asked with TransformerLens's own hook names returns TransformerLens's activations."""
    lm, bridge = pair
    hooks = sorted({tl_hook(lm, s) for s in SITES if site_module(lm, 0, s) is not None})
    traced = melayer.trace(lm, PROMPTS, sites=hooks)
    for b, prompt in enumerate(PROMPTS):
        cache = tl_cache(bridge, lm.tokenizer(prompt)["input_ids"])
        for layer in range(lm.num_layers):
            for hook in hooks:
                name = f"blocks.{layer}.{hook}"
                close(traced[name][b], cache[name], f"{lm.arch.name} prompt {b} {name}")


def test_scan_top_values_medians_and_massive_entries_agree_with_transformer_lens(pair):
    lm, bridge = pair
    rows = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    plan = plan_batches([len(r) for r in rows], device=lm.device)
    assert any(len({len(rows[i]) for i in idx}) > 1 for idx in plan), "no padded batch: the test lost its point"
    result = melayer.scan(lm, PROMPTS, progress=False)
    crit = result.criterion
    assert result.me_layer == 1  # tiny_lm's planted ME layer (dim 7 on <bos>)
    per_layer = result.to_dict()["per_layer"]
    overall_max = [0.0] * lm.num_layers
    n_massive = 0
    for p, ids in zip(result.prompts, rows):
        cache = tl_cache(bridge, ids)
        assert p.tokens == bridge.to_str_tokens(torch.tensor(ids))
        for layer in range(lm.num_layers):
            h = cache[f"blocks.{layer}.hook_resid_post"]  # (tokens, hidden)
            a = h.abs()
            H = a.shape[1]
            what = f"{lm.arch.name} prompt {p.index} layer {layer}"
            overall_max[layer] = max(overall_max[layer], float(a.max()))
            assert len(p.top[layer]) == min(8, a.numel())
            assert_top(p.top[layer], h, what)
            # the layer median (lower median over tokens x dims) and the massive entries it implies
            median = float(a.reshape(-1).median())
            close(torch.tensor(p.medians[layer]), torch.tensor(median), f"{what} median")
            cut = max(crit.abs_min, crit.median_ratio * median)
            tl_massive = {(int(j) // H, int(j) % H) for j in (a.reshape(-1) > cut * (1 + RTOL)).nonzero().flatten()}
            mine = {(q, d): v for v, q, d in p.massive[layer]}
            n_massive += len(mine)
            assert tl_massive <= set(mine), f"{what}: TL's massive entries {sorted(tl_massive - set(mine))} missing"
            for (q, d), v in mine.items():
                assert float(a[q, d]) > cut * (1 - RTOL), f"{what}: ({q}, {d}) is not massive in TL's cache"
                close(torch.tensor(v), h[q, d], f"{what} massive ({q}, {d})")
        # the planted activation, by TL's numbers: the largest |a| at layer 1 is the first token's dim 7
        h1 = cache["blocks.1.hook_resid_post"].abs()
        assert divmod(int(h1.argmax()), h1.shape[1]) == (0, 7)
    assert n_massive > 0  # the massive-entry comparison was not vacuous
    for layer, row in enumerate(per_layer):
        close(torch.tensor(row["max_abs"]), torch.tensor(overall_max[layer]), f"{lm.arch.name} per_layer[{layer}].max_abs")


@pytest.mark.slow
@pytest.mark.parametrize(("model", "me_layer", "dim"), [("smollm2", 11, 507), ("gemma", 3, 163)])
def test_embedded_model_residual_stream_and_scan_agree_with_transformer_lens(request, model, me_layer, dim):
    """The real embedded models (float32, from their cached HF directories): every block's output and the scan's
    top entries on two short prompts, melayer (its own model, default attention, one left-padded batch) vs
    TransformerLens. Tolerance RTOL_REAL: measured worst 7.6e-6 on SmolLM2 (layer 10, the padded batch of two vs
    TransformerLens; melayer's own batched vs one-prompt forward differ by 7.3e-6 there, unpadded vs
    TransformerLens by 3e-7), 3e-7 on Gemma-3-270M."""
    lm = request.getfixturevalue(model)
    prompts = ["The capital of France is", "Massive activations appear in the first token of"]
    bridge = boot_bridge(Path(lm.source))
    assert bridge.original_model is not lm.model
    rows = [lm.tokenizer(p)["input_ids"] for p in prompts]
    batch = left_pad(rows, pad_id(lm))
    width = batch["input_ids"].shape[1]
    got: dict[int, torch.Tensor] = {}
    with Hooks() as hooks, torch.no_grad():
        for layer in range(lm.num_layers):
            read_site(hooks, lm, layer, "resid_out", lambda x, layer=layer: got.__setitem__(layer, x.detach().clone()))
        forward_body(lm, batch)
    result = melayer.scan(lm, prompts, progress=False)
    for b, ids in enumerate(rows):
        cache = tl_cache(bridge, ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        p = result.prompts[b]
        for layer in range(lm.num_layers):
            h = cache[f"blocks.{layer}.hook_resid_post"]
            what = f"{model} prompt {b} layer {layer}"
            close(got[layer][b, width - len(ids):], h, f"{what} resid_out", RTOL_REAL)
            assert_top(p.top[layer], h, what, RTOL_REAL)
        # the README's massive activation, by TransformerLens's numbers: the first token, on `dim`, at the ME layer
        a = cache[f"blocks.{me_layer}.hook_resid_post"].abs()
        assert divmod(int(a.argmax()), a.shape[1]) == (0, dim)


@pytest.mark.parametrize("family", ["gpt_neox", "gptj", "mixtral", "opt"])
def test_parallel_and_moe_blocks_agree_with_transformer_lens(family, tmp_path):
    """Families whose roles melayer derives: parallel blocks (GPT-NeoX: two norms on the layer input; GPT-J: one
    norm shared by attention and FFN) and an MoE block (Mixtral: fused experts). Every site TransformerLens also
    names agrees; for Mixtral the experts melayer's neuron numbering shows active on a token are the ones
    TransformerLens's router hook chose."""
    tiny = tiny_lm(family)
    path = save_lm(tiny, tmp_path / f"tiny-{family}")
    lm = melayer.load(str(path), progress=False)
    bridge = boot_bridge(path)
    shared_norm = lm.arch.pre_ffn_norm == lm.arch.pre_attn_norm
    hooks_for = {"resid_in": "hook_resid_pre", "resid_out": "hook_resid_post", "attn_in": "ln1.hook_out",
                 "attn_out": "attn.hook_out", "mlp_in": "ln1.hook_out" if shared_norm else "ln2.hook_out",
                 "mlp_out": "mlp.hook_out"}
    if lm.experts(1) is None:
        hooks_for["down_in"] = "mlp.hook_post"
    compared = 0
    for text in PROMPTS[:2]:
        ids = lm.tokenizer(text)["input_ids"]
        got: dict[tuple[int, str], torch.Tensor] = {}
        with Hooks() as hooks, torch.no_grad():
            for layer in range(lm.num_layers):
                for site in [*hooks_for, "down_in"]:
                    read_site(hooks, lm, layer, site,
                              lambda x, key=(layer, site), into=got: into.__setitem__(key, x[0].detach().clone()))
            forward_body(lm, {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})
        cache = tl_cache(bridge, ids)
        for (layer, site), x in got.items():
            if site in hooks_for:
                close(x, cache[f"blocks.{layer}.{hooks_for[site]}"], f"{family} layer {layer} {site}")
                compared += 1
        if lm.experts(1) is not None:
            fused = lm.experts(1)
            with torch.no_grad():  # the router hooks hold (tokens, k) for the one prompt, without a batch dim
                _, raw = bridge.run_with_cache(torch.tensor([ids]))
            for layer in range(lm.num_layers):
                act = got[(layer, "down_in")].reshape(len(ids), fused.num_experts, fused.inter)
                mine = [sorted((act[t].abs().sum(-1) > 0).nonzero().flatten().tolist()) for t in range(len(ids))]
                theirs = [sorted(r) for r in raw[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(len(ids), -1).tolist()]
                if layer != tiny.plant.me_layer:
                    assert mine == theirs, f"{family} layer {layer}: routed experts differ"
                else:  # BOS's second expert, beside the planted one, gets routing weight 0 in float32: inactive
                    assert mine[1:] == theirs[1:] and set(mine[0]) < set(theirs[0]), (mine[0], theirs[0])
    assert compared >= 2 * lm.num_layers * 5
