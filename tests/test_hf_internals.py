"""The transformers / PyTorch internals melayer uses (all in melayer.models.hf_internals) still exist and behave
as assumed. A failure here after upgrading transformers means: adapt hf_internals.py, nothing else."""

from __future__ import annotations

import torch
import transformers

from melayer.capture import Hooks, encode
from melayer.models import hf_internals as H
from melayer.testing import tiny_lm


def test_attention_implementation_switch_and_restore():
    lm = tiny_lm("llama", plant=False)
    lm.model.set_attn_implementation("sdpa")
    assert H.attn_implementation(lm.model) == "sdpa", f"config._attn_implementation moved in {transformers.__version__}"
    with H.attention_implementation(lm.model, "eager"):
        assert H.attn_implementation(lm.model) == "eager"
        out = lm.model(**encode(lm, ["abc"]), output_attentions=True)
        assert out.attentions and out.attentions[0] is not None  # eager returns the probabilities
    assert H.attn_implementation(lm.model) == "sdpa"


def test_hook_count_sees_public_hooks():
    lm = tiny_lm("llama", plant=False)
    base = H.hook_count(lm.model)
    with Hooks() as hooks:
        hooks.pre(lm.layers[0], lambda m, a: None)
        hooks.forward(lm.layers[1], lambda m, a, o: None)
        assert H.hook_count(lm.model) == base + 2, f"torch {torch.__version__} renamed _forward_hooks"
    assert H.hook_count(lm.model) == base


def test_kv_cache_length_and_reindex():
    lm = tiny_lm("llama", plant=False)
    batch = encode(lm, ["hello there", "hi"])
    out = lm.model(**batch, use_cache=True)
    cache = out.past_key_values
    assert H.cache_length(cache) == batch["input_ids"].shape[1]
    H.reindex_cache(cache, torch.tensor([1, 1, 0]), "tiny")
    layer0 = cache.layers[0].keys if hasattr(cache, "layers") else cache[0][0]
    assert layer0.shape[0] == 3


def test_drop_gguf_quantizer_makes_the_model_saveable(tmp_path):
    lm = tiny_lm("llama", plant=False)
    lm.model.hf_quantizer = object()
    lm.model.config.quantization_config = {"quant_method": "gguf"}
    H.drop_gguf_quantizer(lm.model)
    assert lm.model.hf_quantizer is None and not hasattr(lm.model.config, "quantization_config")
    lm.model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()


def test_gguf_tensor_processors_undo_llama_cpp_conventions():
    """melayer.models.lazy relies on these: Gemma norms stored as 1 + weight, GPT-2 FFN weights transposed."""
    import numpy as np

    norm = np.full(4, 3.0, dtype=np.float32)
    gemma = H.gguf_tensor_processor("gemma3", {}).process(weights=norm, name="blk.0.post_ffw_norm.weight")
    assert np.allclose(gemma.weights, 2.0)
    llama = H.gguf_tensor_processor("llama", {}).process(weights=norm, name="blk.0.ffn_norm.weight")
    assert np.allclose(llama.weights, 3.0)
    down = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert H.gguf_tensor_processor("gpt2", {}).process(weights=down, name="blk.0.ffn_down.weight").weights.shape == (3, 2)


def test_cache_keywords_reach_the_model_without_deprecation_warnings():
    """melayer passes and reads the KV cache under the keyword this transformers uses: continuing from a cache
    gives the logits of the full forward, the attention call receives that cache, and no deprecation warning."""
    import warnings

    lm = tiny_lm("llama", plant=False)
    ids = encode(lm, ["hello there, how are you"])["input_ids"]
    seen = []
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = lm.model(input_ids=ids).logits
        cache = H.output_cache(lm.model(input_ids=ids[:, :-2], use_cache=True))
        assert H.cache_length(cache) == ids.shape[1] - 2
        with Hooks() as hooks:
            hooks.pre(lm.layers[0].self_attn, lambda m, a, kw: seen.append(H.call_cache(kw)), with_kwargs=True)
            rest = lm.model(input_ids=ids[:, -2:], use_cache=True, **{H.cache_keyword(lm.model): cache}).logits
    assert seen and seen[0] is cache  # the attention call got the cache under a keyword melayer reads
    assert torch.allclose(rest, full[:, -2:], atol=1e-5)
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]
